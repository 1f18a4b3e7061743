"""The C++ CPU kernels of the JSD and top-k ops (``shardkl.kernels.cpu``): against the eager kernels and float64
references, entry by entry (edge rows, views, half inputs, temperature, empty blocks) and through the public API
(``impl="compiled"``, logits and ``LinearLogits`` sources)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pytest
import torch

import shardkl
from shardkl import _dispatch
from shardkl.kernels import cpu, eager
from tests._distill_reference import bucket_reference, jsd_reference, teacher_topk
from tests.kernels.cases import case, edge_rows

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
NEG_INF = float("-inf")


pytestmark = pytest.mark.usefixtures("cpu_built")


@pytest.fixture
def native(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Calls of the native JSD and top-k entries through the public API, counted; a fallback (its warning) fails."""
    calls = dict.fromkeys(("jsd_terms", "jsd_grads", "topk_stats", "topk_grads"), 0)

    def counted(entry: str):  # noqa: ANN202
        fn = getattr(cpu.KERNELS, entry)

        def call(*args: object, **kwargs: object) -> object:
            calls[entry] += 1
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(_dispatch, "_resolved", {})
    monkeypatch.setattr(cpu, "KERNELS", cpu.KERNELS.replace(**{e: counted(e) for e in calls}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield calls


def _lse(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Float32 global log-sum-exps of raw logits, as the JSD op's first round hands them to the kernels."""
    return torch.logsumexp(x.double() / temperature, dim=-1).float()


def _jsd_reference_terms(
    a: torch.Tensor, b: torch.Tensor, temperature: float, lse_a: torch.Tensor, lse_b: torch.Tensor, beta: float
) -> torch.Tensor:
    """``[2, rows]`` float64 sums of the terms ``w g(x)`` of KL(P‖M) and KL(Q‖M) with the given log-sum-exps, each
    term from ``d = log P - log Q`` (``x = -log1p((1-β) expm1(-d))``, ``g(x) = x + expm1(-x)``), so that a tiny
    divergence keeps its digits in double too; ``w x - w + m`` where ``x < -1``, and ``m`` where ``w = 0``."""
    log_p = a.double() / temperature - lse_a.double().unsqueeze(-1)
    log_q = b.double() / temperature - lse_b.double().unsqueeze(-1)
    p, q = log_p.exp(), log_q.exp()
    m = beta * p + (1 - beta) * q
    d = log_p - log_q
    x = -torch.log1p((1 - beta) * torch.expm1(-d))
    y = -torch.log1p(beta * torch.expm1(d))

    def term(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gap = torch.where(v < -1, w * v - w + m, w * (v + torch.expm1(-v)))
        return torch.where(w > 0, gap, m).sum(-1)

    return torch.stack([term(p, x), term(q, y)])


def _jsd_inputs(
    shape: tuple[int, int], dtype: torch.dtype, temperature: float, edges: bool
) -> tuple[torch.Tensor, ...]:
    a, b, _ = case(shape, dtype)
    if edges:
        a, b = edge_rows(a, b)
    return a, b, _lse(a, temperature), _lse(b, temperature)


# --- JSD terms ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "temperature"),
    [((9, 300), F32, 1.0), ((9, 1271), BF16, 0.7), ((8, 1000), F16, 1.3), ((9, 70_000), F32, 0.7), ((3, 17), F32, 1.0)],
)
@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9])
def test_jsd_terms_match_eager_and_float64(shape, dtype, temperature, beta) -> None:
    a, b, lse_a, lse_b = _jsd_inputs(shape, dtype, temperature, edges=shape[0] >= 8)
    kwargs = dict(temperature=temperature, dtype=F32, lse_a=lse_a, lse_b=lse_b, beta=beta)
    got = cpu.jsd_terms(a, b, **kwargs)
    assert got.shape == (2, shape[0]) and got.dtype == F64
    finite = torch.isfinite(lse_a) & torch.isfinite(lse_b)  # the other rows may hold anything
    assert (got[:, finite] >= 0).all()
    torch.testing.assert_close(got[:, finite], eager.jsd_terms(a, b, **kwargs)[:, finite], rtol=2e-5, atol=1e-9)
    want = _jsd_reference_terms(a, b, temperature, lse_a, lse_b, beta)
    torch.testing.assert_close(got[:, finite], want[:, finite], rtol=2e-6, atol=1e-10)


@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9, 0.02])
@pytest.mark.parametrize("spread", [0.05, 0.3, 1.0, 4.0])
def test_jsd_terms_where_series_and_logs_meet(beta, spread) -> None:
    # |log P - log Q| on both sides of the series' bound (0.4) inside the same vectors, and far beyond (|d| > 30)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 999, generator=g) * 2
    b = a + spread * torch.randn(6, 999, generator=g)
    b[0, ::7] -= 40.0
    a[1, ::5] -= 40.0
    lse_a, lse_b = _lse(a, 1.0), _lse(b, 1.0)
    got = cpu.jsd_terms(a, b, temperature=1.0, dtype=F32, lse_a=lse_a, lse_b=lse_b, beta=beta)
    want = _jsd_reference_terms(a, b, 1.0, lse_a, lse_b, beta)
    assert (got >= 0).all()
    torch.testing.assert_close(got, want, rtol=3e-6, atol=1e-12)


