"""The Triton kernels of the JSD and top-k ops (``jsd_terms``, ``jsd_grads``, ``topk_stats``, ``topk_grads``) in
Triton's CPU interpreter, against the eager kernels and float64: the entries directly (edge rows, strided views,
half inputs, temperature, tiny divergences, K = V, a teacher with no tail) and through the public API (logits and
``LinearLogits``), with their launch counts. Run in a process of its own (``tests/kernels/test_triton_kl.py`` does;
see ``_interpreter.py``)."""

from __future__ import annotations

import math

import pytest

# isort: off
# first: loads triton and the kernels for the interpreter, before anything else imports triton
from tests.kernels._interpreter import FILTER, Launches, interpreted, triton_kl  # noqa: F401
# isort: on
import torch

import shardkl
from shardkl import _sources, _stats
from shardkl.kernels import eager
from tests._distill_reference import bucket_reference, far_apart_and_padded, jsd_reference, teacher_topk
from tests.kernels.cases import case, edge_rows

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TRITON = shardkl.Options(impl="triton")
EAGER = shardkl.Options(impl="eager")
pytestmark = pytest.mark.filterwarnings(FILTER)


def _lse(a: torch.Tensor, b: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    stats = eager.kl_stats(a, b, temperature=temperature, dtype=F32, entropy=False, kl=False)
    return stats[_stats.LA], stats[_stats.LB]


def _finite(*lse: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.isfinite(x) for x in lse]).all(0)


# --- JSD: the entries ---------------------------------------------------------------------------------------------

JSD_CASES = [
    ((9, 300), F32, 0.7, 64, 0.5),
    ((9, 300), BF16, 1.0, 128, 0.1),
    ((3, 1271), F16, 0.7, 256, 0.9),
    ((9, 2000), F32, 1.0, 2048, 0.3),
]


@pytest.mark.parametrize(("shape", "dtype", "temperature", "block", "beta"), JSD_CASES)
def test_jsd_terms_match_eager_and_float64(shape, dtype, temperature, block, beta) -> None:
    a, b, _ = case(shape, dtype)
    if shape[0] >= 8:
        a, b = edge_rows(a, b)
    lse_a, lse_b = _lse(a, b, temperature)
    got = triton_kl.jsd_terms(a, b, temperature=temperature, dtype=F32, lse_a=lse_a, lse_b=lse_b, beta=beta,
                              block=block)
    want = eager.jsd_terms(a, b, temperature=temperature, dtype=F32, lse_a=lse_a, lse_b=lse_b, beta=beta)
    assert got.shape == (2, shape[0]) and got.dtype == torch.float64
    # rows where either input has no distribution may hold anything (the op replaces them)
    ok = _finite(lse_a, lse_b)
    assert ok.sum() >= min(shape[0], 4)
    torch.testing.assert_close(got[:, ok], want[:, ok], rtol=1e-5, atol=1e-8)
    assert (got[:, ok] >= 0).all()
    value = beta * got[0] + (1 - beta) * got[1]
    torch.testing.assert_close(value[ok], jsd_reference(a, b, beta, temperature)[ok], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("shape", "dtype", "temperature", "block", "beta"), JSD_CASES)
@pytest.mark.parametrize("outputs", ["ab", "a", "b"])
def test_jsd_grads_match_eager(shape, dtype, temperature, block, beta, outputs) -> None:
    a, b, _ = case(shape, dtype)
    if shape[0] >= 8:
        a, b = edge_rows(a, b)
    lse_a, lse_b = _lse(a, b, temperature)
    terms = eager.jsd_terms(a, b, temperature=temperature, dtype=F32, lse_a=lse_a, lse_b=lse_b, beta=beta).float()
    grad = torch.randn(shape[0], generator=torch.Generator().manual_seed(5))
    grad[1] = 0.0  # no incoming gradient: 0, whatever the row
    # as the op does: rows without a distribution on either side send nothing back
    grad = torch.where(_finite(lse_a, lse_b), grad, 0.0)
    results = []
    for fn, extra in ((triton_kl.jsd_grads, {"block": block}), (eager.jsd_grads, {})):
        ga = torch.full_like(a, 7.0) if "a" in outputs else None
        gb = torch.full_like(b, 7.0) if "b" in outputs else None
        fn(a, b, temperature=temperature, dtype=F32, lse_a=lse_a, lse_b=lse_b, kl_pm=terms[0], kl_qm=terms[1],
           grad=grad, beta=beta, grad_a=ga, grad_b=gb, **extra)
        results.append((ga, gb))
    tol = 1e-5 if dtype == F32 else 1e-2
    for got, want in zip(*results, strict=True):
        if want is None:
            assert got is None
            continue
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * 1e-3, equal_nan=True)
        assert (got[1] == 0).all()


