"""Single-process tests of the public functions against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

import shardkl
from shardkl.kernels import eager
from tests.reference import reference

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def _logits(shape: tuple[int, ...], scale: float = 2.0, delta: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    b = a + delta * torch.randn(*shape, generator=g, dtype=torch.float64)
    return a, b


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force many row and vocabulary chunks so the in-rank merge is exercised."""
    monkeypatch.setattr(eager, "CHUNK_ELEMENTS", 96)
    monkeypatch.setattr(eager, "MAX_VOCAB_CHUNK", 40)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunked", [False, True])
def test_values_match_float64_reference(dtype, temperature, chunked, monkeypatch) -> None:
    if chunked:
        monkeypatch.setattr(eager, "CHUNK_ELEMENTS", 96)
        monkeypatch.setattr(eager, "MAX_VOCAB_CHUNK", 40)
    a, b = _logits((3, 7, 1003))
    a, b = a.to(dtype), b.to(dtype)
    tokens = torch.randint(0, 1003, (3, 7), generator=torch.Generator().manual_seed(1))
    ref = reference(a, b, tokens, temperature)  # the reference sees the same rounded inputs
    stats = shardkl.kl_stats(a, b, tokens, temperature=temperature)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name, want in ref.items():
        got = getattr(stats, name)
        assert got.dtype == expected_dtype and got.shape == (3, 7)
        torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype], msg=name)
    torch.testing.assert_close(
        shardkl.token_logprobs(a, tokens, temperature=temperature).double(), ref["p_logprobs"],
        rtol=TOL[dtype], atol=TOL[dtype],
    )
    torch.testing.assert_close(
        shardkl.entropy(a, temperature=temperature).double(), ref["entropy"], rtol=TOL[dtype], atol=TOL[dtype]
    )


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_gradients_match_float64_reference(temperature, small_chunks) -> None:
    a, b = _logits((5, 211))
    tokens = torch.randint(0, 211, (5,), generator=torch.Generator().manual_seed(2))
    w = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def loss(stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(w[i] * stats[k] for i, k in enumerate(["exact_kl", "entropy", "p_logprobs", "q_logprobs"])).sum()

    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = shardkl.kl_stats(a1, b1, tokens, temperature=temperature)._asdict()
    loss(got).backward()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss(reference(a2, b2, tokens, temperature)).backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, y: shardkl.exact_kl(x, y, temperature=temperature),
        (a[:2, :13].clone().requires_grad_(), b[:2, :13].clone().requires_grad_()),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_gradients_come_back_in_input_dtype(dtype) -> None:
    a, b = _logits((4, 300))
    a, b = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    shardkl.exact_kl(a, b, reduction="sum").backward()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    reference(a64, b64)["exact_kl"].sum().backward()
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    # output rounding of the gradient's own dtype, plus fp32 cancellation in Q - P (~eps_fp32 * P)
    rtol, atol = {torch.bfloat16: (1e-2, 1e-4), torch.float16: (1e-3, 1e-5), torch.float32: (1e-5, 1e-7)}[dtype]
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("target", [5e-3, 5e-5, 5e-7])
def test_small_kl_is_accurate_and_never_negative(target) -> None:
    # b = a + eps * noise + 3 as in DESIGN.md; KL ~ eps^2 * Var(a-b) / 2
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32000, generator=g) * 3
    eps = math.sqrt(2 * target)
    b = a + eps * torch.randn(16, 32000, generator=g) + 3
    ref = reference(a, b)["exact_kl"]
    got = shardkl.exact_kl(a, b).double()
    assert (got >= 0).all()
    assert ((got - ref).abs() / ref).max() <= 1e-3


def test_identical_inputs_give_exact_zero() -> None:
    a, _ = _logits((4, 9, 500))
    assert torch.equal(shardkl.exact_kl(a.float(), a.float()), torch.zeros(4, 9))


def test_padded_vocabulary_contributes_nothing(small_chunks) -> None:
    a, b = _logits((6, 100))
    pad = torch.full((6, 28), float("-inf"), dtype=torch.float64)
    ap, bp = torch.cat([a, pad], -1).requires_grad_(), torch.cat([b, pad], -1).requires_grad_()
    tokens = torch.randint(0, 100, (6,), generator=torch.Generator().manual_seed(4))
    stats = shardkl.kl_stats(ap, bp, tokens)
    ref = reference(a, b, tokens)
    for name, want in ref.items():
        torch.testing.assert_close(getattr(stats, name), want, msg=name)
    (stats.exact_kl + stats.entropy + stats.p_logprobs + stats.q_logprobs).sum().backward()
    assert torch.isfinite(ap.grad).all() and torch.isfinite(bp.grad).all()
    assert (ap.grad[:, 100:] == 0).all() and (bp.grad[:, 100:] == 0).all()


