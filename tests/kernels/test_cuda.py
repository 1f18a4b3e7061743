"""On a CUDA device: the Triton kernels of every op and the compiled graphs against the eager kernels and float64;
skipped without CUDA.

A full ``python -m pytest`` on a GPU machine runs these: the interpreter suites of the Triton kernels run in child
processes (``test_triton_kl.py``), so this process loads the kernels compiled for the GPU. The fixture still skips if
``TRITON_INTERPRET=1`` was set for the whole run (then the kernels in this process are the interpreter's).
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
        pytest.skip("the Triton kernels were loaded for the interpreter in this process (TRITON_INTERPRET=1)")
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

    from shardkl import _dispatch

    assert _dispatch.resolve("auto", CUDA, F32).name == "triton"
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


def test_triton_log_sum_exps_only_match_float64(triton_kl) -> None:
    """``kl_stats(kl=False)`` (the JSD's first round), autotuned."""
    a, b, _ = case((257, 19_008), BF16)
    a, b = _on_cuda(*edge_rows(a, b))
    got = triton_kl.kl_stats(a, b, temperature=0.8, dtype=F32, entropy=False, kl=False).cpu()
    want = torch.logsumexp(torch.stack([a.double(), b.double()]) / 0.8, dim=-1).cpu()
    torch.testing.assert_close(got[[_stats.LA, _stats.LB]].double(), want, rtol=3e-7, atol=1e-6, equal_nan=True)
    assert (got[[_stats.ENT, _stats.KL]] == 0).all()


@pytest.mark.parametrize(("shape", "dtype", "temperature"), [((257, 19_008), BF16, 1.0), ((64, 1000), F32, 0.7),
                                                             ((9, 151_936), BF16, 1.3)])
@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_triton_jsd_entries_match_eager(triton_kl, shape, dtype, temperature, beta) -> None:
    from shardkl.kernels import eager

    a, b, _ = case(shape, dtype)
    a, b = _on_cuda(*edge_rows(a, b))
    stats = eager.kl_stats(a, b, temperature=temperature, dtype=F32, entropy=False, kl=False)
    lse_a, lse_b = stats[_stats.LA], stats[_stats.LB]
    ok = (torch.isfinite(lse_a) & torch.isfinite(lse_b)).cpu()
    kwargs = dict(temperature=temperature, dtype=F32, lse_a=lse_a, lse_b=lse_b, beta=beta)
    got, want = triton_kl.jsd_terms(a, b, **kwargs).cpu(), eager.jsd_terms(a, b, **kwargs).cpu()
    torch.testing.assert_close(got[:, ok], want[:, ok], rtol=2e-5, atol=1e-8)
    grad = torch.where(ok, torch.randn(shape[0]), 0.0).to(CUDA)
    outputs = []
    for fn in (triton_kl.jsd_grads, eager.jsd_grads):
        ga, gb = torch.empty_like(a), torch.empty_like(b)
        fn(a, b, kl_pm=want[0].float().to(CUDA), kl_qm=want[1].float().to(CUDA), grad=grad, grad_a=ga, grad_b=gb,
           **kwargs)
        outputs.append((ga, gb))
    tol = 2e-5 if dtype == F32 else 1e-2
    for got_grad, want_grad in zip(*outputs, strict=True):
        torch.testing.assert_close(got_grad, want_grad, rtol=tol, atol=tol * 1e-3, equal_nan=True)


@pytest.mark.parametrize(("shape", "dtype", "k"), [((257, 19_008), BF16, 32), ((64, 1000), F32, 1000),
                                                   ((9, 151_936), BF16, 200)])
def test_triton_topk_entries_match_eager(triton_kl, shape, dtype, k) -> None:
    from shardkl.kernels import eager

    s, _, _ = case(shape, dtype)
    g = torch.Generator().manual_seed(7)
    ids = torch.stack([torch.randperm(shape[1], generator=g)[:k] for _ in range(shape[0])])
    ids[0, 0], ids[1, -1] = -3, shape[1] + 5  # ids another rank holds
    s[2] = float("-inf")
    s[3, ids[3, 0]] = float("nan")  # a NaN id: the tail does not see it
    s, ids = _on_cuda(s, ids)
    got = triton_kl.topk_stats(s, temperature=0.9, dtype=F32, ids=ids).cpu()
    want = eager.topk_stats(s, temperature=0.9, dtype=F32, ids=ids).cpu()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-6, equal_nan=True)
    tail_coef, id_coef = torch.randn(shape[0]).to(CUDA), torch.randn(shape[0], k).to(CUDA)
    outputs = []
    for fn in (triton_kl.topk_grads, eager.topk_grads):
        grad = torch.empty_like(s)
        fn(s, temperature=0.9, dtype=F32, ids=ids, lse_excl=want[1].float().to(CUDA), tail_coef=tail_coef,
           id_coef=id_coef, grad_s=grad)
        outputs.append(grad)
    tol = 2e-5 if dtype == F32 else 1e-2
    torch.testing.assert_close(outputs[0], outputs[1], rtol=tol, atol=tol * 1e-3, equal_nan=True)


