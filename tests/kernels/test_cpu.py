"""The C++ CPU kernels give the eager kernels' values and gradients, edge rows included."""

from __future__ import annotations

import pytest
import torch

import shardkl
from shardkl import _stats
from shardkl.kernels import cpu, eager
from tests.kernels.cases import (
    case,
    check_edge_rows,
    check_kl_grads_against_eager,
    check_public_api_against_eager,
    edge_rows,
    saved,
)
from tests.reference import reference

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16



pytestmark = pytest.mark.usefixtures("cpu_built")


@pytest.mark.parametrize(
    ("shape", "dtype", "temperature"),
    [((9, 300), F32, 1.0), ((9, 1271), BF16, 0.7), ((8, 1000), F16, 1.3), ((9, 70_000), F32, 0.7), ((3, 17), F32, 1.0)],
)
@pytest.mark.parametrize("two_inputs", [True, False])
def test_stats_match_eager(shape, dtype, temperature, two_inputs) -> None:
    a, b, _ = case(shape, dtype)
    if shape[0] >= 8:
        a, b = edge_rows(a, b)
    bb = b if two_inputs else None
    got = cpu.kl_stats(a, bb, temperature=temperature, dtype=F32)
    want = eager.kl_stats(a, bb, temperature=temperature, dtype=F32)
    assert got.shape == want.shape == (4 if two_inputs else 2, shape[0]) and got.dtype == F32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    if shape[0] >= 8:
        check_edge_rows(got, two_inputs)


def test_entropy_off_keeps_the_other_rows_and_mixed_dtypes() -> None:
    a, b, _ = case((6, 500), BF16)
    want = eager.kl_stats(a, b.float(), temperature=1.0, dtype=F32)
    got = cpu.kl_stats(a, b.float(), temperature=1.0, dtype=F32, entropy=False)
    rows = [_stats.LA, _stats.LB, _stats.KL]
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-5, atol=1e-6)


def test_views_threads_and_rows_are_independent() -> None:
    a, b, _ = case((40, 400), F32)
    view_a, view_b = a[1:37, 50:333], b[1:37, 50:333]  # row stride 400, 283 columns
    want = eager.kl_stats(view_a, view_b, temperature=1.0, dtype=F32)
    torch.testing.assert_close(cpu.kl_stats(view_a, view_b, temperature=1.0, dtype=F32), want, rtol=1e-5, atol=1e-6)
    transposed = cpu.kl_stats(a.t().contiguous().t(), b, temperature=1.0, dtype=F32)  # column stride != 1: copied
    torch.testing.assert_close(transposed, cpu.kl_stats(a, b, temperature=1.0, dtype=F32))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.kl_stats(a, b, temperature=1.0, dtype=F32)
    finally:
        torch.set_num_threads(threads)
    # rows are computed independently: the thread count changes nothing, not even a bit
    assert torch.equal(one, cpu.kl_stats(a, b, temperature=1.0, dtype=F32))
    assert torch.equal(cpu.kl_stats(a[:7], b[:7], temperature=1.0, dtype=F32), one[:, :7])


def test_float64_compute_is_rejected() -> None:
    a, b, _ = case((3, 40), F32)
    with pytest.raises(TypeError, match="compute in float32"):
        cpu.kl_stats(a, b, temperature=1.0, dtype=torch.float64)


@pytest.mark.parametrize(
    ("shape", "dtype", "temperature", "present", "two_inputs"),
    [
        ((6, 300), F32, 0.7, "kepqt", True),
        ((6, 300), BF16, 1.0, "kept", True),
        ((3, 1271), F32, 0.7, "kqt", True),
        ((3, 1271), F16, 1.0, "ept", False),
        ((6, 300), F32, 1.0, "e", True),
        ((6, 300), F32, 0.7, "kepq", True),
        ((4, 40_000), F32, 1.0, "kept", True),
    ],
)
def test_grads_match_eager(shape, dtype, temperature, present, two_inputs) -> None:
    check_kl_grads_against_eager(cpu.kl_grads, shape, dtype, temperature, present, two_inputs)