def test_jsd_terms_of_identical_inputs_are_zero_and_views_are_read_in_place() -> None:
    a, _, _ = case((40, 400), F32)
    lse = _lse(a, 1.0)
    got = cpu.jsd_terms(a, a.clone(), temperature=1.0, dtype=F32, lse_a=lse, lse_b=lse, beta=0.3)
    assert (got == 0).all()
    a, b, _ = case((40, 400), F32)
    view_a, view_b = a[1:37, 50:333], b[1:37, 50:333]  # row stride 400, 283 columns
    lse_a, lse_b = _lse(view_a, 1.0), _lse(view_b, 1.0)
    kwargs = dict(temperature=1.0, dtype=F32, lse_a=lse_a, lse_b=lse_b, beta=0.5)
    want = cpu.jsd_terms(view_a.contiguous(), view_b.contiguous(), **kwargs)
    assert torch.equal(cpu.jsd_terms(view_a, view_b, **kwargs), want)
    torch.testing.assert_close(want, eager.jsd_terms(view_a, view_b, **kwargs), rtol=2e-5, atol=1e-9)
    # a transposed view (column stride != 1) is copied, the same numbers come out
    assert torch.equal(cpu.jsd_terms(view_a.t().contiguous().t(), view_b, **kwargs), want)


@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_jsd_terms_of_a_tiny_divergence_over_few_columns(beta) -> None:
    # nothing averages out over 8 to 200 columns: each term must keep its digits. b - a is exact in fp32 here (no
    # offset), so d = log P - log Q is exact to 1e-8 relative, and the series in d give every term to ~1e-6 (log1p of
    # M/P - 1 would lose 1e-3: the rounding of P and Q over their difference, d ~ 1e-4)
    g = torch.Generator().manual_seed(0)
    for vocab in (8, 33, 200):
        a = torch.randn(256, vocab, generator=g, dtype=F64)
        b = (a + 1e-4 * torch.randn(256, vocab, generator=g, dtype=F64)).float()
        a = a.float()
        lse_a, lse_b = _lse(a, 1.0), _lse(b, 1.0)
        got = cpu.jsd_terms(a, b, temperature=1.0, dtype=F32, lse_a=lse_a, lse_b=lse_b, beta=beta)
        want = _jsd_reference_terms(a, b, 1.0, lse_a, lse_b, beta)
        assert (got > 0).all()
        worst = ((got - want).abs() / want).max().item()
        assert worst < 1e-5, (vocab, worst)


