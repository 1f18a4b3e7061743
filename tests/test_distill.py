"""Single-process tests of shardkl.jsd, shardkl.topk_kl and the distillation loss against float64 references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import shardkl
from shardkl import _sources
from tests._distill_reference import (
    bucket_reference,
    far_apart_and_padded,
    jsd_reference,
    teacher_topk,
    trl_generalized_jsd,
)

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)


def _pair(shape=(3, 5, 97), scale=2.0, delta=0.7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    b = a + delta * torch.randn(*shape, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many row and vocabulary tiles, so the merges over tiles are exercised."""
    monkeypatch.setattr(_sources, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(_sources, "MAX_TILE_COLS", 16)


# --- jsd ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_jsd_values_and_gradients_match_float64_reference(beta, temperature, small_tiles) -> None:
    a, b = _pair()
    w = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = shardkl.jsd(x, y, beta=beta, temperature=temperature)
    assert got.shape == (3, 5) and got.dtype == torch.float64
    (got * w).sum().backward()
    xr, yr = a.clone().requires_grad_(), b.clone().requires_grad_()
    want = jsd_reference(xr, yr, beta, temperature)
    (want * w).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(y.grad, yr.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("beta", BETAS)
def test_jsd_of_teacher_and_student_is_trl_generalized_jsd_loss(beta) -> None:
    teacher, student = _pair(seed=3, delta=1.5)
    got = shardkl.jsd(teacher, student, beta=beta, temperature=0.9)
    want = trl_generalized_jsd(student, teacher, beta, temperature=0.9)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # and the two ends are the two KLs, in TRL's directions
    if beta == 0.0:
        torch.testing.assert_close(got, shardkl.exact_kl(teacher, student, temperature=0.9))
    if beta == 1.0:
        torch.testing.assert_close(got, shardkl.exact_kl(student, teacher, temperature=0.9))


def test_jsd_mixture_weight_is_on_p() -> None:
    # swapping the inputs is the same as swapping beta for 1 - beta: the test can tell beta's side apart
    a, b = _pair(seed=4, delta=2.0)
    torch.testing.assert_close(shardkl.jsd(a, b, beta=0.2), shardkl.jsd(b, a, beta=0.8))
    assert (shardkl.jsd(a, b, beta=0.2) - shardkl.jsd(a, b, beta=0.8)).abs().max() > 1e-3


def test_jsd_gradcheck() -> None:
    a, b = _pair(shape=(2, 11), seed=5)
    assert torch.autograd.gradcheck(
        lambda x, y: shardkl.jsd(x, y, beta=0.3, temperature=1.3), (a.requires_grad_(), b.requires_grad_())
    )


@pytest.mark.parametrize("target", [5e-3, 5e-5, 5e-7, 5e-9])
def test_jsd_tiny_divergences_are_accurate_and_never_negative(target) -> None:
    # b = a + eps * noise + 3 as in the engine's tests; JSD_0.5 ~ KL / 4 for small differences
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32000, generator=g) * 3
    eps = math.sqrt(8 * target)
    b = a + eps * torch.randn(16, 32000, generator=g) + 3
    want = jsd_reference(a, b, 0.5)  # float64 on the same fp32 inputs
    got = shardkl.jsd(a, b, beta=0.5).double()
    assert (got >= 0).all()
    rel = ((got - want).abs() / want).max().item()
    # measured: 1e-5 at 5e-7, 9e-5 at 5e-9 (the per-column form: rounding of the log-sum-exps cancels)
    assert rel <= (1e-4 if target >= 5e-7 else 1e-3), rel


def test_jsd_identical_inputs_give_exact_zero_and_zero_gradient() -> None:
    a, _ = _pair(dtype=torch.float32)
    x, y = a.clone().requires_grad_(), a.clone().requires_grad_()
    value = shardkl.jsd(x, y, beta=0.3)
    assert torch.equal(value, torch.zeros(3, 5))
    value.sum().backward()
    assert x.grad.abs().max() < 1e-7 and y.grad.abs().max() < 1e-7


def test_jsd_extreme_and_padded_logits_are_finite_and_exact(small_tiles) -> None:
    a, b = far_apart_and_padded(*_pair(shape=(4, 40), seed=6))
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    for beta in (0.1, 0.5, 0.999):
        got = shardkl.jsd(x, y, beta=beta)
        want = jsd_reference(a, b, beta)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        bound = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
        assert (got <= bound + 1e-12).all()
        got.sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
        assert (x.grad[:, -8:] == 0).all() and (y.grad[:, -8:] == 0).all()
        x.grad = y.grad = None
    # in float32 too (no overflow to inf or NaN anywhere)
    got32 = shardkl.jsd(x.detach().float(), y.detach().float(), beta=0.5)
    torch.testing.assert_close(got32.double(), jsd_reference(a.float(), b.float(), 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_jsd_half_inputs_compute_in_float32(dtype) -> None:
    a, b = _pair(dtype=dtype)
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = shardkl.jsd(x, y, beta=0.4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), jsd_reference(a, b, 0.4), rtol=2e-5, atol=2e-6)
    got.sum().backward()
    assert x.grad.dtype == dtype and y.grad.dtype == dtype


def test_jsd_mask_reduction_and_non_contiguous_rows() -> None:
    full_a, full_b = _pair(shape=(3, 6, 50), seed=7)
    # logits[:, :-1] is not viewable as 2-D: tiles that span its row blocks are copied
    a, b = full_a[:, :-1], full_b[:, :-1]
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(8)) > 0.3
    want = jsd_reference(a, b, 0.5)
    got = shardkl.jsd(a, b, mask=mask)
    torch.testing.assert_close(got, torch.where(mask, want, 0.0))
    torch.testing.assert_close(shardkl.jsd(a, b, mask=mask, reduction="token_mean"), want[mask].mean())
    torch.testing.assert_close(shardkl.jsd(a, b, reduction="sum"), want.sum())


def test_jsd_gradient_of_one_input_only() -> None:
    a, b = _pair(seed=9)
    x = a.clone().requires_grad_()
    shardkl.jsd(x, b, beta=0.5).sum().backward()
    xr = a.clone().requires_grad_()
    jsd_reference(xr, b, 0.5).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_jsd_beta_outside_unit_interval_raises(beta) -> None:
    a, b = _pair()
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        shardkl.jsd(a, b, beta=beta)


def test_jsd_beta_of_wrong_type_raises() -> None:
    a, b = _pair()
    with pytest.raises(TypeError, match="beta must be a number"):
        shardkl.jsd(a, b, beta=True)
    with pytest.raises(TypeError, match="beta must be a number"):
        shardkl.jsd(a, b, beta="0.5")  # type: ignore[arg-type]


def test_jsd_nan_raises_or_propagates() -> None:
    a, b = _pair(shape=(3, 40))
    b[1, 2] = float("nan")
    with pytest.raises(ValueError, match="q_logits holds NaN"):
        shardkl.jsd(a, b)
    got = shardkl.jsd(a, b, options=shardkl.Options(nan_policy="propagate"))
    assert math.isnan(got[1].item()) and torch.isfinite(got[[0, 2]]).all()


# --- topk_kl --------------------------------------------------------------------------------------------------


def _student_teacher(shape=(3, 4), vocab=61, seed=10, delta=0.8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2
    teacher = student + delta * torch.randn(*shape, vocab, generator=g, dtype=torch.float64)
    return student.to(dtype), teacher


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("k", [1, 2, 7, 30, 60])
def test_topk_values_and_gradients_match_bucket_reference(direction, k, small_tiles) -> None:
    student, teacher = _student_teacher()
    ids, logprobs = teacher_topk(teacher, k)
    w = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    x = student.clone().requires_grad_()
    got = shardkl.topk_kl(x, ids, logprobs, direction=direction, temperature=0.8)
    (got * w).sum().backward()
    xr = student.clone().requires_grad_()
    want = bucket_reference(xr, ids, logprobs, direction, temperature=0.8)
    (want * w).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-13)
    assert (got >= 0).all()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_with_all_ids_is_the_exact_kl(direction, small_tiles) -> None:
    student, teacher = _student_teacher()
    vocab = student.shape[-1]
    ids, logprobs = teacher_topk(teacher, vocab)
    # in any order: a random permutation of the whole vocabulary per token
    perm = torch.rand(3, 4, vocab, generator=torch.Generator().manual_seed(12)).argsort(-1)
    ids, logprobs = ids.gather(-1, perm), logprobs.gather(-1, perm)
    x = student.clone().requires_grad_()
    got = shardkl.topk_kl(x, ids, logprobs, direction=direction)
    got.sum().backward()
    xr = student.clone().requires_grad_()
    want = shardkl.exact_kl(teacher, xr) if direction == "forward" else shardkl.exact_kl(xr, teacher)
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_is_a_lower_bound_of_the_full_kl_that_grows_with_k(direction) -> None:
    student, teacher = _student_teacher(shape=(8,), vocab=200, delta=1.2, seed=13)
    full = shardkl.exact_kl(teacher, student) if direction == "forward" else shardkl.exact_kl(student, teacher)
    previous = torch.zeros(8, dtype=torch.float64)
    for k in (1, 3, 10, 50, 150, 199, 200):
        got = shardkl.topk_kl(student, *teacher_topk(teacher, k), direction=direction)
        # coarse-graining a finer bucketing never increases the KL (the top-k sets are nested)
        assert (got >= previous - 1e-12).all() and (got <= full + 1e-12).all(), k
        previous = got
    torch.testing.assert_close(previous, full, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_stays_non_negative_where_the_truncated_sum_is_negative(direction) -> None:
    # the student puts 0.9 (forward) or 0.1 (reverse) on the teacher's top-1 id, which the teacher gives 0.5
    s0 = 0.9 if direction == "forward" else 0.1
    rest = (1 - s0) / 9
    student = torch.log(torch.tensor([[s0] + [rest] * 9], dtype=torch.float64))
    ids, logprobs = torch.tensor([[0]]), torch.log(torch.tensor([[0.5]], dtype=torch.float64))
    truncated = (0.5 * math.log(0.5 / s0)) if direction == "forward" else (s0 * math.log(s0 / 0.5))
    assert truncated < 0
    got = shardkl.topk_kl(student, ids, logprobs, direction=direction).item()
    t, s = (0.5, 0.5), (s0, 1 - s0)
    pairs = zip(t, s, strict=True) if direction == "forward" else zip(s, t, strict=True)
    expected = sum(w * math.log(w / m) for w, m in pairs)
    assert got > 0 and got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("target", [1e-3, 1e-5, 1e-7, 1e-9])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_tiny_divergences_are_accurate_and_never_negative(target, direction) -> None:
    g = torch.Generator().manual_seed(14)
    student = torch.randn(16, 32000, generator=g) * 3
    eps = math.sqrt(2 * target)
    teacher = student.double() + eps * torch.randn(16, 32000, generator=g, dtype=torch.float64) + 3
    ids, logprobs = teacher_topk(teacher, 20)
    logprobs = logprobs.float()
    got = shardkl.topk_kl(student, ids, logprobs, direction=direction).double()
    want = bucket_reference(student, ids, logprobs, direction)  # float64 on the same fp32 inputs
    assert (got >= 0).all()
    rel = ((got - want).abs() / want).max().item()
    # measured 4e-5 at a bucket KL of 3e-10: the tail's log-sum-exp is accumulated in float64
    assert rel <= 1e-4, rel


def test_topk_identical_buckets_give_exact_zero() -> None:
    student, _ = _student_teacher(dtype=torch.float64)
    ids, logprobs = teacher_topk(student, 5)
    for direction in ("forward", "reverse"):
        x = student.clone().requires_grad_()
        value = shardkl.topk_kl(x, ids, logprobs, direction=direction)
        assert value.abs().max() < 1e-15
        value.sum().backward()
        assert x.grad.abs().max() < 1e-15


def test_topk_empty_teacher_tail() -> None:
    # the teacher's top-3 hold all its mass; the student's tail has mass 0.4
    student = torch.log(torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)).requires_grad_()
    ids = torch.tensor([[0, 1, 2]])
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    forward = shardkl.topk_kl(student, ids, logprobs, direction="forward")
    # forward: the tail adds 0 * log(0 / 0.4) = 0
    expected = sum(t * math.log(t / 0.2) for t in (0.5, 0.3, 0.2))
    assert forward.item() == pytest.approx(expected, rel=1e-12)
    forward.sum().backward()
    # S_v - T_b S_v / S_b: ids S_v - T_v, tail columns S_v (T_tail = 0)
    torch.testing.assert_close(student.grad, torch.tensor([[0.2 - 0.5, 0.2 - 0.3, 0.0, 0.2, 0.2]], dtype=torch.float64))
    # reverse: the student's tail mass faces a teacher with none
    assert shardkl.topk_kl(student, ids, logprobs, direction="reverse").item() == float("inf")
    # a student with no tail either (its other logits -inf): finite, and equal to the exact KL
    closed = torch.log(torch.tensor([[0.4, 0.4, 0.2, 0.0, 0.0]], dtype=torch.float64))
    got = shardkl.topk_kl(closed, ids, logprobs, direction="reverse").item()
    assert got == pytest.approx(sum(s * math.log(s / t) for s, t in ((0.4, 0.5), (0.4, 0.3), (0.2, 0.2))), rel=1e-12)


def test_topk_teacher_probabilities_summing_to_one_within_rounding(small_tiles) -> None:
    # a top-V teacher in float32 sums to 1 +- rounding: the tail is empty on both sides, not an infinite KL
    student, teacher = _student_teacher(vocab=40, dtype=torch.float32)
    ids, logprobs = teacher_topk(teacher, 40)
    got = shardkl.topk_kl(student, ids, logprobs.float(), direction="forward")
    want = shardkl.exact_kl(teacher.float(), student)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_topk_temperature_scales_the_student_only() -> None:
    student, teacher = _student_teacher()
    ids, logprobs = teacher_topk(teacher, 5)
    got = shardkl.topk_kl(student, ids, logprobs, temperature=2.0)
    torch.testing.assert_close(got, shardkl.topk_kl(student / 2.0, ids, logprobs))
    torch.testing.assert_close(got, bucket_reference(student, ids, logprobs, "forward", temperature=2.0))


def test_topk_mask_skips_garbage_rows_and_reduces() -> None:
    student, teacher = _student_teacher()
    ids, logprobs = teacher_topk(teacher, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = False
    ids, logprobs = ids.clone(), logprobs.clone()
    # a padded position: repeated, out-of-range ids and log-probs that are not log-probs
    ids[1, 2] = -100
    logprobs[1, 2] = 0.0
    x = student.clone().requires_grad_()
    got = shardkl.topk_kl(x, ids, logprobs, mask=mask)
    want = bucket_reference(student, ids.clamp(min=0), logprobs, "forward")
    assert got[1, 2] == 0
    torch.testing.assert_close(got[mask], want[mask])
    mean = shardkl.topk_kl(x, ids, logprobs, mask=mask, reduction="token_mean")
    torch.testing.assert_close(mean, want[mask].mean())
    mean.backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1, 2] == 0).all()