def test_grads_of_padded_and_underflowing_columns_are_zero_and_finite() -> None:
    a, b, tokens = case((6, 300), F32)
    inputs = saved(a, b, tokens, 1.0, "kept")
    grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
    cpu.kl_grads(a, b, temperature=1.0, dtype=F32, inputs=inputs, grad_a=grad_a, grad_b=grad_b)
    assert torch.isfinite(grad_a).all() and torch.isfinite(grad_b).all()
    assert (grad_a[:, -3:] == 0).all() and (grad_b[:, -3:] == 0).all()
    assert grad_a[0, 5] == 0  # P underflows there: no gradient to a ...
    assert grad_b[0, 5] != 0  # ... but Q's mass there still pulls on b


@pytest.mark.parametrize(("shape", "dtype", "temperature"), [((41, 1271), F32, 1.0), ((7, 300), BF16, 0.7)])
def test_public_api_matches_eager_values_and_gradients(shape, dtype, temperature) -> None:
    check_public_api_against_eager("compiled", shape, dtype, temperature)


def test_the_source_ships_with_the_package() -> None:
    assert 'extern "C" void kernel(' in cpu.source()


def test_a_row_with_both_nan_and_inf_reports_nan() -> None:
    a, b, _ = case((4, 3000), F32)
    a[1, 7], a[1, 2000] = float("inf"), float("nan")
    b[2, 9], b[2, 10] = float("nan"), float("inf")
    got = cpu.kl_stats(a, b, temperature=1.0, dtype=F32)
    want = eager.kl_stats(a, b, temperature=1.0, dtype=F32)
    assert got[_stats.LA, 1].isnan() and want[_stats.LA, 1].isnan()
    assert got[_stats.LB, 2].isnan() and want[_stats.LB, 2].isnan()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize(
    ("shape", "dtype", "temperature"), [((9, 300), F32, 1.0), ((9, 1271), BF16, 0.7), ((9, 70_000), F32, 0.7)]
)
def test_log_sum_exps_alone_match_eager_with_the_edge_rows(shape, dtype, temperature) -> None:
    # JSD's first round: kl_stats(kl=False, entropy=False) skips the third pass and stores nothing
    a, b, _ = case(shape, dtype)
    a, b = edge_rows(a, b)
    a[8] = float("-inf")
    a[8, 3] = float("nan")  # a NaN among -inf: NaN, not the -inf of a row without mass
    rows = [_stats.LA, _stats.LB]
    got = cpu.kl_stats(a, b, temperature=temperature, dtype=F32, entropy=False, kl=False)
    want = eager.kl_stats(a, b, temperature=temperature, dtype=F32, entropy=False, kl=False)
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert got[_stats.LA, 2] == float("-inf") and got[_stats.LB, 2] == float("-inf")
    assert got[_stats.LB, 6] == float("-inf") and got[_stats.LA, 7] == float("-inf")
    assert got[_stats.LA, 3].isnan() and got[_stats.LA, 8].isnan() and got[_stats.LA, 4] == float("inf")
    full = cpu.kl_stats(a, b, temperature=temperature, dtype=F32, entropy=False)
    torch.testing.assert_close(got[rows], full[rows], rtol=1e-6, atol=1e-6, equal_nan=True)
    alone = cpu.kl_stats(a, None, temperature=temperature, dtype=F32, entropy=False, kl=False)
    torch.testing.assert_close(alone[_stats.LA], got[_stats.LA], rtol=0.0, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("impl", ["compiled", "eager"])
def test_leaves_with_far_apart_peaks_merge_to_a_finite_kl(impl) -> None:
    # issue 18 item 7: a long row's leaves (32k columns each) merge by the chain rule in the direct form
    # w x - w + v where x = log w - log v < -1; w (x + expm1(-x)) overflows (fp32 at x < -88, double at x < -709)
    options = shardkl.Options(impl=impl)
    for peak in (100.0, 725.0):
        a, b = torch.zeros(1, 65536), torch.zeros(1, 65536)
        a[0, 0], b[0, 40000] = peak, peak
        got = shardkl.exact_kl(a, b, options=options)
        assert torch.isfinite(got).all(), (peak, got)
        torch.testing.assert_close(got.double(), reference(a, b)["exact_kl"], rtol=1e-6, atol=0.0)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 65536, generator=g) * 3, torch.randn(4, 65536, generator=g) * 3
    a[:, 0] += 30.0
    b[:, 40000] += 30.0
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = shardkl.exact_kl(x, y, temperature=0.3, options=options)
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    torch.testing.assert_close(got.double(), reference(a, b, temperature=0.3)["exact_kl"], rtol=1e-5, atol=0.0)