@pytest.mark.parametrize("target", [5e-3, 5e-5, 5e-7, 5e-9])
def test_tiny_jsd_keeps_its_digits(monkeypatch, target) -> None:
    # b = a + eps * noise + 3 as in tests/test_distill.py; JSD_0.5 ~ KL / 4 for small differences
    monkeypatch.setattr(triton_kl, "DEFAULT_BLOCK", 2048)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 32000, generator=g) * 3
    b = a + math.sqrt(8 * target) * torch.randn(4, 32000, generator=g) + 3
    want = jsd_reference(a, b, 0.5)  # float64 on the same fp32 inputs
    got = shardkl.jsd(a, b, beta=0.5, options=TRITON).double()
    assert (got > 0).all()
    rel = ((got - want).abs() / want).max().item()
    # the eager kernels' bounds in tests/test_distill.py
    assert rel <= (1e-4 if target >= 5e-7 else 1e-3), rel


def test_identical_inputs_give_exactly_zero_jsd_and_gradient() -> None:
    a, _, _ = case((5, 700), F32)
    x, y = a.clone().requires_grad_(), a.clone().requires_grad_()
    value = shardkl.jsd(x, y, beta=0.3, temperature=0.7, options=TRITON)
    assert torch.equal(value, torch.zeros(5))
    value.sum().backward()
    assert (x.grad == 0).all() and (y.grad == 0).all()


def test_jsd_of_far_apart_and_disjoint_distributions_is_finite_and_exact(monkeypatch) -> None:
    monkeypatch.setattr(triton_kl, "DEFAULT_BLOCK", 16)
    g = torch.Generator().manual_seed(6)
    a = torch.randn(4, 40, generator=g) * 2
    a, b = far_apart_and_padded(a, a + 0.7 * torch.randn(4, 40, generator=g))
    for beta in (0.1, 0.5, 0.999):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        got = shardkl.jsd(x, y, beta=beta, options=TRITON)
        torch.testing.assert_close(got.double(), jsd_reference(a, b, beta), rtol=1e-5, atol=1e-6)
        bound = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
        assert (got <= bound + 1e-6).all()
        got.sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
        assert (x.grad[:, -8:] == 0).all() and (y.grad[:, -8:] == 0).all()


# --- top-k: the entries -------------------------------------------------------------------------------------------


def _ids(rows: int, cols: int, k: int, seed: int = 7) -> torch.Tensor:
    """Distinct ids per row in ``[0, cols)``, in random order."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(cols, generator=g)[:k] for _ in range(rows)])


def _topk_edge_rows(s: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 2..: all -inf, a NaN at an id, a +inf in the tail, a NaN in the tail, ids outside the block, -inf ids."""
    s, ids = s.clone(), ids.clone()
    s[2] = float("-inf")
    s[3, ids[3, 0]] = float("nan")
    tail = [c for c in range(s.shape[1]) if c not in set(ids[4].tolist())]
    s[4, tail[0]] = float("inf")
    s[5, tail[1]] = float("nan")
    ids[6, 0], ids[6, -1] = -5, s.shape[1] + 3  # not in this block
    if s.shape[0] > 7:
        s[7, ids[7]] = float("-inf")  # the ids hold no mass
    return s, ids


TOPK_CASES = [
    ((9, 300), F32, 0.7, 64, 7),
    ((9, 300), BF16, 1.0, 128, 1),
    ((3, 1271), F16, 0.7, 256, 30),
    ((9, 2000), F32, 1.0, 2048, 200),
]


@pytest.mark.parametrize(("shape", "dtype", "temperature", "block", "k"), TOPK_CASES)
def test_topk_stats_match_eager(shape, dtype, temperature, block, k) -> None:
    s, _, _ = case(shape, dtype)
    ids = _ids(shape[0], shape[1], k)
    if shape[0] >= 8:
        s, ids = _topk_edge_rows(s, ids)
    got = triton_kl.topk_stats(s, temperature=temperature, dtype=F32, ids=ids, block=block)
    want = eager.topk_stats(s, temperature=temperature, dtype=F32, ids=ids)
    assert got.shape == (2, shape[0]) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
    if shape[0] >= 8:
        assert (got[:, 2] == float("-inf")).all()
        assert got[0, 3].isnan() and torch.isfinite(got[1, 3])  # the NaN is an id: the tail does not see it
        assert got[0, 4] == float("inf") and got[1, 4] == float("inf")
        assert got[0, 5].isnan() and got[1, 5].isnan()
        assert got[1, 7] > got[0, 7] - 1e-6  # the ids hold no mass: the tail is everything