def test_topk_gradcheck_and_no_gradient_to_the_teacher() -> None:
    student, teacher = _student_teacher(shape=(2,), vocab=9)
    ids, logprobs = teacher_topk(teacher, 3)
    logprobs = logprobs.clone().requires_grad_()
    for direction in ("forward", "reverse"):
        assert torch.autograd.gradcheck(
            lambda s, d=direction: shardkl.topk_kl(s, ids, logprobs.detach(), direction=d, temperature=1.1),
            (student.clone().requires_grad_(),),
        )
    shardkl.topk_kl(student.clone().requires_grad_(), ids, logprobs).sum().backward()
    assert logprobs.grad is None


def test_topk_half_student_logits() -> None:
    student, teacher = _student_teacher(dtype=torch.bfloat16)
    ids, logprobs = teacher_topk(teacher, 6)
    x = student.clone().requires_grad_()
    got = shardkl.topk_kl(x, ids, logprobs.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), bucket_reference(student, ids, logprobs.float(), "forward"), rtol=2e-5,
                               atol=1e-6)
    got.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_topk_valid_vocab_size_trims_padding() -> None:
    student, teacher = _student_teacher(vocab=30)
    ids, logprobs = teacher_topk(teacher, 4)
    padded = torch.cat([student, torch.randn(3, 4, 2, dtype=torch.float64) + 50], -1).requires_grad_()
    got = shardkl.topk_kl(padded, ids, logprobs, valid_vocab_size=30)
    torch.testing.assert_close(got, bucket_reference(student, ids, logprobs, "forward"))
    got.sum().backward()
    assert (padded.grad[..., 30:] == 0).all()
    with pytest.raises(ValueError, match=r"teacher_ids must be ids in \[0, 30\)"):
        shardkl.topk_kl(padded, torch.full_like(ids[..., :1], 31), logprobs[..., :1], valid_vocab_size=30)


