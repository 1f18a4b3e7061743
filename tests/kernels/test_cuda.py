"""On a CUDA device: the Triton kernels and the compiled graphs against the eager kernels; skipped without CUDA.

Run this file on its own on a GPU machine (``pytest tests/kernels/test_cuda.py``): in a full run,
``test_triton_kl.py`` has already loaded the Triton kernels for the interpreter, and this file then skips.
"""

from __future__ import annotations

import pytest
import torch

import shardkl
from shardkl import _stats
from tests.kernels.cases import TINY_KL_BOUNDS, case, check_edge_rows, edge_rows, saved, tiny_kl_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")
F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(scope="module")
def triton_kl():
    pytest.importorskip("triton")
    from shardkl.kernels import triton_kl

    if type(triton_kl._stats_kernel).__name__ == "InterpretedFunction":
        pytest.skip("the Triton kernels were loaded for the interpreter in this process: run this file alone")
    return triton_kl


def _on_cuda(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(CUDA) for t in tensors]


@pytest.mark.parametrize(("shape", "dtype", "temperature"), [((257, 19_008), BF16, 1.0), ((64, 1000), F32, 0.7),
                                                             ((9, 70_001), F32, 1.0), ((9, 151_936), BF16, 1.3)])
@pytest.mark.parametrize("two_inputs", [True, False])
@pytest.mark.parametrize("entropy", [True, False])
def test_triton_stats_match_eager(triton_kl, shape, dtype, temperature, two_inputs, entropy) -> None:
    from shardkl.kernels import eager

    a, b, _ = case(shape, dtype)
    a, b = _on_cuda(*edge_rows(a, b))
    bb = b if two_inputs else None
    got = triton_kl.kl_stats(a, bb, temperature=temperature, dtype=F32, entropy=entropy)  # autotuned
    want = eager.kl_stats(a, bb, temperature=temperature, dtype=F32, entropy=entropy)
    rows = [_stats.LA, _stats.ENT, _stats.LB, _stats.KL][: 4 if two_inputs else 2]
    if not entropy:
        rows.remove(_stats.ENT)
    if two_inputs:
        # a row where P has no mass: a leaf may report Q's share (1) or the masked-row convention (0); the merge of
        # the ranks makes it 0 either way (check_edge_rows below allows both)
        for stats in (got, want):
            stats[_stats.KL, stats[_stats.LA] == float("-inf")] = 0.0
    torch.testing.assert_close(got[rows], want[rows], rtol=2e-5, atol=2e-6, equal_nan=True)
    if entropy:
        check_edge_rows(got.cpu(), two_inputs)


@pytest.mark.parametrize(("present", "two_inputs", "dtype"), [("kepqt", True, BF16), ("kept", True, F32),
                                                               ("ept", False, F32)])
def test_triton_grads_match_eager(triton_kl, present, two_inputs, dtype) -> None:
    from shardkl.kernels import eager

    a, b, tokens = case((129, 19_008), dtype)
    bb = b if two_inputs else None
    inputs = saved(a, bb, tokens, 0.7, present)
    inputs = type(inputs)(*_on_cuda(*inputs))
    a, b = _on_cuda(a, b)
    bb = b if two_inputs else None
    got_a, got_b = torch.empty_like(a), torch.empty_like(b)
    triton_kl.kl_grads(a, bb, temperature=0.7, dtype=F32, inputs=inputs, grad_a=got_a, grad_b=got_b)
    want_a, want_b = torch.empty_like(a), torch.empty_like(b)
    eager.kl_grads(a, bb, temperature=0.7, dtype=F32, inputs=inputs, grad_a=want_a, grad_b=want_b)
    tol = 2e-5 if dtype == F32 else 1e-2
    torch.testing.assert_close(got_a, want_a, rtol=tol, atol=tol * 0.02)
    if two_inputs:
        torch.testing.assert_close(got_b, want_b, rtol=tol, atol=tol * 0.02)


@pytest.mark.parametrize("impl", ["triton", "compiled", "auto"])
def test_public_api_on_cuda_matches_eager(triton_kl, impl) -> None:
    a, b, tokens = case((33, 19_008), BF16)
    a, b, tokens = _on_cuda(a, b, tokens)
    results = {}
    for name in ("eager", impl):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        stats = shardkl.kl_stats(x, y, tokens, temperature=0.7, options=shardkl.Options(impl=name))
        (stats.exact_kl.sum() + 0.3 * stats.entropy.sum() + stats.k3.sum() + stats.p_logprobs.sum()).backward()
        results[name] = (stats, x.grad, y.grad)
    (s_e, ga_e, gb_e), (s_i, ga_i, gb_i) = results["eager"], results[impl]
    for name in ("exact_kl", "entropy", "p_logprobs", "q_logprobs", "k3"):
        torch.testing.assert_close(getattr(s_i, name), getattr(s_e, name), rtol=2e-5, atol=2e-6, msg=name)
    torch.testing.assert_close(ga_i, ga_e, rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(gb_i, gb_e, rtol=1e-2, atol=2e-3)


def test_auto_picks_triton_and_one_launch_per_call(triton_kl) -> None:
    from torch.profiler import ProfilerActivity, profile

    from shardkl import kernels

    assert kernels.resolve("auto", CUDA, F32, 1 << 30).name == "triton"
    a, b, _ = case((4096, 19_008), BF16)
    a, b = _on_cuda(a, b)
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    shardkl.exact_kl(x, y).sum().backward()  # autotuning happens here
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        shardkl.exact_kl(x, y).sum().backward()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert sum("_stats_kernel" in n for n in names) == 1, names
    assert sum("_grads_kernel" in n for n in names) == 1, names


@pytest.mark.parametrize(("true_kl", "eps", "bound"), TINY_KL_BOUNDS)
def test_tiny_kl_on_cuda(triton_kl, true_kl, eps, bound) -> None:
    a, b, want = tiny_kl_inputs(eps)
    for impl in ("triton", "compiled"):
        got = shardkl.exact_kl(a.to(CUDA), b.to(CUDA), options=shardkl.Options(impl=impl)).double().cpu()
        assert (got > 0).all(), impl
        worst = ((got - want).abs() / want).max().item()
        assert worst < bound, f"{impl}: worst relative error {worst:.2e} at KL {true_kl:g} (bound {bound:g})"