def test_topk_tail_is_accumulated_around_its_own_maximum() -> None:
    # the ids far above the tail: 1 - sum or a shift by the block's maximum would lose the tail to underflow
    got = triton_kl.topk_stats(torch.tensor([[110.0, 0.0, 0.0]]), temperature=1.0, dtype=F32, ids=torch.tensor([[0]]),
                               block=16)
    assert got[1, 0].item() == pytest.approx(math.log(2), rel=1e-7)
    assert got[0, 0].item() == pytest.approx(110.0, rel=1e-7)
    s = torch.full((2, 500), -60.0)
    s[:, ::7] = 300.0
    ids = torch.arange(0, 500, 7).expand(2, -1)
    got = triton_kl.topk_stats(s, temperature=2.0, dtype=F32, ids=ids, block=64)
    torch.testing.assert_close(got[1], torch.full((2,), -30.0 + math.log(500 - ids.shape[1]), dtype=torch.float64))


@pytest.mark.parametrize("block", [16, 64])
def test_topk_with_every_column_an_id_has_no_tail(block) -> None:
    s, _, _ = case((4, 90), F32)
    ids = _ids(4, 90, 90)  # K = V, in random order
    got = triton_kl.topk_stats(s, temperature=0.9, dtype=F32, ids=ids, block=block)
    assert (got[1] == float("-inf")).all()
    torch.testing.assert_close(got[0], torch.logsumexp(s.double() / 0.9, -1), rtol=1e-6, atol=1e-6)
    # and the backward writes every column's id factor (no tail)
    coef = torch.randn(4, 90, generator=torch.Generator().manual_seed(3))
    grad = torch.full_like(s, 7.0)
    triton_kl.topk_grads(s, temperature=0.9, dtype=F32, ids=ids, lse_excl=got[1].float(), tail_coef=torch.ones(4),
                         id_coef=coef, grad_s=grad, block=block)
    torch.testing.assert_close(grad, torch.zeros_like(grad).scatter(-1, ids, coef / 0.9))


@pytest.mark.parametrize(("shape", "dtype", "temperature", "block", "k"), TOPK_CASES)
def test_topk_grads_match_eager(shape, dtype, temperature, block, k) -> None:
    s, _, _ = case(shape, dtype)
    ids = _ids(shape[0], shape[1], k)
    if shape[0] >= 8:
        s, ids = _topk_edge_rows(s, ids)
    lse_excl = eager.topk_stats(s, temperature=temperature, dtype=F32, ids=ids)[1].float()
    if shape[0] >= 8:
        lse_excl[8] = float("-inf")  # an empty tail: no gradient there
    g = torch.Generator().manual_seed(4)
    tail_coef, id_coef = torch.randn(shape[0], generator=g), torch.randn(shape[0], k, generator=g)
    results = []
    for fn, extra in ((triton_kl.topk_grads, {"block": block}), (eager.topk_grads, {})):
        grad = torch.full_like(s, 7.0)
        fn(s, temperature=temperature, dtype=F32, ids=ids, lse_excl=lse_excl, tail_coef=tail_coef, id_coef=id_coef,
           grad_s=grad, **extra)
        results.append(grad)
    tol = 1e-5 if dtype == F32 else 1e-2
    torch.testing.assert_close(results[0], results[1], rtol=tol, atol=tol * 1e-3, equal_nan=True)
    if shape[0] >= 8:
        assert (results[0][8].float().nan_to_num(0.0) == 0).sum() >= shape[1] - k


