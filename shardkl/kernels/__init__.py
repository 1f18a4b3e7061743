"""Per-chunk kernels of the engine, behind one ``impl=`` switch. No communication here.

Every implementation computes the same two things on one ``[rows, cols]`` chunk of raw logits (any float
dtype, not yet divided by the temperature): the leaf stats of ``shardkl._stats`` (forward) and the chunk's
gradients (backward). They share the math of ``shardkl._stats``; they differ in how it is executed:

- ``"eager"``: PyTorch ops, one kernel per op; works everywhere.
- ``"compiled"``: the same functions through ``torch.compile`` (inductor: fused C++/OpenMP loops on CPU, Triton
  on GPU), compiled once per dtype/arity with dynamic shapes, never per call.
- ``"triton"``: a hand-written Triton kernel (``shardkl.kernels.triton_kl``) for CUDA, with an online merge of
  the stats inside the kernel; runs on CPU only under ``TRITON_INTERPRET=1`` (for tests).
- ``"auto"``: ``"triton"`` on CUDA when Triton is installed, else ``"compiled"`` on CUDA; on CPU ``"compiled"``
  for calls of at least ``AUTO_COMPILE_ELEMENTS`` logits (where the one-time compile pays off), else
  ``"eager"``. A compiled path that fails to build falls back to eager with one warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from shardkl import _stats

Impl = Literal["auto", "eager", "compiled", "triton"]
IMPLS: tuple[str, ...] = get_args(Impl)

# On CPU, "auto" compiles only for calls at least this large (per input): below it the ~20 s one-time compile
# costs more than it saves.
AUTO_COMPILE_ELEMENTS = 1 << 24


def scaled(x: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """``x`` in the compute dtype, divided by the temperature (no copy for fp32 input at T = 1)."""
    x = x.to(dtype)
    return x if temperature == 1.0 else x / temperature


def eager_leaf(a: Tensor, b: Tensor | None, temperature: float, dtype: torch.dtype) -> Tensor:
    """Leaf stats of one raw chunk with eager PyTorch ops."""
    return _stats.leaf_stats(scaled(a, dtype, temperature), None if b is None else scaled(b, dtype, temperature))


def eager_grads(
    a: Tensor, b: Tensor | None, temperature: float, dtype: torch.dtype, **saved: Any
) -> tuple[Tensor, Tensor | None]:
    """Gradients of one raw chunk with respect to the raw logits (``1/T`` applied), in the compute dtype."""
    grad_a, grad_b = _stats.chunk_grads(
        scaled(a, dtype, temperature), None if b is None else scaled(b, dtype, temperature), **saved
    )
    if temperature != 1.0:
        grad_a = grad_a.mul_(1.0 / temperature)
        grad_b = None if grad_b is None else grad_b.mul_(1.0 / temperature)
    return grad_a, grad_b


@dataclass(frozen=True)
class Kernels:
    """The two per-chunk entry points of one implementation."""

    name: str
    leaf: Callable[..., Tensor]
    grads: Callable[..., tuple[Tensor, Tensor | None]]


EAGER = Kernels("eager", eager_leaf, eager_grads)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_impl(impl: object) -> None:
    """Raise ``ValueError`` for an unknown ``impl``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(impl: str, device: torch.device, elements: int) -> Kernels:
    """The kernels for ``impl`` on ``device`` for a call on ``elements`` logits per input.

    Raises:
        ValueError: ``impl="triton"`` without Triton, or on CPU without ``TRITON_INTERPRET=1``.
    """
    check_impl(impl)
    if impl == "eager":
        return EAGER
    if impl == "triton":
        from shardkl.kernels import triton_kl

        return triton_kl.kernels(device)
    if impl == "auto":
        if device.type == "cuda" and _triton_available():
            from shardkl.kernels import triton_kl

            return triton_kl.kernels(device)
        if device.type != "cuda" and elements < AUTO_COMPILE_ELEMENTS:
            return EAGER
    from shardkl.kernels import compiled

    if impl == "compiled":
        return compiled.kernels()
    if _compile_failed:
        return EAGER
    try:
        chosen = compiled.kernels()
    except Exception as exc:  # no torch.compile here: eager is always right
        _disable_compiled(exc)
        return EAGER
    return Kernels("compiled", _with_fallback(chosen.leaf, eager_leaf), _with_fallback(chosen.grads, eager_grads))


_compile_failed = False


def _disable_compiled(exc: BaseException) -> None:
    global _compile_failed
    _compile_failed = True
    _warn_once("compiled", f"shardkl: torch.compile failed ({type(exc).__name__}: {exc}); using the eager kernels")


def _with_fallback(fast: Callable[..., Any], safe: Callable[..., Any]) -> Callable[..., Any]:
    """For ``impl="auto"``: a compiler missing or failing on this machine (found on first use) means eager."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if not _compile_failed:
            try:
                return fast(*args, **kwargs)
            except Exception as exc:  # inductor needs a C++ compiler and a supported platform
                _disable_compiled(exc)
        return safe(*args, **kwargs)

    return call
