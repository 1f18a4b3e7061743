"""Triton and shardkl's Triton kernels loaded for Triton's CPU interpreter, for the ``interpreted_triton_*.py`` suites.

Import this module before anything imports triton. Triton chooses the interpreter when a kernel is decorated, i.e.
when triton (whose ``tl.sum``, ``tl.max``, ... are kernels too) and ``shardkl.kernels.triton_kl`` are imported, and
that choice holds for the whole process; so ``TRITON_INTERPRET=1`` is set for those imports only and the environment
is restored (the :func:`interpreted` fixture sets it again for each test, which ``triton_kl`` reads at call time).
``tests/kernels/test_triton_kl.py`` runs the suites in child processes, so the CUDA tests of a full run still get
the compiled kernels.

Also :class:`Launches`, which counts the interpreted kernels' launches.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "triton was imported without TRITON_INTERPRET=1 earlier in this process: run the interpreted Triton suites "
        "in a process of their own (tests/kernels/test_triton_kl.py does)",
        allow_module_level=True,
    )
_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from shardkl.kernels import triton_kl  # noqa: E402

if _previous is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _previous

assert type(triton_kl._stats_kernel).__name__ == "InterpretedFunction", "the Triton kernels are not interpreted"

# the interpreter evaluates both sides of every `where` in numpy, which warns about the discarded side's inf/NaN
FILTER = "ignore::RuntimeWarning:triton.runtime.interpreter"


@pytest.fixture(autouse=True)
def interpreted(monkeypatch: pytest.MonkeyPatch) -> None:
    """``TRITON_INTERPRET=1`` while a test runs (``triton_kl`` refuses CPU tensors without it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


class Launches:
    """Counts the interpreted kernel launches of a ``with`` block: ``(kernel name, constexpr flags)`` in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._run = InterpretedFunction.run

    def __enter__(self) -> Launches:
        run, calls = self._run, self.calls

        def counted(kernel: InterpretedFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            if not warmup:
                calls.append((kernel.__name__, {k: v for k, v in kwargs.items() if k.isupper()}))
            return run(kernel, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        InterpretedFunction.run = self._run  # type: ignore[method-assign]

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        """The launches so far, and start counting afresh."""
        calls = list(self.calls)
        self.calls.clear()
        return calls


__all__ = ["FILTER", "Launches", "interpreted", "triton", "triton_kl"]