# --- bad inputs -----------------------------------------------------------------------------------------------


def _topk_inputs():
    student, teacher = _student_teacher(vocab=20)
    ids, logprobs = teacher_topk(teacher, 4)
    return student, ids.clone(), logprobs.clone()


def test_topk_duplicate_ids_raise() -> None:
    student, ids, logprobs = _topk_inputs()
    ids[2, 1, 3] = ids[2, 1, 0]
    with pytest.raises(ValueError, match=r"distinct.*duplicates in 1 token row\(s\).*index 9"):
        shardkl.topk_kl(student, ids, logprobs)


def test_topk_ids_outside_vocabulary_raise() -> None:
    student, ids, logprobs = _topk_inputs()
    for bad in (-1, 20):
        wrong = ids.clone()
        wrong[0, 0, 0] = bad
        with pytest.raises(ValueError, match=r"teacher_ids must be ids in \[0, 20\)"):
            shardkl.topk_kl(student, wrong, logprobs)


def test_topk_shape_mismatches_raise() -> None:
    student, ids, logprobs = _topk_inputs()
    with pytest.raises(ValueError, match="same shape"):
        shardkl.topk_kl(student, ids, logprobs[..., :3])
    with pytest.raises(ValueError, match=r"shape \[\*\(3, 4\), K\]"):
        shardkl.topk_kl(student, ids[:2], logprobs[:2])
    with pytest.raises(ValueError, match="K >= 1"):
        shardkl.topk_kl(student, ids[..., :0], logprobs[..., :0])