def test_jsd_tiny_divergence_keeps_its_digits_at_a_152k_vocabulary() -> None:
    # b = a + eps noise + 3: JSD_0.5 ~ eps^2 / 8 ~ 1.2e-9 per token. Against float64 with the same float32 log-sum-exps
    # the kernel's error is its own (measured 1.3e-5); eager's d = log P - log Q rounds at the scale of log P (1e-4)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 152_064, generator=g, dtype=F64)
    b = (a + 1e-4 * torch.randn(16, 152_064, generator=g, dtype=F64) + 3).float()
    a = a.float()
    lse_a, lse_b = _lse(a, 1.0), _lse(b, 1.0)
    got = cpu.jsd_terms(a, b, temperature=1.0, dtype=F32, lse_a=lse_a, lse_b=lse_b, beta=0.5)
    want = _jsd_reference_terms(a, b, 1.0, lse_a, lse_b, 0.5)
    assert (want > 5e-10).all() and (want < 5e-9).all()
    assert (got > 0).all()
    worst = ((got - want).abs() / want).max().item()
    assert worst < 1e-4, worst


# --- JSD gradients ------------------------------------------------------------------------------------------------


def _jsd_grad_inputs(a, b, temperature, beta, seed=5):  # noqa: ANN001, ANN202
    lse_a, lse_b = _lse(a, temperature), _lse(b, temperature)
    terms = _jsd_reference_terms(a, b, temperature, lse_a, lse_b, beta).float()
    grad = torch.randn(a.shape[0], generator=torch.Generator().manual_seed(seed))
    # the op sends 0 to rows without a distribution on either side
    grad = torch.where(torch.isfinite(lse_a) & torch.isfinite(lse_b), grad, 0.0)
    grad[1] = 0.0
    return dict(temperature=temperature, dtype=F32, lse_a=lse_a, lse_b=lse_b, kl_pm=terms[0], kl_qm=terms[1],
                grad=grad, beta=beta)


def _jsd_reference_grads(a, b, kw):  # noqa: ANN001, ANN202
    t, beta = kw["temperature"], kw["beta"]
    log_p = a.double() / t - kw["lse_a"].double().unsqueeze(-1)
    log_q = b.double() / t - kw["lse_b"].double().unsqueeze(-1)
    p, q = log_p.exp(), log_q.exp()
    log_m = (beta * p + (1 - beta) * q).log()
    g = kw["grad"].double().unsqueeze(-1)
    ga = torch.where(p > 0, beta * g * p * (log_p - log_m - kw["kl_pm"].double().unsqueeze(-1)) / t, 0.0)
    gb = torch.where(q > 0, (1 - beta) * g * q * (log_q - log_m - kw["kl_qm"].double().unsqueeze(-1)) / t, 0.0)
    return torch.where(g == 0, 0.0, ga), torch.where(g == 0, 0.0, gb)


@pytest.mark.parametrize(
    ("shape", "dtype", "temperature", "beta"),
    [((9, 300), F32, 1.0, 0.5), ((9, 1271), BF16, 0.7, 0.1), ((8, 1000), F16, 1.3, 0.9), ((9, 40_000), F32, 0.7, 0.5)],
)
def test_jsd_grads_match_eager_and_float64(shape, dtype, temperature, beta) -> None:
    a, b, _ = case(shape, dtype)
    a, b = edge_rows(a, b)
    kw = _jsd_grad_inputs(a, b, temperature, beta)
    got_a, got_b = torch.full_like(a, 7.0), torch.full_like(b, 7.0)
    cpu.jsd_grads(a, b, grad_a=got_a, grad_b=got_b, **kw)
    want_a, want_b = torch.empty_like(a), torch.empty_like(b)
    eager.jsd_grads(a, b, grad_a=want_a, grad_b=want_b, **kw)
    tol = 1e-5 if dtype == F32 else 1e-2
    torch.testing.assert_close(got_a, want_a, rtol=tol, atol=tol * 1e-3)
    torch.testing.assert_close(got_b, want_b, rtol=tol, atol=tol * 1e-3)
    ref_a, ref_b = _jsd_reference_grads(a, b, kw)
    torch.testing.assert_close(got_a.double(), ref_a.to(dtype).double(), rtol=tol, atol=tol * 1e-3)
    torch.testing.assert_close(got_b.double(), ref_b.to(dtype).double(), rtol=tol, atol=tol * 1e-3)
    # -inf columns, P = 0 where Q has mass, and a row without incoming gradient: exactly 0, never NaN
    assert torch.isfinite(got_a).all() and torch.isfinite(got_b).all()
    assert (got_a[:, -3:] == 0).all() and (got_b[:, -3:] == 0).all()
    assert got_a[0, 5] == 0 and got_b[0, 5] != 0
    assert (got_a[1] == 0).all() and (got_b[1] == 0).all() and (got_a[2] == 0).all()