def test_strided_views_and_fp64_fallback() -> None:
    a, b, _ = case((5, 400), F32)
    a, b = a[1:4, 50:333], b[1:4, 50:333]  # row stride 400, 283 columns
    lse_a, lse_b = _lse(a, b, 0.8)
    torch.testing.assert_close(
        triton_kl.jsd_terms(a, b, temperature=0.8, dtype=F32, lse_a=lse_a, lse_b=lse_b, beta=0.4, block=64),
        eager.jsd_terms(a, b, temperature=0.8, dtype=F32, lse_a=lse_a, lse_b=lse_b, beta=0.4), rtol=1e-5, atol=1e-8)
    ids = _ids(3, 283, 9)
    torch.testing.assert_close(triton_kl.topk_stats(a, temperature=0.8, dtype=F32, ids=ids, block=64),
                               eager.topk_stats(a, temperature=0.8, dtype=F32, ids=ids), rtol=1e-6, atol=1e-6)
    at, bt = case((300, 6), F32)[:2]
    at, bt = at.t(), bt.t()  # column stride != 1: copied
    lse_a, lse_b = _lse(at, bt, 1.0)
    torch.testing.assert_close(
        triton_kl.jsd_terms(at, bt, temperature=1.0, dtype=F32, lse_a=lse_a, lse_b=lse_b, beta=0.5),
        eager.jsd_terms(at, bt, temperature=1.0, dtype=F32, lse_a=lse_a, lse_b=lse_b, beta=0.5), rtol=1e-5, atol=1e-8)
    ids = _ids(6, 297, 5)
    torch.testing.assert_close(triton_kl.topk_stats(at, temperature=1.0, dtype=F32, ids=ids),
                               eager.topk_stats(at, temperature=1.0, dtype=F32, ids=ids), rtol=1e-6, atol=1e-6)
    d = triton_kl.topk_stats(at.double(), temperature=1.0, dtype=torch.float64, ids=ids)
    torch.testing.assert_close(d, eager.topk_stats(at.double(), temperature=1.0, dtype=torch.float64, ids=ids))


# --- through the public API ---------------------------------------------------------------------------------------


def _values_and_grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.clone().requires_grad_() for x in inputs]
    value = fn(*leaves)
    weights = torch.linspace(-1.0, 2.0, value.numel()).reshape(value.shape)
    (value * weights).sum().backward()
    return value.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize(("shape", "dtype", "temperature", "beta"),
                         [((6, 300), F32, 0.7, 0.5), ((3, 1271), BF16, 1.0, 0.2), ((2, 3, 500), F16, 1.3, 0.9)])
def test_jsd_matches_eager_and_float64(monkeypatch, shape, dtype, temperature, beta) -> None:
    monkeypatch.setattr(triton_kl, "DEFAULT_BLOCK", 256)  # several tiles per row
    a, b, _ = case((math.prod(shape[:-1]), shape[-1]), dtype)
    a, b = a.reshape(shape), b.reshape(shape)
    results = {}
    for name, options in (("triton", TRITON), ("eager", EAGER)):
        results[name] = _values_and_grads(
            lambda x, y, o=options: shardkl.jsd(x, y, beta=beta, temperature=temperature, options=o), a, b
        )
    (value, grads), (want, want_grads) = results["triton"], results["eager"]
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(value.double(), jsd_reference(a, b, beta, temperature), rtol=1e-5, atol=1e-7)
    tol = 1e-5 if dtype == F32 else 1e-2
    for got, expected in zip(grads, want_grads, strict=True):
        assert got.dtype == dtype
        # (x - KL) cancels where a column's log-ratio is close to the mean: 1e-7 absolute differences there
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * 0.1)


@pytest.mark.parametrize(("dtype", "temperature", "k"), [(F32, 0.8, 7), (BF16, 1.0, 1), (F32, 1.0, 300)])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_matches_eager_and_float64(monkeypatch, dtype, temperature, k, direction) -> None:
    monkeypatch.setattr(triton_kl, "DEFAULT_BLOCK", 64)
    g = torch.Generator().manual_seed(8)
    student = (torch.randn(2, 3, 300, generator=g) * 2).to(dtype)
    teacher = student.double() + torch.randn(2, 3, 300, generator=g, dtype=torch.float64)
    ids, logprobs = teacher_topk(teacher, k)  # k = 300: every column an id, the teacher and student tails empty
    results = {}
    for name, options in (("triton", TRITON), ("eager", EAGER)):
        results[name] = _values_and_grads(
            lambda s, o=options: shardkl.topk_kl(s, ids, logprobs.float(), direction=direction,
                                                 temperature=temperature, options=o), student
        )
    (value, (grad,)), (want, (want_grad,)) = results["triton"], results["eager"]
    assert torch.isfinite(value).all() and (value >= 0).all()
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)
    # K = V: the full-vocabulary KL (the reference normalises the teacher's log-probs, as shardkl takes a tail
    # within rounding to be empty)
    reference = bucket_reference(student.double(), ids, logprobs.float(), direction, temperature=temperature)
    torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-6)
    assert grad.dtype == dtype
    tol = 1e-5 if dtype == F32 else 1e-2
    torch.testing.assert_close(grad, want_grad, rtol=tol, atol=tol * 1e-2)