def test_topk_non_integer_ids_raise() -> None:
    student, ids, logprobs = _topk_inputs()
    with pytest.raises(TypeError, match="teacher_ids must have an integer dtype"):
        shardkl.topk_kl(student, ids.double(), logprobs)
    with pytest.raises(TypeError, match="teacher_logprobs must have a floating dtype"):
        shardkl.topk_kl(student, ids, ids)
    with pytest.raises(TypeError, match="teacher_ids must be a torch.Tensor"):
        shardkl.topk_kl(student, ids.tolist(), logprobs)  # type: ignore[arg-type]


def test_topk_positive_logprobs_raise() -> None:
    student, ids, logprobs = _topk_inputs()
    logprobs[1, 1, 1] = 0.3
    with pytest.raises(ValueError, match=r"must be log-probabilities \(<= 0\), got 1 positive.*0\.3"):
        shardkl.topk_kl(student, ids, logprobs)


def test_topk_probabilities_summing_above_one_raise() -> None:
    student, ids, _ = _topk_inputs()
    # top-k log-probs renormalised over the top-k (a common mistake) sum to 1 and the rest of the row above it
    renormalised = torch.log(torch.full(ids.shape, 0.3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"sum to at most 1.*12 token row\(s\).*Renormalised"):
        shardkl.topk_kl(student, ids, renormalised)
    # within the rounding of the dtype it passes: float32 log-probs of a full row
    _, teacher = _student_teacher(vocab=20)
    full_ids, full = teacher_topk(teacher, 20)
    shardkl.topk_kl(student, full_ids, (full.float() + 2e-6).clamp(max=0))
    with pytest.raises(ValueError, match="sum to at most 1"):
        shardkl.topk_kl(student, full_ids, (full + 1e-3).clamp(max=0))


def test_topk_nan_logprobs_raise() -> None:
    student, ids, logprobs = _topk_inputs()
    logprobs[0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or \+inf in 1 token row\(s\) \(first at flat token index 3\)"):
        shardkl.topk_kl(student, ids, logprobs)


def test_topk_bad_direction_raises() -> None:
    student, ids, logprobs = _topk_inputs()
    with pytest.raises(ValueError, match="direction must be one of"):
        shardkl.topk_kl(student, ids, logprobs, direction="backward")  # type: ignore[arg-type]


# --- the loss helper ------------------------------------------------------------------------------------------


def test_distillation_loss_dispatches_to_the_divergences() -> None:
    student, teacher = _pair(seed=20)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(21)) > 0.4
    common = {"mask": mask, "reduction": "token_mean", "temperature": 0.9}
    cases = {
        "forward_kl": shardkl.exact_kl(teacher, student, **common),
        "reverse_kl": shardkl.exact_kl(student, teacher, **common),
        "jsd": shardkl.jsd(teacher, student, beta=0.5, **common),
    }
    for divergence, want in cases.items():
        torch.testing.assert_close(shardkl.distillation_loss(student, teacher, divergence=divergence, **common), want)
    # TRL's GKD loss with labels, reduction "batchmean": the mean over the kept tokens
    trl = trl_generalized_jsd(student, teacher, 0.3, temperature=0.9)[mask].mean()
    torch.testing.assert_close(
        shardkl.distillation_loss(student, teacher, divergence="jsd", beta=0.3, **common), trl
    )
    ids, logprobs = teacher_topk(teacher, 6)
    for divergence, direction in (("forward_kl", "forward"), ("reverse_kl", "reverse")):
        got = shardkl.distillation_loss(
            student, shardkl.TopKTeacher(ids, logprobs), divergence=divergence, mask=mask, reduction="none"
        )
        torch.testing.assert_close(got, shardkl.topk_kl(student, ids, logprobs, direction=direction, mask=mask))


def test_distillation_loss_gradients_reach_the_student() -> None:
    student, teacher = _pair(seed=22)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        x = student.clone().requires_grad_()
        shardkl.distillation_loss(x, teacher, divergence=divergence).backward()
        xr = student.clone().requires_grad_()
        ref = {"forward_kl": jsd_reference(teacher, xr, 0.0), "reverse_kl": jsd_reference(xr, teacher, 0.0),
               "jsd": jsd_reference(teacher, xr, 0.5)}[divergence]
        ref.mean().backward()
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-13)