def test_mass_where_q_is_minus_inf_gives_inf() -> None:
    a, b = _logits((3, 50))
    b[1, 7] = float("-inf")
    kl = shardkl.exact_kl(a, b)
    assert math.isinf(kl[1].item()) and kl[1] > 0
    assert torch.isfinite(kl[[0, 2]]).all()
    # the other way round: Q has mass where P has none, which is finite
    a[2, 3] = float("-inf")
    assert torch.isfinite(shardkl.exact_kl(a, b)[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_q_mass_outside_p_support_counts(dtype, small_chunks) -> None:
    # columns where P is 0 (-inf logit, or a logit so low that exp underflows in fp32) but Q is not: their Q
    # mass must still enter the KL (each term's limit is Q_v, not 0)
    a, b = _logits((4, 120))
    a[0, :30] = float("-inf")
    a[1, 10:70] = -200.0
    a[2, :] = a[2] - 150.0 * (torch.arange(120) % 2)
    a, b = a.to(dtype), b.to(dtype)
    ref = reference(a, b)["exact_kl"]
    torch.testing.assert_close(shardkl.exact_kl(a, b).double(), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_p_under_large_q_does_not_overflow(impl, dtype) -> None:
    # P_v = e^-95 (fp32 can hold it) where Q_v is O(1): x = log P_v - log Q_v = -90, and g(x) = x + expm1(-x)
    # overflows fp32; the term P x - P + Q does not (it is ~Q_v)
    a = torch.tensor([[0.0, -95.0, -5.0], [0.0, -5.0, -95.0]]).to(dtype)
    b = a.flip(0)
    got = shardkl.exact_kl(a, b, options=shardkl.Options(impl=impl))
    torch.testing.assert_close(got.double(), reference(a, b)["exact_kl"], rtol=1e-5, atol=1e-7)


def test_inputs_are_not_modified(small_chunks) -> None:
    a, b = _logits((4, 77))
    a, b = a.float().requires_grad_(), b.float().requires_grad_()
    a0, b0 = a.detach().clone(), b.detach().clone()
    tokens = torch.randint(0, 77, (4,))
    stats = shardkl.kl_stats(a, b, tokens, temperature=0.5)
    (stats.exact_kl.sum() + stats.k3.sum()).backward()
    assert torch.equal(a.detach(), a0) and torch.equal(b.detach(), b0)


def test_non_contiguous_leading_dims_are_read_without_copy() -> None:
    a, b = _logits((3, 8, 97))
    tokens = torch.randint(0, 97, (3, 7))
    a_s, b_s = a[:, :-1], b[:, 1:]  # the usual logits[:, :-1] shift: not viewable as 2-D
    got = shardkl.kl_stats(a_s, b_s, tokens)
    ref = reference(a_s, b_s, tokens)
    for name, want in ref.items():
        torch.testing.assert_close(getattr(got, name), want, msg=name)
    x, y = a_s.clone().requires_grad_(), b_s.clone().requires_grad_()
    shardkl.kl_stats(x, y, tokens).k3.sum().backward()
    assert x.grad.shape == a_s.shape and torch.isfinite(x.grad).all()


def test_estimators_at_schulman_table() -> None:
    # q = N(0, 1), p = N(mu, 1), x ~ q, estimating KL(q‖p) = mu^2 / 2; bias/true and std/true as in the note
    g = torch.Generator().manual_seed(0)
    n = 2_000_000
    for mu, table in [
        (0.1, {"k1": (0.0, 20.0), "k2": (0.002, 1.42), "k3": (0.0, 1.42)}),
        (1.0, {"k1": (0.0, 2.0), "k2": (0.25, 1.73), "k3": (0.0, 1.7)}),
    ]:
        x = torch.randn(n, generator=g, dtype=torch.float64)
        logq_x = -0.5 * x**2
        logp_x = -0.5 * (x - mu) ** 2
        true = mu**2 / 2
        for name, (bias, std) in table.items():
            k = getattr(shardkl, name)(logq_x, logp_x)  # sampling distribution first
            se = k.std().item() / math.sqrt(n)
            assert abs((k.mean().item() - true) - bias * true) < 4 * se + 1e-3 * true, (mu, name)
            assert abs(k.std().item() / true - std) < 0.03 * std, (mu, name)


def test_k3_keeps_digits_for_tiny_log_ratios() -> None:
    logp = torch.zeros(3, dtype=torch.float32)
    logq = torch.tensor([1e-4, -1e-4, 1e-6], dtype=torch.float32)
    want = torch.tensor([5e-9, 5e-9, 5e-13], dtype=torch.float64)
    torch.testing.assert_close(shardkl.k3(logp, logq).double(), want, rtol=1e-3, atol=0)
    assert (shardkl.k3(logp, logq) >= 0).all()


def test_sampled_kl_matches_estimator_functions() -> None:
    a, b = _logits((2, 5, 64))
    tokens = torch.randint(0, 64, (2, 5))
    ref = reference(a, b, tokens)
    for name in ("k1", "k2", "k3"):
        got = shardkl.sampled_kl(a, b, tokens, estimator=name)
        torch.testing.assert_close(got, getattr(shardkl, name)(ref["p_logprobs"], ref["q_logprobs"]))


def test_reductions() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    r = shardkl.reduce_tokens
    assert torch.equal(r(values, mask, reduction="none"), values * mask)
    assert r(values, mask, reduction="sum").item() == 7.0
    assert r(values, mask, reduction="token_mean").item() == pytest.approx(7 / 3)
    assert r(values, mask, reduction="seq_mean_token_mean").item() == pytest.approx((1.5 + 4) / 2)
    assert r(values, mask, reduction="seq_mean_token_sum").item() == pytest.approx((3 + 4) / 2)
    assert r(values, None, reduction="token_mean").item() == pytest.approx(5.0)
    assert r(values, torch.zeros(3, 3, dtype=torch.bool), reduction="token_mean").item() == 0.0


def test_exact_kl_reduction_and_mask() -> None:
    a, b = _logits((2, 4, 33))
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    per_token = shardkl.exact_kl(a, b)
    got = shardkl.exact_kl(a, b, mask=mask, reduction="token_mean")
    torch.testing.assert_close(got, per_token[mask].mean())


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"q_logits": torch.zeros(3, 6)}, ValueError, "same shape"),
        ({"p_logits": torch.zeros(3, 5, dtype=torch.long)}, TypeError, "floating dtype"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"reduction": "mean"}, ValueError, "reduction must be one of"),
        ({"mask": torch.ones(4)}, ValueError, "mask must have the per-token shape"),
        ({"mask": torch.full((3,), 2.0)}, ValueError, "only 0 and 1"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, text) -> None:
    args = {"p_logits": torch.zeros(3, 5), "q_logits": torch.zeros(3, 5)} | kwargs
    with pytest.raises(error, match=text):
        shardkl.exact_kl(**args)