def test_topk_keeps_the_tail_gradient_where_a_tail_probability_underflows() -> None:
    # issue 18, item 8: S = [1, e^-110, e^-110]; the tail's share of each column is 1/2, its gradient -0.05
    s = torch.tensor([[110.0, 0.0, 0.0]], requires_grad=True)
    value = shardkl.topk_kl(s, torch.tensor([[0]]), torch.tensor([[math.log(0.9)]]), options=TRITON)
    value.sum().backward()
    torch.testing.assert_close(s.grad, torch.tensor([[0.1, -0.05, -0.05]]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("target", [1e-5, 1e-9])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_tiny_topk_divergence_keeps_its_digits(monkeypatch, target, direction) -> None:
    monkeypatch.setattr(triton_kl, "DEFAULT_BLOCK", 4096)
    g = torch.Generator().manual_seed(14)
    student = torch.randn(8, 32000, generator=g) * 3
    teacher = student.double() + math.sqrt(2 * target) * torch.randn(8, 32000, generator=g, dtype=torch.float64) + 3
    ids, logprobs = teacher_topk(teacher, 20)
    got = shardkl.topk_kl(student, ids, logprobs.float(), direction=direction, options=TRITON).double()
    want = bucket_reference(student, ids, logprobs.float(), direction)  # float64 on the same fp32 inputs
    assert (got >= 0).all()
    rel = ((got - want).abs() / want).max().item()
    # the eager kernels' bound in tests/test_distill.py (the tail's log-sum-exp accurate to float64 accumulation)
    assert rel <= 1e-4, rel


# --- LinearLogits: the kernels on fp32 matmul tiles ---------------------------------------------------------------

VOCAB, H_TEACHER, H_STUDENT = 211, 16, 9


def _model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "h_t": torch.randn(2, 4, H_TEACHER, generator=g),
        "w_t": torch.randn(VOCAB, H_TEACHER, generator=g) * 0.5,
        "h_s": torch.randn(2, 4, H_STUDENT, generator=g),
        "w_s": torch.randn(VOCAB, H_STUDENT, generator=g) * 0.5,
        "b_s": torch.randn(VOCAB, generator=g) * 0.3,
    }


@pytest.mark.parametrize("kind", ["jsd", "topk"])
def test_linear_logits_match_eager_and_float64(monkeypatch, kind) -> None:
    monkeypatch.setattr(_sources, "TILE_ELEMENTS", 96)  # several row and vocabulary tiles
    monkeypatch.setattr(_sources, "MAX_TILE_COLS", 16)
    m = _model()
    weights = torch.linspace(-1.0, 2.0, 8).reshape(2, 4)
    logprobs, ids = torch.log_softmax((m["h_t"] @ m["w_t"].T).double(), -1).topk(7, dim=-1)

    def value_of(leaves: dict[str, torch.Tensor], options: shardkl.Options) -> torch.Tensor:
        student = shardkl.LinearLogits(leaves["h_s"], leaves["w_s"], leaves["b_s"])
        if kind == "jsd":
            teacher = shardkl.LinearLogits(leaves["h_t"], leaves["w_t"])
            return shardkl.jsd(teacher, student, beta=0.3, temperature=0.9, options=options)
        return shardkl.topk_kl(student, ids, logprobs.float(), temperature=0.9, options=options)

    results = {}
    for name, options in (("triton", TRITON), ("eager", EAGER)):
        leaves = {k: v.clone().requires_grad_() for k, v in m.items()}
        with Launches() as launches:
            value = value_of(leaves, options)
            (value * weights).sum().backward()
        results[name] = (value.detach(), {k: v.grad for k, v in leaves.items()}, launches.calls)
    (value, grads, launched), (want, want_grads, _) = results["triton"], results["eager"]
    assert launched, "the Triton kernels did not run"
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-7)
    teacher, student = m["h_t"].double() @ m["w_t"].double().T, m["h_s"].double() @ m["w_s"].double().T + m["b_s"]
    if kind == "jsd":
        reference = jsd_reference(teacher, student, 0.3, temperature=0.9)
    else:
        reference = bucket_reference(student, ids, logprobs.float(), "forward", temperature=0.9)
    torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        if want_grads[name] is None:
            assert grad is None, name
            continue
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# --- launches -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("needs", ["ab", "a", "b"])
def test_jsd_is_one_launch_per_forward_round_and_one_in_backward(needs) -> None:
    a, b, _ = case((6, 300), F32)
    x, y = a.clone().requires_grad_("a" in needs), b.clone().requires_grad_("b" in needs)
    with Launches() as launches:
        value = shardkl.jsd(x, y, beta=0.3, options=TRITON)
        forward = launches.take()
        value.sum().backward()
        backward = launches.take()
    # round 1: the log-sum-exps alone (the lse-only variant of the stats kernel); round 2: the terms
    assert [name for name, _ in forward] == ["_stats_kernel", "_jsd_terms_kernel"], forward
    assert forward[0][1] == {"HAS_B": True, "ENTROPY": False, "KL": False, "BLOCK": triton_kl.DEFAULT_BLOCK}
    # both gradients (or the one needed) from one launch
    assert [name for name, _ in backward] == ["_jsd_grads_kernel"], backward
    assert backward[0][1]["WRITE_A"] == ("a" in needs) and backward[0][1]["WRITE_B"] == ("b" in needs)


