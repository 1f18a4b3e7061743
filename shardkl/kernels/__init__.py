"""Kernels of the engine, behind one ``impl=`` switch. No communication here.

Every implementation computes the same two things on this rank's whole ``[rows, V_local]`` block of raw logits
(any float dtype, not yet divided by the temperature), and **chooses its own tiling** to do so:

- ``stats``: the per-token stats of :mod:`shardkl._stats` over the block (forward);
- ``grads``: the block's gradients, written into caller-provided outputs (backward).

Implementations:

- ``"eager"`` (:mod:`shardkl.kernels.eager`): PyTorch ops on memory-bounded tiles; works everywhere.
- ``"compiled"``: code compiled for this machine on first use. On CPU, hand-vectorised C++ kernels
  (:mod:`shardkl.kernels.cpu`: one native call per block, two exponentials per pair of logits) built with
  ``torch.compile``'s own C++ toolchain; elsewhere, and on CPU for float64 or where that build fails,
  ``torch.compile`` graphs of the eager math on cache-sized row blocks (:mod:`shardkl.kernels.compiled`).
- ``"triton"`` (:mod:`shardkl.kernels.triton_kl`): hand-written Triton kernels for CUDA, one launch per block and
  pass; on CPU only under ``TRITON_INTERPRET=1`` (for tests).
- ``"auto"``: ``"triton"`` on CUDA when Triton is installed, else ``"compiled"`` on CUDA; on CPU ``"compiled"``
  for calls of at least ``AUTO_COMPILE_ELEMENTS`` logits (where the one-time build pays off), else ``"eager"``.

Failures of a compiler are decided **per family** of calls (device, input dtypes and, for graphs, the vocabulary
width), once, by :class:`Fallback`: the first call of a family tries the fast kernels; if they raise and the
slower ones succeed on the same inputs, the compiler is at fault, the family uses the slower kernels from then on
and one warning says why. An error the slower kernels raise too is the caller's and propagates, and an
out-of-memory error always propagates. Only ``"auto"`` (and ``"compiled"`` on CPU, from the C++ kernels to the
graphs) falls back; an explicitly requested implementation raises.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor

Impl = Literal["auto", "eager", "compiled", "triton"]
IMPLS: tuple[str, ...] = get_args(Impl)

# On CPU, "auto" compiles only for calls at least this large (per input): below it the one-time build (seconds)
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


def row_major(x: Tensor) -> Tensor:
    """``x`` itself when its columns are contiguous (any row stride), else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def drop_b_without_lse(
    b: Tensor | None, grad_b: Tensor | None, inputs: GradInputs
) -> tuple[Tensor | None, Tensor | None]:
    """``(b, grad_b)`` for a backward; ``(None, None)`` after zeroing ``grad_b`` when no lse of Q was saved, since
    then nothing flows to ``b`` (as in the eager path)."""
    if b is None or inputs.lse_b is not None:
        return b, grad_b
    if grad_b is not None:
        grad_b.zero_()
    return None, None


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


def _is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, (oom, MemoryError))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


Family = Callable[[Tensor, "Tensor | None"], Hashable]
# key of Fallback's record that a family's `prepare` step succeeded
PREPARED = "prepared"


def dtype_family(a: Tensor, b: Tensor | None) -> Hashable:
    """Family of a call for kernels built per device and input dtypes."""
    return (a.device, a.dtype, None if b is None else b.dtype)