def test_jsd_grads_of_a_tiny_divergence_over_few_columns() -> None:
    # the gradient is ~ P x: x = log P - log M ~ 1e-4 must keep its digits (see the terms' test above)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(128, 33, generator=g, dtype=F64)
    b = (a + 1e-4 * torch.randn(128, 33, generator=g, dtype=F64)).float()
    a = a.float()
    kw = _jsd_grad_inputs(a, b, 1.0, 0.3)
    got_a, got_b = torch.empty_like(a), torch.empty_like(b)
    cpu.jsd_grads(a, b, grad_a=got_a, grad_b=got_b, **kw)
    ref_a, ref_b = _jsd_reference_grads(a, b, kw)
    for got, ref in ((got_a, ref_a), (got_b, ref_b)):
        worst = ((got.double() - ref).abs().amax(-1) / ref.abs().amax(-1).clamp_min(1e-30)).max().item()
        assert worst < 1e-5, worst


def test_jsd_grads_of_one_side_only_and_where_series_and_logs_meet() -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(5, 777, generator=g) * 2
    b = a + torch.randn(5, 777, generator=g) * torch.linspace(0.01, 3, 777)
    kw = _jsd_grad_inputs(a, b, 1.0, 0.3)
    ref_a, ref_b = _jsd_reference_grads(a, b, kw)
    only_a, only_b = torch.empty_like(a), torch.empty_like(b)
    cpu.jsd_grads(a, b, grad_a=only_a, grad_b=None, **kw)
    cpu.jsd_grads(a, b, grad_a=None, grad_b=only_b, **kw)
    # (absolute: where x - KL(P‖M) cancels, the gradient is small and carries x's rounding)
    torch.testing.assert_close(only_a.double(), ref_a, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(only_b.double(), ref_b, rtol=1e-5, atol=1e-8)
    # a float64 output is written through a temporary in the input's dtype
    wide = torch.empty(a.shape, dtype=F64)
    cpu.jsd_grads(a, b, grad_a=wide, grad_b=None, **kw)
    assert torch.equal(wide, only_a.double())


# --- top-k stats --------------------------------------------------------------------------------------------------


def _ids(rows: int, cols: int, k: int, seed: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(cols, generator=g)[:k] for _ in range(rows)])


def _topk_reference(s: torch.Tensor, temperature: float, ids: torch.Tensor) -> torch.Tensor:
    """``[2, rows]`` float64 log-sum-exps of the block and of its columns outside ``ids`` (any value: outside)."""
    x = s.double() / temperature
    inside = (ids >= 0) & (ids < x.shape[1])
    held = torch.zeros(x.shape[0], x.shape[1] + 1, dtype=torch.bool)
    held.scatter_(1, torch.where(inside, ids, x.shape[1]), True)
    tail = x.masked_fill(held[:, :-1], NEG_INF)
    return torch.stack([torch.logsumexp(x, -1), torch.logsumexp(tail, -1)])