def test_topk_is_one_launch_forward_and_one_backward() -> None:
    s, _, _ = case((6, 300), F32)
    teacher = s.double() + 0.5
    ids, logprobs = teacher_topk(teacher, 5)
    x = s.clone().requires_grad_()
    with Launches() as launches:
        value = shardkl.topk_kl(x, ids, logprobs.float(), options=TRITON)
        forward = launches.take()
        value.sum().backward()
        backward = launches.take()
    assert [name for name, _ in forward] == ["_topk_stats_kernel"], forward
    assert [name for name, _ in backward] == ["_topk_grads_kernel"], backward


# --- edge rows through the public API -----------------------------------------------------------------------------


def test_topk_teacher_without_tail_and_student_without_tail() -> None:
    # tests/test_distill.py's closed-form case: the teacher's top-3 hold all its mass, the student's tail has 0.4
    student = torch.log(torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2]]))
    # float64 log-probs whose probabilities sum to 1 exactly (fp32 ones leave a tail of ~1e-8, a finite reverse KL)
    ids, logprobs = torch.tensor([[0, 1, 2]]), torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    x = student.clone().requires_grad_()
    forward = shardkl.topk_kl(x, ids, logprobs, direction="forward", options=TRITON)
    assert forward.item() == pytest.approx(sum(t * math.log(t / 0.2) for t in (0.5, 0.3, 0.2)), rel=1e-6)
    forward.sum().backward()
    # S_v - T_b S_v / S_b: the ids S_v - T_v, the tail columns S_v (T_tail = 0)
    torch.testing.assert_close(x.grad, torch.tensor([[0.2 - 0.5, 0.2 - 0.3, 0.0, 0.2, 0.2]]), rtol=1e-5, atol=1e-7)
    assert shardkl.topk_kl(student, ids, logprobs, direction="reverse", options=TRITON).item() == float("inf")
    # a student with no tail either (its other logits -inf): finite, the exact KL
    closed = torch.log(torch.tensor([[0.4, 0.4, 0.2, 0.0, 0.0]]))
    got = shardkl.topk_kl(closed, ids, logprobs, direction="reverse", options=TRITON).item()
    assert got == pytest.approx(sum(s * math.log(s / t) for s, t in ((0.4, 0.5), (0.4, 0.3), (0.2, 0.2))), rel=1e-6)


def test_masked_padding_rows_match_eager() -> None:
    a, b, _ = case((6, 300), F32)
    a[2], b[2] = float("-inf"), float("-inf")  # a padded position: no distribution at all
    b[4, 10:20] = float("-inf")  # Q without mass where P has some
    mask = torch.ones(6, dtype=torch.bool)
    mask[2] = False
    ids, logprobs = teacher_topk(b.double().nan_to_num(neginf=-1e4), 4)
    for name, fn in (
        ("jsd", lambda x, y, o: shardkl.jsd(x, y, beta=0.4, mask=mask, temperature=0.8, options=o)),
        ("topk", lambda x, y, o: shardkl.topk_kl(x, ids, logprobs.float(), mask=mask, temperature=0.8, options=o)),
    ):
        got, got_grads = _values_and_grads(lambda x, y, f=fn: f(x, y, TRITON), a, b)
        want, want_grads = _values_and_grads(lambda x, y, f=fn: f(x, y, EAGER), a, b)
        assert got[2] == 0 and torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
        for g, w in zip(got_grads, want_grads, strict=True):
            if w is None:
                assert g is None, name
                continue
            assert (g[2] == 0).all() and torch.isfinite(g).all(), name
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)
