"""The ``impl=`` switch (``shardkl._dispatch``): what each choice resolves to, and the per-family fallback when a
compiler fails."""

from __future__ import annotations

import warnings

import pytest
import torch

import shardkl
from shardkl import _dispatch
from shardkl._dispatch import Fallback
from shardkl.kernels import ENTRIES, Kernels, compiled, cpu, eager
from tests.kernels.cases import case

CPU = torch.device("cpu")
F32 = torch.float32


def test_impl_is_checked_and_auto_picks_the_native_kernels_at_every_size() -> None:
    with pytest.raises(ValueError, match="impl must be one of"):
        shardkl.exact_kl(torch.zeros(2, 3), torch.zeros(2, 3), options=shardkl.Options(impl="cuda"))
    assert _dispatch.resolve("eager", CPU, F32) is eager.KERNELS
    auto = _dispatch.resolve("auto", CPU, F32)
    assert auto.name == "compiled" and auto is _dispatch.resolve("auto", CPU, F32)  # one object, one memory
    # float64 has no native kernels: eager, not graphs that compile for seconds per new shape
    assert _dispatch.resolve("auto", CPU, torch.float64) is eager.KERNELS


def test_auto_runs_the_native_kernels_on_a_small_call(monkeypatch) -> None:
    calls: list[str] = []
    native = cpu.KERNELS.kl_stats

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append("native")
        return native(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_dispatch, "_resolved", {})
    monkeypatch.setattr(cpu, "KERNELS", cpu.KERNELS.replace(kl_stats=counted))
    a, b, _ = case((2, 40), F32)  # 80 logits: far below any size where a build was once thought to pay off
    got = shardkl.exact_kl(a, b)
    assert calls == ["native"]
    torch.testing.assert_close(got, shardkl.exact_kl(a, b, options=shardkl.Options(impl="eager")))


class Recorder:
    """Kernels that count their calls and raise ``error`` (if set) from every entry, eager's otherwise."""

    def __init__(self, name: str, error: BaseException | None = None) -> None:
        self.calls = 0
        self.error = error
        self.kernels = Kernels(name, **{entry: self._entry(entry) for entry in ENTRIES})

    def _entry(self, entry: str):  # noqa: ANN202
        def call(*args: object, **kwargs: object) -> object:
            self.calls += 1
            if self.error is not None:
                raise self.error
            return getattr(eager.KERNELS, entry)(*args, **kwargs)

        return call


def _fallback(primary: Recorder, fallback: Recorder) -> Fallback:
    return Fallback(primary.kernels, fallback.kernels, family=_dispatch.dtype_family, what="the fast kernels",
                    instead="the safe kernels")


def _stats(impl: Kernels | Fallback, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return impl.kernels.kl_stats(a, b, temperature=1.0, dtype=F32, entropy=True)


def test_a_failing_compiler_falls_back_once_per_family_with_one_warning() -> None:
    fast, safe = Recorder("fast", RuntimeError("no C++ compiler\nlong log")), Recorder("safe")
    impl = _fallback(fast, safe)
    a, b, _ = case((5, 300), F32)
    with pytest.warns(RuntimeWarning, match=r"the fast kernels failed .*RuntimeError: no C\+\+ compiler\); using the"):
        got = _stats(impl, a, b)
    torch.testing.assert_close(got, eager.kl_stats(a, b, temperature=1.0, dtype=F32), equal_nan=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and the failing kernels are not tried again
        _stats(impl, a, b)
        _stats(impl, a, b)
    assert (fast.calls, safe.calls) == (1, 3)
    # another family (bf16 inputs) is decided on its own: the fast kernels are tried for it
    with pytest.warns(RuntimeWarning):
        _stats(impl, a.bfloat16(), b.bfloat16())
    assert fast.calls == 2
    assert set(impl.decided().values()) == {False}


def test_out_of_memory_is_never_swallowed_nor_remembered() -> None:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    fast, safe = Recorder("fast", oom("CUDA out of memory")), Recorder("safe")
    impl = _fallback(fast, safe)
    a, b, _ = case((5, 300), F32)
    for _ in range(2):
        with pytest.raises(oom):
            _stats(impl, a, b)
    assert (fast.calls, safe.calls) == (2, 0) and impl.decided() == {}
    fast.error = None  # the memory is back: the fast kernels run
    _stats(impl, a, b)
    assert impl.decided() == {("kl_stats", _dispatch.dtype_family(a, b)): True}


def test_an_input_error_propagates_and_decides_nothing() -> None:
    error = ValueError("bad input")
    fast, safe = Recorder("fast", error), Recorder("safe", error)
    impl = _fallback(fast, safe)
    a, b, _ = case((5, 300), F32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="bad input"):
            _stats(impl, a, b)
    assert impl.decided() == {}


def test_working_kernels_are_decided_once() -> None:
    fast, safe = Recorder("fast"), Recorder("safe")
    impl = _fallback(fast, safe)
    a, b, _ = case((5, 300), F32)
    for _ in range(3):
        _stats(impl, a, b)
    assert (fast.calls, safe.calls) == (3, 0)
    assert impl.decided() == {("kl_stats", _dispatch.dtype_family(a, b)): True}


def test_cpu_compiled_falls_back_to_graphs_when_the_cpp_build_fails(monkeypatch) -> None:
    def no_compiler(p_dtype: torch.dtype, q_dtype: torch.dtype | None = None) -> None:
        raise OSError("g++: not found")

    monkeypatch.setattr(cpu, "build", no_compiler)
    monkeypatch.setattr(_dispatch, "_resolved", {})
    a, b, _ = case((4, 50), F32)
    message = "building the C\\+\\+ CPU kernels failed .*g\\+\\+: not found.*torch.compile"
    with pytest.warns(RuntimeWarning, match=message):
        got = shardkl.exact_kl(a, b, options=shardkl.Options(impl="compiled"))
    torch.testing.assert_close(got, shardkl.exact_kl(a, b, options=shardkl.Options(impl="eager")))


def test_auto_falls_back_to_eager_when_no_compiler_works(monkeypatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpu, "build", broken)
    monkeypatch.setattr(compiled, "kernels", lambda: Kernels("compiled", **dict.fromkeys(ENTRIES, broken)))
    monkeypatch.setattr(_dispatch, "_resolved", {})
    a, b, _ = case((3, 50), F32)
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    with pytest.warns(RuntimeWarning) as record:
        got = shardkl.exact_kl(x, y, options=shardkl.Options(impl="auto"))
        got.sum().backward()
    messages = [str(w.message) for w in record]
    # one warning: the failed build decides every entry (forward and backward) of the family
    assert len(messages) == 1 and "C++ CPU kernels failed" in messages[0] and "eager kernels" in messages[0]
    torch.testing.assert_close(got, shardkl.exact_kl(a, b, options=shardkl.Options(impl="eager")))
    # an explicit impl="compiled" does not hide the graphs' failure
    monkeypatch.setattr(_dispatch, "_resolved", {})
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shardkl.exact_kl(a, b, options=shardkl.Options(impl="compiled"))