def test_distillation_loss_bad_arguments() -> None:
    student, teacher = _pair()
    with pytest.raises(ValueError, match="divergence must be one of"):
        shardkl.distillation_loss(student, teacher, divergence="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta .* divergence='jsd' only"):
        shardkl.distillation_loss(student, teacher, divergence="forward_kl", beta=0.5)
    ids, logprobs = teacher_topk(teacher, 3)
    with pytest.raises(ValueError, match="needs the teacher's full logits"):
        shardkl.distillation_loss(student, shardkl.TopKTeacher(ids, logprobs), divergence="jsd")
    with pytest.raises(TypeError, match="TopKTeacher"):
        shardkl.distillation_loss(student, (ids, logprobs))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        shardkl.distillation_loss(student, teacher, divergence="jsd", beta=2.0)


def test_distillation_loss_module() -> None:
    student, teacher = _pair(seed=23)
    module = shardkl.nn.DistillationLoss("jsd", beta=0.2, reduction="sum", temperature=1.1)
    assert "divergence='jsd', beta=0.2" in repr(module)
    torch.testing.assert_close(
        module(student, teacher),
        shardkl.distillation_loss(student, teacher, divergence="jsd", beta=0.2, reduction="sum", temperature=1.1),
    )
    clone = copy.deepcopy(module)
    torch.testing.assert_close(clone(student, teacher), module(student, teacher))
    ids, logprobs = teacher_topk(teacher, 5)
    topk = shardkl.nn.DistillationLoss("reverse_kl", reduction="none")
    torch.testing.assert_close(
        topk(student, shardkl.TopKTeacher(ids, logprobs)), shardkl.topk_kl(student, ids, logprobs, direction="reverse")
    )
    with pytest.raises(ValueError, match="divergence='jsd' only"):
        shardkl.nn.DistillationLoss("reverse_kl", beta=0.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        shardkl.nn.DistillationLoss("jsd", reduction="mean")  # type: ignore[arg-type]


def test_reverse_kl_distillation_is_mode_seeking_and_forward_is_mass_covering() -> None:
    # a bimodal teacher and a student that can only move one logit: fit by gradient descent on each divergence
    vocab = 6
    teacher = torch.log(torch.tensor([0.45, 0.05, 0.0001, 0.0001, 0.05, 0.45], dtype=torch.float64))
    teacher = teacher - torch.logsumexp(teacher, -1)

    def fit(divergence: str) -> torch.Tensor:
        # a unimodal student family: logits -(v - mu)^2 / (2 s^2), parameters mu and log s
        params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.Adam([params], lr=0.05)
        positions = torch.arange(vocab, dtype=torch.float64)
        for _ in range(400):
            optimizer.zero_grad()
            logits = -((positions - params[0]) ** 2) / (2 * torch.exp(2 * params[1]))
            shardkl.distillation_loss(logits.unsqueeze(0), teacher.unsqueeze(0), divergence=divergence).backward()
            optimizer.step()
        logits = -((positions - params[0]) ** 2) / (2 * torch.exp(2 * params[1]))
        return F.softmax(logits.detach(), -1)

    reverse, forward = fit("reverse_kl"), fit("forward_kl")
    # mode-seeking: nearly all of the student's mass on one of the teacher's two modes
    assert max(reverse[0].item(), reverse[-1].item()) > 0.8
    # mass-covering: the student spreads over both modes (and the gap between them)
    assert reverse.max() > forward.max() + 0.2
    assert forward[0] > 0.05 and forward[-1] > 0.05
