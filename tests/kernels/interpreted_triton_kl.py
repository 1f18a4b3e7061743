"""The Triton KL kernels (``kl_stats``, ``kl_grads``) in Triton's CPU interpreter against the eager kernels and
float64. Run in a process of its own (``tests/kernels/test_triton_kl.py`` does; see ``_interpreter.py``)."""

from __future__ import annotations

import pytest

# isort: off
# first: loads triton and the kernels for the interpreter, before anything else imports triton
from tests.kernels._interpreter import FILTER, Launches, interpreted, triton_kl  # noqa: F401
# isort: on
import torch

import shardkl
from shardkl import _dispatch, _stats
from shardkl.kernels import eager
from tests.kernels.cases import (
    TINY_KL_BOUNDS,
    case,
    check_edge_rows,
    check_kl_grads_against_eager,
    check_public_api_against_eager,
    dtype_extremes,
    edge_rows,
    tiny_kl_inputs,
)
from tests.reference import reference

F32 = torch.float32
pytestmark = pytest.mark.filterwarnings(FILTER)


def test_kernels_run_in_the_interpreter() -> None:
    assert type(triton_kl._stats_kernel).__name__ == "InterpretedFunction"
    assert type(triton_kl._grads_kernel).__name__ == "InterpretedFunction"


def test_exp_gap_is_accurate_across_scales() -> None:
    mags = torch.logspace(-8, 1.5, 400, dtype=torch.float64)
    d = torch.cat(
        [mags, -mags, torch.tensor([0.0, 0.4999, 0.5, 0.5001, -0.5, float("inf"), float("-inf")], dtype=torch.float64)]
    )
    d32 = d.float()
    got = triton_kl.exp_gap(d32).double()
    want = torch.expm1(d32.double()) - d32.double()
    finite = torch.isfinite(want)
    rel = ((got - want).abs() / want.abs().clamp_min(1e-300))[finite & (want != 0)]
    assert rel.max() < 2e-6, rel.max()
    assert got[d == 0].item() == 0.0
    assert (got[d.isinf()] == float("inf")).all()
    assert (got[finite] >= 0).all()