@pytest.mark.parametrize("kind", ["jsd", "topk_forward", "topk_reverse"])
def test_distillation_on_cuda_matches_eager_and_float64(triton_kl, kind) -> None:
    from tests._distill_reference import bucket_reference, jsd_reference, teacher_topk

    a, b, _ = case((33, 19_008), BF16)
    ids, logprobs = teacher_topk(a.double(), 32)
    a, b, ids, logprobs = _on_cuda(a, b, ids, logprobs.float())
    results = {}
    for name in ("eager", "triton"):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        options = shardkl.Options(impl=name)
        if kind == "jsd":
            value = shardkl.jsd(x, y, beta=0.3, temperature=0.7, options=options)
        else:
            direction = kind.split("_")[1]
            value = shardkl.topk_kl(y, ids, logprobs, direction=direction, temperature=0.7, options=options)
        (value * torch.linspace(-1, 2, 33, device=CUDA)).sum().backward()
        results[name] = (value.detach(), x.grad, y.grad)
    (v_e, ga_e, gb_e), (v_t, ga_t, gb_t) = results["eager"], results["triton"]
    torch.testing.assert_close(v_t, v_e, rtol=2e-5, atol=1e-6)
    if kind == "jsd":
        want = jsd_reference(a.cpu(), b.cpu(), 0.3, 0.7)
        torch.testing.assert_close(ga_t, ga_e, rtol=1e-2, atol=2e-3)
    else:
        want = bucket_reference(b.cpu(), ids.cpu(), logprobs.cpu(), kind.split("_")[1], temperature=0.7)
        assert ga_t is None and ga_e is None
    torch.testing.assert_close(v_t.double().cpu(), want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gb_t, gb_e, rtol=1e-2, atol=2e-3)


def test_distillation_launches_per_call(triton_kl) -> None:
    """``jsd``: one launch per forward round and one in backward; ``topk_kl``: one and one."""
    from torch.profiler import ProfilerActivity, profile

    from tests._distill_reference import teacher_topk

    a, b, _ = case((4096, 19_008), BF16)
    ids, logprobs = teacher_topk(a[:, :1000].double(), 32)
    a, b, ids, logprobs = _on_cuda(a, b, ids, logprobs.float())
    triton = shardkl.Options(impl="triton")
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()

    def jsd() -> None:
        shardkl.jsd(x, y, beta=0.3, options=triton).sum().backward()

    def topk() -> None:
        shardkl.topk_kl(y, ids, logprobs, options=triton).sum().backward()

    for step, kernels in ((jsd, ("_stats_kernel", "_jsd_terms_kernel", "_jsd_grads_kernel")),
                          (topk, ("_topk_stats_kernel", "_topk_grads_kernel"))):
        step()  # autotuning happens here
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
        for kernel in kernels:
            assert sum(kernel in n for n in names) == 1, (kernel, names)


@pytest.mark.parametrize("target", [5e-7, 5e-9])
def test_tiny_jsd_and_topk_on_cuda(triton_kl, target) -> None:
    """The eager kernels' bounds (tests/test_distill.py) with the GPU's exponential (``ex2.approx``)."""
    import math

    from tests._distill_reference import bucket_reference, jsd_reference, teacher_topk

    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32000, generator=g) * 3
    b = a + math.sqrt(8 * target) * torch.randn(16, 32000, generator=g) + 3
    triton = shardkl.Options(impl="triton")
    got = shardkl.jsd(a.to(CUDA), b.to(CUDA), beta=0.5, options=triton).double().cpu()
    want = jsd_reference(a, b, 0.5)
    assert (got > 0).all()
    assert ((got - want).abs() / want).max().item() <= (1e-4 if target >= 5e-7 else 1e-3)
    teacher = a.double() + math.sqrt(2 * target) * torch.randn(16, 32000, generator=g, dtype=torch.float64) + 3
    ids, logprobs = teacher_topk(teacher, 20)
    for direction in ("forward", "reverse"):
        got = shardkl.topk_kl(a.to(CUDA), ids.to(CUDA), logprobs.float().to(CUDA), direction=direction,
                              options=triton).double().cpu()
        want = bucket_reference(a, ids, logprobs.float(), direction)
        assert (got >= 0).all()
        assert ((got - want).abs() / want).max().item() <= 1e-4, direction


def test_kl_merge_of_far_apart_groups_on_cuda(triton_kl) -> None:
    """Issue 18, item 7: the chain-rule merge's gap term in its direct form where it would overflow."""
    from tests.reference import reference

    a, b = torch.zeros(2, 65536), torch.zeros(2, 65536)
    a[0, 0], b[0, 40000] = 100.0, 100.0
    a[1, 0], b[1, 40000] = 730.0, 730.0
    got = triton_kl.kl_stats(a.to(CUDA), b.to(CUDA), temperature=1.0, dtype=F32, block=1024)[_stats.KL]
    torch.testing.assert_close(got.double().cpu(), reference(a, b)["exact_kl"], rtol=1e-5, atol=0)