@pytest.mark.parametrize(
    ("shape", "dtype", "temperature", "k"),
    [((9, 300), F32, 1.0, 8), ((9, 1271), BF16, 0.7, 32), ((8, 1000), F16, 1.3, 5), ((9, 70_000), F32, 0.7, 40),
     ((3, 17), F32, 1.0, 17), ((4, 50), F32, 1.0, 0)],
)
def test_topk_stats_match_eager_and_float64(shape, dtype, temperature, k) -> None:
    s, _, _ = case(shape, dtype)
    rows, cols = shape
    ids = _ids(rows, cols, k)
    if k and rows > 2:
        ids[0, 0], ids[1, -1] = -5, cols + 3  # not in this block
        ids[2, 0] = 5  # the column where row 0's P underflows
    if rows >= 8:
        s = edge_rows(s, s)[0]
        s[5, ids[5, 0]] = float("nan")  # a NaN among the ids: the lse is NaN, the tail's is not
        s[6, ids[6, 0]] = float("inf")  # +inf among the ids: the lse is +inf, the tail's is finite
        s[7, :] = NEG_INF
        s[7, ids[7, 0]] = 3.0  # the only mass at an id: the tail is empty
    got = cpu.topk_stats(s, temperature=temperature, dtype=F32, ids=ids)
    want = eager.topk_stats(s, temperature=temperature, dtype=F32, ids=ids)
    assert got.shape == (2, rows) and got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-7, atol=2e-7, equal_nan=True)
    torch.testing.assert_close(got, _topk_reference(s, temperature, ids), rtol=1e-7, atol=2e-7, equal_nan=True)
    if rows >= 8:
        assert got[0, 2] == NEG_INF and got[1, 2] == NEG_INF
        assert got[0, 3].isnan() and got[1, 3].isnan() and got[0, 4] == float("inf")
        assert got[0, 5].isnan() and torch.isfinite(got[1, 5])
        assert got[0, 6] == float("inf") and torch.isfinite(got[1, 6])
        assert got[1, 7] == NEG_INF and got[0, 7] == pytest.approx(3.0 / temperature)


def test_topk_tail_far_below_the_ids_keeps_its_own_log_sum_exp() -> None:
    s = torch.tensor([[110.0, 0.0, 0.0], [0.0, 300.0, -50.0], [5.0, 4.0, -1e4]])
    ids = torch.tensor([[0], [1], [0]])
    got = cpu.topk_stats(s, temperature=1.0, dtype=F32, ids=ids)
    assert got[1, 0] == pytest.approx(math.log(2), rel=1e-12)
    assert got[1, 1] == pytest.approx(math.log1p(math.exp(-50.0)), rel=1e-12)
    torch.testing.assert_close(got, _topk_reference(s, 1.0, ids), rtol=1e-8, atol=1e-7)
    # at a low temperature every row's tail is far below its max, over a long row too
    s, _, _ = case((4, 40_000), F32)
    s[:, 0] += 60.0
    ids = _ids(4, 40_000, 16)
    ids[:, 0] = 0
    got = cpu.topk_stats(s, temperature=0.2, dtype=F32, ids=ids)
    # s / T rounds to fp32 at ~300 (as in eager): 1e-7 relative against float64
    torch.testing.assert_close(got, eager.topk_stats(s, temperature=0.2, dtype=F32, ids=ids), rtol=5e-8, atol=0.0)
    torch.testing.assert_close(got, _topk_reference(s, 0.2, ids), rtol=1e-7, atol=0.0)


@pytest.mark.parametrize("max_at_an_id", [True, False])
def test_topk_tail_log_sum_exp_is_accurate_in_double(max_at_an_id) -> None:
    # the buckets compare the tail's log-sum-exp with the ids' logits directly: its error must stay far below 1e-7.
    # The student's max among the ids (the usual case: one pass around it) or not (the sums again around the max)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 32_000, generator=g) * 3
    ids = _ids(64, 32_000, 20)
    ids[:, 0] = s.argmax(-1) if max_at_an_id else s.argmin(-1)
    err = cpu.topk_stats(s, temperature=1.0, dtype=F32, ids=ids) - _topk_reference(s, 1.0, ids)
    assert err.abs().max() < 2e-8, err.abs().max()
    assert err.mean().abs() < 2e-9, err.mean()  # no bias: a sum of exponentials each off the same way


