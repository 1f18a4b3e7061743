"""Kernels of the engine, behind one ``impl=`` switch. No communication here.

Every implementation computes the same two things on this rank's whole ``[rows, V_local]`` block of raw logits
(any float dtype, not yet divided by the temperature), and **chooses its own tiling** to do so:

- ``stats``: the per-token stats of :mod:`shardkl._stats` over the block (forward);
- ``grads``: the block's gradients, written into caller-provided outputs (backward).

Implementations:

- ``"eager"`` (:mod:`shardkl.kernels.eager`): PyTorch ops on memory-bounded tiles; works everywhere.
- ``"compiled"`` (:mod:`shardkl.kernels.compiled`): the same math through ``torch.compile`` (inductor).
- ``"triton"`` (:mod:`shardkl.kernels.triton_kl`): hand-written Triton kernels for CUDA; on CPU only under
  ``TRITON_INTERPRET=1`` (for tests).
- ``"auto"``: ``"triton"`` on CUDA when Triton is installed, else ``"compiled"`` on CUDA; on CPU ``"compiled"``
  for calls of at least ``AUTO_COMPILE_ELEMENTS`` logits (where the one-time compile pays off), else ``"eager"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor

Impl = Literal["auto", "eager", "compiled", "triton"]
IMPLS: tuple[str, ...] = get_args(Impl)

# On CPU, "auto" compiles only for calls at least this large (per input): below it the ~20 s one-time compile
# costs more than it saves.
AUTO_COMPILE_ELEMENTS = 1 << 24


class GradInputs(NamedTuple):
    """What the backward of one ``[rows, V_local]`` block needs, each ``[rows]`` or ``None`` where unused.

    Attributes:
        lse_a, lse_b, kl, ent: global per-token results of the forward pass (``lse_b``/``kl`` ``None`` for one input).
        grad_kl, grad_ent, grad_logp, grad_logq: incoming gradients of the four outputs (``None``: no gradient).
        token_cols: local column of each token in ``[0, V_local)``, or -1 where another rank holds it (``None``
            without tokens).
    """

    lse_a: Tensor
    lse_b: Tensor | None
    kl: Tensor | None
    ent: Tensor
    grad_kl: Tensor | None
    grad_ent: Tensor | None
    grad_logp: Tensor | None
    grad_logq: Tensor | None
    token_cols: Tensor | None

    def rows(self, rows: slice) -> GradInputs:
        """The same inputs for a slice of the rows."""
        return GradInputs(*(None if x is None else x[rows] for x in self))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Kernels:
    """One implementation: its name and its two entry points.

    ``stats(a, b, *, temperature, dtype, entropy) -> Tensor``: ``a``, ``b`` are ``[rows, V_local]`` 2-D views (any
    row stride; ``b`` may be ``None``); returns ``[num_stats, rows]`` in ``dtype``. With ``entropy=False`` the
    entropy row may hold anything (the caller does not read it).

    ``grads(a, b, *, temperature, dtype, inputs, grad_a, grad_b) -> None``: writes the gradients with respect to
    the raw logits (``1/T`` applied) into ``grad_a`` / ``grad_b`` (``[rows, V_local]``, contiguous, the input dtype),
    each skipped where ``None``; ``inputs`` is a :class:`GradInputs`.
    """

    name: str
    stats: Callable[..., Tensor]
    grads: Callable[..., None]


def scaled(x: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """``x`` in the compute dtype, divided by the temperature (no copy for fp32 input at T = 1)."""
    x = x.to(dtype)
    return x if temperature == 1.0 else x / temperature


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


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve(impl: str, device: torch.device, elements: int) -> Kernels:
    """The kernels for ``impl`` on ``device`` for a call on ``elements`` logits per input.

    Raises:
        ValueError: ``impl="triton"`` without Triton, or on CPU without ``TRITON_INTERPRET=1``.
    """
    check_impl(impl)
    from shardkl.kernels import eager

    if impl == "eager":
        return eager.KERNELS
    if impl == "triton":
        from shardkl.kernels import triton_kl

        return triton_kl.kernels(device)
    if impl == "auto":
        if device.type == "cuda" and _triton_available():
            from shardkl.kernels import triton_kl

            return triton_kl.kernels(device)
        if device.type != "cuda" and elements < AUTO_COMPILE_ELEMENTS:
            return eager.KERNELS
    from shardkl.kernels import compiled

    if impl == "compiled":
        return compiled.kernels()
    if _compile_failed:
        return eager.KERNELS
    try:
        chosen = compiled.kernels()
    except Exception as exc:  # no torch.compile here: eager is always right
        _disable_compiled(exc)
        return eager.KERNELS
    return Kernels(
        "compiled", _with_fallback(chosen.stats, eager.KERNELS.stats), _with_fallback(chosen.grads, eager.KERNELS.grads)
    )


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


__all__ = ["AUTO_COMPILE_ELEMENTS", "IMPLS", "GradInputs", "Impl", "Kernels", "check_impl", "resolve", "scaled"]