@pytest.mark.parametrize(
    ("shape", "dtype", "temperature", "block"),
    [
        ((9, 300), F32, 0.7, 64),
        ((9, 300), torch.bfloat16, 1.0, 128),
        ((3, 1271), F32, 1.0, 256),
        ((3, 1271), torch.float16, 0.7, 512),
        ((9, 2000), F32, 1.0, 2048),
    ],
)
@pytest.mark.parametrize("two_inputs", [True, False])
def test_stats_match_eager(shape, dtype, temperature, block, two_inputs) -> None:
    a, b, _ = case(shape, dtype)
    if shape[0] >= 8:
        a, b = edge_rows(a, b)
    bb = b if two_inputs else None
    got = triton_kl.kl_stats(a, bb, temperature=temperature, dtype=F32, block=block)
    want = eager.kl_stats(a, bb, temperature=temperature, dtype=F32)
    assert got.shape == want.shape == (4 if two_inputs else 2, shape[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    if shape[0] >= 8:
        check_edge_rows(got, two_inputs)


@pytest.mark.parametrize(("entropy", "kl"), [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("two_inputs", [True, False])
def test_stats_not_asked_for_are_zero_and_the_others_unchanged(entropy, kl, two_inputs) -> None:
    a, b, _ = case((9, 700), torch.bfloat16)
    a, b = edge_rows(a, b)
    bb = b if two_inputs else None
    got = triton_kl.kl_stats(a, bb, temperature=0.7, dtype=F32, entropy=entropy, kl=kl, block=128)
    want = eager.kl_stats(a, bb, temperature=0.7, dtype=F32, entropy=entropy, kl=kl)
    # eager's zeros where a statistic is off, edge rows included; the log-sum-exps with their NaN/+inf conventions
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert got[_stats.LA, 2] == float("-inf") and got[_stats.LA, 3].isnan() and got[_stats.LA, 4] == float("inf")
    if not entropy:
        assert (got[_stats.ENT] == 0).all()
    if two_inputs and not kl:
        assert (got[_stats.KL] == 0).all()
        assert got[_stats.LB, 6] == float("-inf")


@pytest.mark.parametrize("block", [64, 256, 2048])
def test_log_sum_exps_only_match_float64(block) -> None:
    # the JSD's first round: per-lane running sums, merged once per row
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 1500, generator=g) * 4
    b = a + torch.randn(6, 1500, generator=g)
    a[0, :700] = float("-inf")  # lanes without mass next to lanes with
    a[1, 3] = 80.0  # one lane far above the others
    b[2, ::2] = -1e30  # underflowing columns
    got = triton_kl.kl_stats(a, b, temperature=1.3, dtype=F32, entropy=False, kl=False, block=block)
    for row, x in ((_stats.LA, a), (_stats.LB, b)):
        want = torch.logsumexp(x.double() / 1.3, dim=-1)
        torch.testing.assert_close(got[row].double(), want, rtol=3e-7, atol=1e-6)


def test_chain_rule_merge_of_far_apart_groups_stays_finite() -> None:
    # issue 18, item 7: Q's peak in a tile where P has a share w ~ e^-92 (and, second row, ~e^-722: float64's
    # exp(722) overflows, so the merge's gap term must take its direct form w x - w + v)
    rows = []
    for peak in (100.0, 730.0):
        a, b = torch.zeros(65536), torch.zeros(65536)
        a[0], b[40000] = peak, peak
        rows.append((a, b))
    a, b = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    want = reference(a, b)["exact_kl"]
    assert want[0] == pytest.approx(100.0, rel=1e-6) and want[1] == pytest.approx(730.0, rel=1e-6)
    got = triton_kl.kl_stats(a, b, temperature=1.0, dtype=F32, block=4096)[_stats.KL].double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_chain_rule_merge_through_the_public_api(monkeypatch) -> None:
    monkeypatch.setattr(triton_kl, "DEFAULT_BLOCK", 4096)
    a, b = torch.zeros(1, 65536), torch.zeros(1, 65536)
    a[0, 0], b[0, 40000] = 730.0, 730.0
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = shardkl.exact_kl(x, y, options=shardkl.Options(impl="triton"))
    torch.testing.assert_close(got.double(), reference(a, b)["exact_kl"], rtol=1e-5, atol=0)
    got.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_extremes_give_no_nan_and_no_negative_kl(monkeypatch, dtype) -> None:
    """tests/test_validation.py's extremes through the Triton kernels, several tiles per row."""
    monkeypatch.setattr(triton_kl, "DEFAULT_BLOCK", 16)
    a, b, tokens = dtype_extremes(dtype)
    results = {}
    for impl in ("triton", "eager"):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        stats = shardkl.kl_stats(x, y, tokens, options=shardkl.Options(impl=impl))
        for name, value in stats._asdict().items():
            assert not torch.isnan(value).any(), (impl, name)
        assert (stats.exact_kl >= 0).all(), impl
        assert stats.exact_kl[1] == 0 and stats.exact_kl[3] == 0 and stats.exact_kl[0] > 1, impl
        (stats.exact_kl[1:].sum() + stats.entropy.sum() + stats.k3.sum()).backward()
        assert torch.isfinite(x.grad.float()).all() and torch.isfinite(y.grad.float()).all(), impl
        results[impl] = stats
    want = reference(a, b, tokens)
    # float64 on the same inputs: the merged tiles keep each tile's offset from the maximum (an entropy of log 50 for
    # a uniform row at the dtype's maximum; fp32: the KL of 3.4e38 that eager reports as inf). The log-probs are not
    # compared: logit - lse in fp32 is 0 at 3.4e38 on every path
    for name in ("exact_kl", "entropy"):
        torch.testing.assert_close(getattr(results["triton"], name).double(), want[name], rtol=1e-5, atol=1e-5)


def test_exact_kl_is_one_launch_forward_and_one_backward() -> None:
    a, b, _ = case((6, 300), F32)
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    with Launches() as launches:
        value = shardkl.exact_kl(x, y, options=shardkl.Options(impl="triton"))
        forward = launches.take()
        value.sum().backward()
        backward = launches.take()
    assert [name for name, _ in forward] == ["_stats_kernel"], forward
    assert forward[0][1]["ENTROPY"] is False and forward[0][1]["KL"] is True
    assert [name for name, _ in backward] == ["_grads_kernel"], backward


def test_tiles_merged_by_the_chain_rule_keep_a_tiny_kl() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 1000, generator=g, dtype=torch.float64) * 3
    b = a + 1e-3 * torch.randn(4, 1000, generator=g, dtype=torch.float64) + 3.0
    got = triton_kl.kl_stats(a.float(), b.float(), temperature=1.0, dtype=F32, block=128)[_stats.KL].double()
    a32, b32 = a.float().double(), b.float().double()
    want = (torch.softmax(a32, -1) * (torch.log_softmax(a32, -1) - torch.log_softmax(b32, -1))).sum(-1)
    assert (got > 0).all() and (want < 1e-5).all()  # KL ~ 5e-7: the textbook formula loses every digit here
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)


@pytest.mark.parametrize(("true_kl", "eps", "bound"), TINY_KL_BOUNDS)
@pytest.mark.slow  # the interpreter at a 152k vocabulary: about 20 s per case
def test_tiny_kl_meets_the_bound_at_a_152k_vocabulary(true_kl, eps, bound) -> None:
    a, b, want = tiny_kl_inputs(eps, tokens=4)
    # the smallest autotuned tile: the most merges per row
    got = triton_kl.kl_stats(a, b, temperature=1.0, dtype=F32, block=1024)[_stats.KL].double()
    assert (got > 0).all()
    worst = ((got - want).abs() / want).max().item()
    assert worst < bound, f"worst relative error {worst:.2e} at KL {true_kl:g}"


def test_identical_inputs_give_exactly_zero() -> None:
    a, _, _ = case((4, 900), F32)
    assert (triton_kl.kl_stats(a, a.clone(), temperature=0.7, dtype=F32, block=128)[_stats.KL] == 0).all()


def test_strided_views_and_fp64_fallback() -> None:
    a, b, _ = case((300, 6), F32)
    a, b = a.t(), b.t()  # column stride != 1: copied
    torch.testing.assert_close(triton_kl.kl_stats(a, b, temperature=0.7, dtype=F32),
                               eager.kl_stats(a, b, temperature=0.7, dtype=F32))
    a, b, _ = case((5, 400), F32)
    view_a, view_b = a[1:4, 50:333], b[1:4, 50:333]  # row stride 400, 283 columns
    torch.testing.assert_close(triton_kl.kl_stats(view_a, view_b, temperature=1.0, dtype=F32, block=64),
                               eager.kl_stats(view_a, view_b, temperature=1.0, dtype=F32))
    d = triton_kl.kl_stats(a.double(), b.double(), temperature=1.0, dtype=torch.float64)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d, eager.kl_stats(a.double(), b.double(), temperature=1.0, dtype=torch.float64))