# --- top-k gradients ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "temperature", "k"),
    [((9, 300), F32, 1.0, 8), ((9, 1271), BF16, 0.7, 32), ((8, 1000), F16, 1.3, 5), ((5, 40_000), F32, 0.7, 40)],
)
def test_topk_grads_match_eager(shape, dtype, temperature, k) -> None:
    s, _, _ = case(shape, dtype)
    rows, cols = shape
    ids = _ids(rows, cols, k)
    ids[0, 0], ids[1, -1] = -5, cols + 3
    lse_excl = _topk_reference(s, temperature, ids)[1].float()
    lse_excl[2] = NEG_INF  # no tail: no tail gradient, the ids' still
    g = torch.Generator().manual_seed(8)
    kwargs = dict(temperature=temperature, dtype=F32, ids=ids, lse_excl=lse_excl,
                  tail_coef=torch.randn(rows, generator=g), id_coef=torch.randn(rows, k, generator=g))
    got, want = torch.full_like(s, 7.0), torch.empty_like(s)
    cpu.topk_grads(s, grad_s=got, **kwargs)
    eager.topk_grads(s, grad_s=want, **kwargs)
    # exp(s / T - lse) of s / T rounded in fp32 (s * (1 / T) here, s / T in eager): 1e-6 relative at |s / T| ~ 10
    tol = 1e-5 if dtype == F32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * 1e-3)
    inside = (ids >= 0) & (ids < cols)
    held = torch.zeros(rows, cols + 1, dtype=torch.bool).scatter_(1, torch.where(inside, ids, cols), True)[:, :-1]
    # every column written, -inf tail columns and the tail of a row without one exactly 0
    assert torch.isfinite(got).all() and (got[:, -3:][~held[:, -3:]] == 0).all()
    assert (got[2][~held[2]] == 0).all()
    cols_held = ids[3]
    torch.testing.assert_close(got[3, cols_held].float(), (kwargs["id_coef"][3] / temperature).to(dtype).float())


def test_topk_grads_of_the_110_0_0_student_keep_the_tail() -> None:
    # issue 18 item 8: the tail's share exp(s - lse_excl) is 1/2 per column, not exp(-110) / S_tail
    s = torch.tensor([[110.0, 0.0, 0.0]])
    grad = torch.empty_like(s)
    cpu.topk_grads(s, temperature=1.0, dtype=F32, ids=torch.tensor([[0]]), lse_excl=torch.tensor([math.log(2)]),
                   tail_coef=torch.tensor([-0.1]), id_coef=torch.tensor([[0.1]]), grad_s=grad)
    torch.testing.assert_close(grad, torch.tensor([[0.1, -0.05, -0.05]]))


def test_empty_blocks() -> None:
    for rows, cols in ((0, 50), (4, 0)):
        a, b = torch.randn(rows, cols), torch.randn(rows, cols)
        lse = torch.zeros(rows)
        assert torch.equal(cpu.jsd_terms(a, b, temperature=1.0, dtype=F32, lse_a=lse, lse_b=lse, beta=0.5),
                           torch.zeros(2, rows, dtype=F64))
        ids = torch.zeros(rows, 3, dtype=torch.int64)
        assert torch.equal(cpu.topk_stats(a, temperature=1.0, dtype=F32, ids=ids), torch.full((2, rows), NEG_INF,
                                                                                            dtype=F64))
        grad = torch.empty(rows, cols)
        cpu.topk_grads(a, temperature=1.0, dtype=F32, ids=ids, lse_excl=lse, tail_coef=lse,
                       id_coef=torch.zeros(rows, 3), grad_s=grad)
        cpu.jsd_grads(a, b, temperature=1.0, dtype=F32, lse_a=lse, lse_b=lse, kl_pm=lse, kl_qm=lse, grad=lse, beta=0.5,
                      grad_a=grad, grad_b=None)


def test_float64_compute_is_rejected() -> None:
    s = torch.randn(2, 5)
    with pytest.raises(TypeError, match="compute in float32"):
        cpu.topk_stats(s, temperature=1.0, dtype=F64, ids=torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="compute in float32"):
        cpu.jsd_terms(s, s, temperature=1.0, dtype=F64, lse_a=s[:, 0], lse_b=s[:, 0], beta=0.5)