def test_bad_tokens_and_estimator() -> None:
    a = torch.zeros(3, 5)
    with pytest.raises(TypeError, match="integer dtype"):
        shardkl.token_logprobs(a, torch.zeros(3))
    with pytest.raises(ValueError, match="tokens must have"):
        shardkl.token_logprobs(a, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        shardkl.token_logprobs(a, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="estimator must be one of"):
        shardkl.sampled_kl(a, a, torch.zeros(3, dtype=torch.long), estimator="k4")


def _compare_reference(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor, temperature: float) -> dict:
    forward, reverse = reference(a, b, None, temperature), reference(b, a, None, temperature)
    logp = torch.log_softmax(a.double() / temperature, -1)
    logq = torch.log_softmax(b.double() / temperature, -1)
    return {
        "kl_pq": forward["exact_kl"], "kl_qp": reverse["exact_kl"], "entropy_p": forward["entropy"],
        "entropy_q": reverse["entropy"], "p_logprobs": logp.gather(-1, ids), "q_logprobs": logq.gather(-1, ids),
        "top1_p": a.argmax(-1), "top1_q": b.argmax(-1),
    }


def _check_compare(got: shardkl.CompareStats, ref: dict, tol: float) -> None:
    for name, want in ref.items():
        value = getattr(got, name)
        assert not value.requires_grad, name
        if name.startswith("top1"):
            assert value.dtype == torch.int64 and torch.equal(value, want), name
        else:
            torch.testing.assert_close(value.double(), want, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("impl", ["auto", "eager", "compiled"])
def test_compare_stats_matches_float64_reference(dtype, temperature, impl) -> None:
    a, b = _logits((2, 3, 97), scale=3.0, delta=1.0)
    a, b = a.to(dtype), b.to(dtype)
    ids = torch.randint(0, 97, (2, 3, 4), generator=torch.Generator().manual_seed(1))
    ref = _compare_reference(a, b, ids, temperature)
    got = shardkl.compare_stats(a, b, ids, temperature=temperature, options=shardkl.Options(impl=impl))
    _check_compare(got, ref, 1e-10 if dtype == torch.float64 else 3e-5)
    # one id per position: the log-probs take the tokens' shape
    one = shardkl.compare_stats(a, b, ids[..., 0], temperature=temperature, options=shardkl.Options(impl=impl))
    assert one.p_logprobs.shape == (2, 3)
    torch.testing.assert_close(one.q_logprobs, got.q_logprobs[..., 0])


@pytest.mark.parametrize("bias", [False, True])
def test_compare_stats_from_hidden_states_many_blocks(bias, monkeypatch) -> None:
    """A linear side with more than MERGE_GROUP vocabulary blocks: every block counts, ties go to the lowest id."""
    from shardkl import _sources

    monkeypatch.setattr(_sources, "MAX_TILE_COLS", 8)
    monkeypatch.setattr(_sources, "TILE_ELEMENTS", 40)
    g = torch.Generator().manual_seed(3)
    hidden_p, hidden_q = torch.randn(2, 7, 6, generator=g), torch.randn(2, 7, 6, generator=g)
    weight_p, weight_q = torch.randn(301, 6, generator=g), torch.randn(301, 6, generator=g)
    # a tie at the top of P in two blocks far apart: the lower id wins, as in argmax
    weight_p[250] = weight_p[40] = 5 * hidden_p[0, 0] / hidden_p[0, 0].norm()
    bias_p = torch.randn(301, generator=g) if bias else None
    if bias_p is not None:
        bias_p[250] = bias_p[40]
    bias_q = torch.randn(301, generator=g) if bias else None
    ids = torch.randint(0, 301, (2, 7, 3), generator=g)
    p = shardkl.LinearLogits(hidden_p, weight_p, bias_p)
    q = shardkl.LinearLogits(hidden_q, weight_q, bias_q)
    a = hidden_p.double() @ weight_p.double().T + (0 if bias_p is None else bias_p.double())
    b = hidden_q.double() @ weight_q.double().T + (0 if bias_q is None else bias_q.double())
    got = shardkl.compare_stats(p, q, ids, temperature=0.8)
    assert got.top1_p[0, 0] == 40
    _check_compare(got, _compare_reference(a, b, ids, 0.8), 3e-5)


def test_compare_stats_edge_rows_and_padding() -> None:
    a, b = _logits((4, 10), scale=2.0, delta=1.0)
    a[0] = float("-inf")  # P without mass: KL(P||Q) 0, no top-1
    b[1, 3] = float("-inf")  # Q misses a token P has: KL(P||Q) inf
    a[2] = b[2]  # the same row: both KLs exactly 0
    padded_a = torch.cat([a, torch.full((4, 3), 50.0)], -1)  # a padded tail with large logits counts for nothing
    padded_b = torch.cat([b, torch.full((4, 3), 50.0)], -1)
    got = shardkl.compare_stats(padded_a, padded_b, valid_vocab_size=10)
    assert got.kl_pq[0] == 0 and got.top1_p[0] == -1 and got.top1_q[0] == b[0].argmax()
    assert got.kl_qp[0] == float("inf")
    assert got.kl_pq[1] == float("inf") and torch.isfinite(got.kl_qp[1])
    assert got.kl_pq[2] == 0 and got.kl_qp[2] == 0
    assert torch.equal(got.top1_p[1:], a[1:].argmax(-1)) and torch.equal(got.top1_q, b.argmax(-1))


def test_compare_stats_refuses_bad_tokens() -> None:
    a = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"or that shape and a number of ids per position"):
        shardkl.compare_stats(a, a, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer dtype"):
        shardkl.compare_stats(a, a, torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        shardkl.compare_stats(a, a, torch.tensor([[0, 1], [5, 1], [2, 2]]))
