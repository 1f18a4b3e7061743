"""Which kernels a call runs: ``Options.impl`` resolved per device and compute dtype, with per-family fallbacks.

- ``"eager"``: :mod:`shardkl.kernels.eager` everywhere.
- ``"compiled"``: on CPU with fp32 compute, the native C++ kernels (:mod:`shardkl.kernels.cpu`), falling back to
  ``torch.compile`` graphs if they cannot be built; elsewhere (CUDA, CPU float64) the graphs.
- ``"triton"``: the Triton kernels (CUDA; on CPU only under ``TRITON_INTERPRET=1``).
- ``"auto"`` (the default): the fastest correct choice at every size. On CPU the native kernels whenever they can
  be built (a few seconds once per machine, then loaded from the disk cache in milliseconds), else eager; float64
  runs eager. On CUDA Triton when it is installed, else the graphs; each falls back to eager.

Failures of a compiler are decided **per family** of calls (entry, device, input dtypes and, for graphs, the
vocabulary width), once, by :class:`Fallback`: the first call of a family tries the fast kernels; if they raise and
the slower ones succeed on the same inputs, the compiler is at fault, the family uses the slower kernels from then
on and one warning says why. An error the slower kernels raise too is the caller's and propagates, and an
out-of-memory error always propagates. Only ``"auto"`` (and ``"compiled"`` on CPU, from the C++ kernels to the
graphs) falls back; an explicitly requested implementation raises.

This is runtime policy (locks, a process-wide cache of decisions), kept out of :mod:`shardkl.kernels`, which is
math only.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from shardkl.kernels import ENTRIES, Kernels, check_impl


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
    """``primary`` kernels that fall back to ``fallback`` per family of calls, decided once per family and entry.

    Args:
        primary, fallback: the fast kernels and the ones that always work.
        family: key of a call (``(a, b) -> hashable``); a compiler that fails for one key may work for another.
        prepare: run once per family before the first primary call (e.g. a build); raising means "fall back" for
            every entry of the family.
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
        # (entry, family) -> True (primary works) / False (primary failed, fallback from now on); absent: not tried
        self._decided: dict[tuple[str, Hashable], bool] = {}
        self._lock = threading.Lock()
        self.kernels = Kernels(primary.name, **{entry: self._entry(entry) for entry in ENTRIES})

    def decided(self) -> dict[tuple[str, Hashable], bool]:
        """A copy of the decisions so far: ``(entry, family) -> primary kernels used``."""
        with self._lock:
            return {k: v for k, v in self._decided.items() if k[0] != PREPARED}

    def _entry(self, entry: str) -> Callable[..., Any]:
        def call(a: Tensor, b: Tensor | None = None, **kwargs: Any) -> Any:
            return self._call(entry, a, b, kwargs)

        call.__name__ = entry
        return call

    def _run(self, kernels: Kernels, entry: str, a: Tensor, b: Tensor | None, kwargs: dict[str, Any]) -> Any:
        fn = getattr(kernels, entry)
        # the top-k entries take the student's logits alone
        return fn(a, **kwargs) if entry.startswith("topk") else fn(a, b, **kwargs)

    def _call(self, entry: str, a: Tensor, b: Tensor | None, kwargs: dict[str, Any]) -> Any:
        family = self._family(a, b)
        key = (entry, family)
        state = self._decided.get(key)
        if state is not None:
            return self._run(self.primary if state else self.fallback, entry, a, b, kwargs)
        prepared = (PREPARED, family) in self._decided
        # a failed build decides every entry of the family; a failed call only its own entry
        decide = [key] if prepared else [(e, family) for e in ENTRIES]
        try:
            if self._prepare is not None and not prepared:
                self._prepare(a, b)
                with self._lock:
                    self._decided[(PREPARED, family)] = True
                decide = [key]
            out = self._run(self.primary, entry, a, b, kwargs)
        except Exception as exc:
            if _is_out_of_memory(exc):
                raise
            # an error the fallback raises as well is the caller's: it propagates from here, nothing is decided
            out = self._run(self.fallback, entry, a, b, kwargs)
            with self._lock:
                self._decided.update(dict.fromkeys(decide, False))
            warnings.warn(
                f"shardkl: {self._what} failed for {family} ({_first_line(exc)}); using {self._instead} for these "
                "calls from now on",
                RuntimeWarning,
                stacklevel=5,
            )
            return out
        with self._lock:
            self._decided[key] = True
        return out


_resolved: dict[tuple[str, str], Kernels] = {}
_resolved_lock = threading.Lock()


def _cached(key: tuple[str, str], make: Callable[[], Kernels]) -> Kernels:
    # one object per (choice, device type), so that its per-family decisions persist across calls
    with _resolved_lock:
        if key not in _resolved:
            _resolved[key] = make()
        return _resolved[key]


def _native_cpu(then: Kernels, instead: str) -> Kernels:
    from shardkl.kernels import cpu

    def build(a: Tensor, b: Tensor | None) -> None:
        cpu.build(a.dtype, None if b is None else b.dtype)

    return Fallback(
        cpu.KERNELS, then, family=dtype_family, what="building the C++ CPU kernels", instead=instead, prepare=build
    ).kernels


def _graphs_then_eager() -> Kernels:
    from shardkl.kernels import compiled, eager

    return Fallback(
        compiled.kernels(), eager.KERNELS, family=compiled.family, what="torch.compile", instead="the eager kernels"
    ).kernels


def resolve(impl: str, device: torch.device, dtype: torch.dtype) -> Kernels:
    """The kernels for ``impl`` on ``device`` for a call computed in ``dtype``.

    Raises:
        ValueError: an unknown ``impl``; ``impl="triton"`` without Triton, or on CPU without ``TRITON_INTERPRET=1``.
    """
    check_impl(impl)
    from shardkl.kernels import compiled, eager

    on_cpu = device.type == "cpu"
    if impl == "eager":
        return eager.KERNELS
    if impl == "triton":
        from shardkl.kernels import triton_kl

        return triton_kl.kernels(device)
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
        if on_cpu:
            if dtype != torch.float32:
                # the native kernels compute in fp32; graphs would cost seconds of compilation per new shape
                return eager.KERNELS
            return _cached(("auto-cpu", device.type), lambda: _native_cpu(eager.KERNELS, "the eager kernels"))
        return _cached(("auto-graphs", device.type), _graphs_then_eager)
    # "compiled"
    if on_cpu and dtype == torch.float32:
        return _cached(("compiled-cpu", device.type), lambda: _native_cpu(compiled.kernels(), "torch.compile graphs"))
    return compiled.kernels()


__all__ = ["Fallback", "PREPARED", "dtype_family", "resolve"]