# --- through the public API ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "temperature", "beta"), [(F32, 1.0, 0.5), (F32, 0.7, 0.2), (BF16, 1.3, 0.9)])
def test_jsd_public_api_matches_eager_and_float64(native, dtype, temperature, beta) -> None:
    a, b, _ = case((41, 1271), dtype)
    w = torch.randn(41, generator=torch.Generator().manual_seed(9))
    results = {}
    for impl in ("eager", "compiled"):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        value = shardkl.jsd(x, y, beta=beta, temperature=temperature, options=shardkl.Options(impl=impl))
        (value * w).sum().backward()
        results[impl] = (value, x.grad, y.grad)
    assert native["jsd_terms"] == 1 and native["jsd_grads"] == 1
    (v_e, ga_e, gb_e), (v_c, ga_c, gb_c) = results["eager"], results["compiled"]
    # eager's d = log P - log Q rounds at the scale of log P (1e-6): its gradients carry that, ours do not
    tol = 1e-5 if dtype == F32 else 1e-2
    torch.testing.assert_close(v_c, v_e, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ga_c, ga_e, rtol=tol, atol=1e-7)
    torch.testing.assert_close(gb_c, gb_e, rtol=tol, atol=1e-7)
    x, y = a.double().requires_grad_(), b.double().requires_grad_()
    want = jsd_reference(x[:, :-3], y[:, :-3], beta, temperature)
    (want * w.double()).sum().backward()
    torch.testing.assert_close(v_c.double(), want.detach(), rtol=1e-5, atol=1e-7)
    # the float32 rounding of the global log-sum-exps (the op's, 5e-7) moves log P - log M by as much
    torch.testing.assert_close(ga_c.double()[:, :-3], x.grad[:, :-3].to(dtype).double(), rtol=tol, atol=1e-7)
    torch.testing.assert_close(gb_c.double()[:, :-3], y.grad[:, :-3].to(dtype).double(), rtol=tol, atol=1e-7)


def test_jsd_public_api_tiny_divergence_at_a_152k_vocabulary(native) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 152_064, generator=g, dtype=F64)
    b = (a + 1e-4 * torch.randn(16, 152_064, generator=g, dtype=F64) + 3).float()
    a = a.float()
    got = shardkl.jsd(a, b, beta=0.5, options=shardkl.Options(impl="compiled")).double()
    want = jsd_reference(a, b, 0.5)
    assert native["jsd_terms"] == 1 and (want < 5e-9).all()
    assert (got > 0).all()
    # measured 7e-5 (eager 1e-4): most of it is the float32 rounding of the global log-sum-exps the op passes on
    worst = ((got - want).abs() / want).max().item()
    assert worst < 3e-4, worst