@pytest.mark.parametrize(
    ("shape", "dtype", "temperature", "block", "present", "two_inputs"),
    [
        ((6, 300), F32, 0.7, 64, "kepqt", True),
        ((6, 300), torch.bfloat16, 1.0, 128, "kept", True),
        ((3, 1271), F32, 0.7, 256, "kqt", True),
        ((3, 1271), F32, 1.0, 512, "ept", False),
        ((6, 300), F32, 1.0, 64, "e", True),
        ((6, 300), F32, 0.7, 64, "kepq", True),
    ],
)
def test_grads_match_eager(shape, dtype, temperature, block, present, two_inputs) -> None:
    check_kl_grads_against_eager(triton_kl.kl_grads, shape, dtype, temperature, present, two_inputs, block=block)


@pytest.mark.parametrize(("shape", "dtype", "temperature"), [((6, 300), F32, 0.7), ((3, 1271), torch.bfloat16, 1.0)])
def test_public_api_matches_eager(monkeypatch, shape, dtype, temperature) -> None:
    monkeypatch.setattr(triton_kl, "DEFAULT_BLOCK", 256)  # several tiles per row
    check_public_api_against_eager("triton", shape, dtype, temperature)


def test_triton_needs_cuda_or_the_interpreter(monkeypatch) -> None:
    assert _dispatch.resolve("triton", torch.device("cpu"), F32).name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        triton_kl.kernels(torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        shardkl.exact_kl(torch.zeros(2, 3), torch.zeros(2, 3), options=shardkl.Options(impl="triton"))