class Fallback:
    """``primary`` kernels that fall back to ``fallback`` per family of calls, decided once per family.

    Args:
        primary, fallback: the fast kernels and the ones that always work.
        family: key of a call (``(a, b) -> hashable``); a compiler that fails for one key may work for another.
        prepare: run once per family before the first primary call (e.g. a build); raising means "fall back".
        what: the fast kernels, for the warning ("the C++ CPU kernels").
        instead: the fallback, for the warning ("torch.compile graphs").
    """

    def __init__(
        self,
        primary: Kernels,
        fallback: Kernels,
        *,
        family: Family,
        what: str,
        instead: str,
        prepare: Callable[[Tensor, Tensor | None], None] | None = None,
    ) -> None:
        self.primary, self.fallback = primary, fallback
        self._family, self._prepare = family, prepare
        self._what, self._instead = what, instead
        # family -> True (primary works) / False (primary failed, fallback from now on); absent: not tried yet
        self._decided: dict[tuple[str, Hashable], bool] = {}
        self._lock = threading.Lock()
        self.kernels = Kernels(primary.name, self.stats, self.grads)

    def decided(self) -> dict[tuple[str, Hashable], bool]:
        """A copy of the decisions so far: ``(pass, family) -> primary kernels used`` (pass: stats, grads)."""
        with self._lock:
            return {k: v for k, v in self._decided.items() if k[0] != PREPARED}

    def _call(self, which: str, a: Tensor, b: Tensor | None, kwargs: dict[str, Any]) -> Any:
        family = self._family(a, b)
        key = (which, family)
        state = self._decided.get(key)
        if state is not None:
            return getattr(self.primary if state else self.fallback, which)(a, b, **kwargs)
        # a failed build decides both passes of the family; a failed call only its own pass
        decide = [("stats", family), ("grads", family)] if (PREPARED, family) not in self._decided else [key]
        try:
            if self._prepare is not None and (PREPARED, family) not in self._decided:
                self._prepare(a, b)
                with self._lock:
                    self._decided[(PREPARED, family)] = True
                decide = [key]
            out = getattr(self.primary, which)(a, b, **kwargs)
        except Exception as exc:
            if _is_out_of_memory(exc):
                raise
            # an error the fallback raises as well is the caller's: it propagates from here, nothing is decided
            out = getattr(self.fallback, which)(a, b, **kwargs)
            with self._lock:
                self._decided.update(dict.fromkeys(decide, False))
            warnings.warn(
                f"shardkl: {self._what} failed for {family} ({_first_line(exc)}); using {self._instead} for these "
                "calls from now on",
                RuntimeWarning,
                stacklevel=4,
            )
            return out
        with self._lock:
            self._decided[key] = True
        return out

    def stats(self, a: Tensor, b: Tensor | None, **kwargs: Any) -> Tensor:
        """:class:`Kernels` ``stats`` with the per-family fallback."""
        return self._call("stats", a, b, kwargs)  # type: ignore[no-any-return]

    def grads(self, a: Tensor, b: Tensor | None, **kwargs: Any) -> None:
        """:class:`Kernels` ``grads`` with the per-family fallback."""
        self._call("grads", a, b, kwargs)


_resolved: dict[tuple[str, str], Kernels] = {}
_resolved_lock = threading.Lock()


def _cached(key: tuple[str, str], make: Callable[[], Kernels]) -> Kernels:
    # one object per (choice, device type), so that its per-family decisions persist across calls
    with _resolved_lock:
        if key not in _resolved:
            _resolved[key] = make()
        return _resolved[key]


def _compiled_cpu(then_eager: bool) -> Kernels:
    from shardkl.kernels import compiled, cpu, eager

    graphs = compiled.kernels()
    if then_eager:
        graphs = Fallback(
            graphs, eager.KERNELS, family=compiled.family, what="torch.compile", instead="the eager kernels"
        ).kernels

    def build(a: Tensor, b: Tensor | None) -> None:
        cpu.build(a.dtype, None if b is None else b.dtype)

    return Fallback(
        cpu.KERNELS,
        graphs,
        family=dtype_family,
        what="building the C++ CPU kernels",
        instead="torch.compile graphs",
        prepare=build,
    ).kernels


def resolve(impl: str, device: torch.device, dtype: torch.dtype, elements: int) -> Kernels:
    """The kernels for ``impl`` on ``device`` for a call on ``elements`` logits per input, computed in ``dtype``.

    Raises:
        ValueError: an unknown ``impl``; ``impl="triton"`` without Triton, or on CPU without ``TRITON_INTERPRET=1``.
    """
    check_impl(impl)
    from shardkl.kernels import eager

    if impl == "eager":
        return eager.KERNELS
    if impl == "triton":
        from shardkl.kernels import triton_kl

        return triton_kl.kernels(device)
    on_cpu = device.type == "cpu"
    if impl == "auto":
        if device.type == "cuda" and _triton_available():
            from shardkl.kernels import triton_kl

            triton = triton_kl.kernels(device)
            return _cached(
                ("auto-triton", device.type),
                lambda: Fallback(
                    triton, eager.KERNELS, family=dtype_family, what="Triton", instead="the eager kernels"
                ).kernels,
            )
        if on_cpu and elements < AUTO_COMPILE_ELEMENTS:
            return eager.KERNELS
    from shardkl.kernels import compiled

    then_eager = impl == "auto"
    if on_cpu and dtype == torch.float32:
        return _cached((f"{impl}-cpu", device.type), lambda: _compiled_cpu(then_eager))
    graphs = compiled.kernels()
    if not then_eager:
        return graphs
    return _cached(
        ("auto-graphs", device.type),
        lambda: Fallback(
            graphs, eager.KERNELS, family=compiled.family, what="torch.compile", instead="the eager kernels"
        ).kernels,
    )


__all__ = [
    "AUTO_COMPILE_ELEMENTS",
    "IMPLS",
    "Fallback",
    "GradInputs",
    "Impl",
    "Kernels",
    "check_impl",
    "dtype_family",
    "resolve",
    "scaled",
]