@pytest.mark.parametrize("sides", ["both", "student"])
def test_jsd_from_hidden_states(native, sides) -> None:
    g = torch.Generator().manual_seed(2)
    h_t, w_t = torch.randn(6, 16, generator=g), torch.randn(700, 16, generator=g) * 0.5
    h_s, w_s = torch.randn(6, 9, generator=g), torch.randn(700, 9, generator=g) * 0.5
    leaves = [h_s, w_s] + ([h_t, w_t] if sides == "both" else [])
    for leaf in leaves:
        leaf.requires_grad_()
    teacher = shardkl.LinearLogits(h_t, w_t)
    student = shardkl.LinearLogits(h_s, w_s)
    value = shardkl.jsd(teacher, student, beta=0.3, temperature=0.8, options=shardkl.Options(impl="compiled"))
    value.sum().backward()
    assert native["jsd_terms"] > 1 and native["jsd_grads"] > 1  # one call per [R, C] tile
    ref = [leaf.detach().double().requires_grad_() for leaf in leaves]
    t_ref = (ref[2] @ ref[3].T) if sides == "both" else (h_t.double() @ w_t.double().T)
    want = jsd_reference(t_ref, ref[0] @ ref[1].T, 0.3, 0.8)
    want.sum().backward()
    torch.testing.assert_close(value.double(), want.detach(), rtol=1e-5, atol=1e-7)
    for leaf, leaf_ref in zip(leaves, ref, strict=True):
        torch.testing.assert_close(leaf.grad.double(), leaf_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize(("k", "temperature"), [(1, 1.0), (20, 0.7), (299, 1.0)])
def test_topk_public_api_matches_eager_and_float64(native, direction, k, temperature) -> None:
    g = torch.Generator().manual_seed(12)
    student = torch.randn(7, 300, generator=g) * 2
    teacher = student.double() + 0.8 * torch.randn(7, 300, generator=g, dtype=F64)
    ids, logprobs = teacher_topk(teacher, k)
    logprobs = logprobs.float()
    w = torch.randn(7, generator=g)
    results = {}
    for impl in ("eager", "compiled"):
        s = student.clone().requires_grad_()
        value = shardkl.topk_kl(s, ids, logprobs, direction=direction, temperature=temperature,
                                options=shardkl.Options(impl=impl))
        (value * w).sum().backward()
        results[impl] = (value, s.grad)
    assert native["topk_stats"] == 1 and native["topk_grads"] == 1
    torch.testing.assert_close(results["compiled"][0], results["eager"][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results["compiled"][1], results["eager"][1], rtol=1e-5, atol=1e-8)
    s = student.double().requires_grad_()
    want = bucket_reference(s, ids, logprobs, direction, temperature)
    (want * w.double()).sum().backward()
    torch.testing.assert_close(results["compiled"][0].double(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results["compiled"][1].double(), s.grad, rtol=1e-5, atol=1e-7)


def test_topk_with_every_id_is_the_exact_kl_and_a_teacher_without_tail(native) -> None:
    g = torch.Generator().manual_seed(13)
    student = torch.randn(5, 64, generator=g) * 2
    teacher = student + torch.randn(5, 64, generator=g)
    # K = V: the buckets are the vocabulary
    ids, logprobs = teacher_topk(teacher.double(), 64)
    got = shardkl.topk_kl(student, ids, logprobs.float(), options=shardkl.Options(impl="compiled"))
    want = shardkl.exact_kl(teacher, student, options=shardkl.Options(impl="eager"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a teacher whose 10 ids hold all its mass: forward KL gets nothing from the student's tail but its gradient
    ids, logprobs = teacher_topk(teacher.double(), 10)
    logprobs = logprobs - torch.logsumexp(logprobs, -1, keepdim=True)
    s = student.clone().requires_grad_()
    value = shardkl.topk_kl(s, ids, logprobs.float(), options=shardkl.Options(impl="compiled"))
    value.sum().backward()
    s64 = student.double().requires_grad_()
    want = bucket_reference(s64, ids, logprobs, "forward")
    want.sum().backward()
    torch.testing.assert_close(value.double(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)


def test_topk_tail_gradient_survives_an_underflowing_student(native) -> None:
    # issue 18 item 8 through the public API: S_tail = e^-110 underflows in fp32, its gradient must not
    s = torch.tensor([[110.0, 0.0, 0.0]], requires_grad=True)
    value = shardkl.topk_kl(s, torch.tensor([[0]]), torch.tensor([[math.log(0.9)]]),
                            options=shardkl.Options(impl="compiled"))
    value.sum().backward()
    assert native["topk_grads"] == 1
    torch.testing.assert_close(s.grad, torch.tensor([[0.1, -0.05, -0.05]]))
    s64 = s.detach().double().requires_grad_()
    bucket_reference(s64, torch.tensor([[0]]), torch.tensor([[math.log(0.9)]], dtype=F64), "forward").sum().backward()
    torch.testing.assert_close(s.grad.double(), s64.grad)


def test_topk_from_hidden_states(native) -> None:
    g = torch.Generator().manual_seed(14)
    h, w = torch.randn(6, 9, generator=g, requires_grad=True), torch.randn(700, 9, generator=g) * 0.5
    w.requires_grad_()
    teacher = torch.randn(6, 700, generator=g, dtype=F64)
    ids, logprobs = teacher_topk(teacher, 12)
    value = shardkl.topk_kl(shardkl.LinearLogits(h, w), ids, logprobs.float(), temperature=0.9,
                            options=shardkl.Options(impl="compiled"))
    value.sum().backward()
    assert native["topk_stats"] > 1 and native["topk_grads"] > 1
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = bucket_reference(h64 @ w64.T, ids, logprobs, "forward", 0.9)
    want.sum().backward()
    torch.testing.assert_close(value.double(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
