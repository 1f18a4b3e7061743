"""RL loss helpers: which gradient each penalty kind gives in expectation, straight-through kinds, clamps."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import shardkl
from shardkl.losses import ESTIMATOR_ALIASES, ESTIMATORS
from shardkl.testing import count_collectives
from tests._distributed import local_layout, local_slice, run_ranks, split_sizes
from tests.reference import reference

VOCAB = 13
SAMPLES = 200_000


def _policies() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2024)
    a = torch.randn(VOCAB, generator=g, dtype=torch.float64)
    b = a + 0.8 * torch.randn(VOCAB, generator=g, dtype=torch.float64)
    return a, b


def _kl_gradients(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """∇_a of KL(π‖π_ref) and of KL(π_ref‖π), by float64 autograd on the full vocabulary, and zero."""
    out = {"zero": torch.zeros_like(a)}
    for name, forward in (("forward_kl", True), ("reverse_kl", False)):
        x = a.clone().requires_grad_()
        logp, logq = F.log_softmax(x, -1), F.log_softmax(b, -1)
        kl = (logp.exp() * (logp - logq)).sum() if forward else (logq.exp() * (logq - logp)).sum()
        kl.backward()
        out[name] = x.grad
    return out


# what theory says E_x~π[∇ penalty] is (module docstring of shardkl.losses)
EXPECTED_GRADIENT = {
    "exact": "forward_kl",
    "k1": "zero",
    "k2": "forward_kl",
    "k3": "reverse_kl",
    "k1+": "forward_kl",
    "k3+": "forward_kl",
}


@pytest.mark.parametrize("kind", ESTIMATORS)
def test_mean_gradient_of_each_kind_converges_where_theory_says(kind: str) -> None:
    a, b = _policies()
    targets = _kl_gradients(a, b)
    canonical = ESTIMATOR_ALIASES.get(kind, kind)
    tokens = torch.multinomial(
        torch.softmax(a, -1), SAMPLES, replacement=True, generator=torch.Generator().manual_seed(99)
    )  # on-policy: x ~ π
    policy = a.expand(SAMPLES, VOCAB).clone().requires_grad_()
    ref = b.expand(SAMPLES, VOCAB)
    # "sum": row i of the gradient is sample i's own gradient, so the standard error comes from the samples
    shardkl.kl_penalty(policy, ref, tokens, estimator=kind, reduction="sum").backward()
    per_sample = policy.grad
    mean = per_sample.mean(0)
    stderr = per_sample.std(0) / SAMPLES**0.5
    expected = targets[EXPECTED_GRADIENT[canonical]]
    if canonical == "exact":
        torch.testing.assert_close(mean, expected, rtol=1e-10, atol=1e-12)
        return
    z = ((mean - expected).abs() / stderr).max().item()
    assert z < 5.0, f"{kind}: mean gradient is {z:.1f} standard errors from {EXPECTED_GRADIENT[canonical]}"
    # and the test can tell the candidates apart: the other targets are far away in standard errors
    for name, other in targets.items():
        if name != EXPECTED_GRADIENT[canonical]:
            z_other = ((mean - other).abs() / stderr).max().item()
            assert z_other > 20.0, f"{kind}: cannot tell {name} from {EXPECTED_GRADIENT[canonical]} ({z_other:.1f})"


def test_straight_through_kinds_have_the_estimator_value_and_the_k2_gradient() -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(4, 6, 50, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(4, 6, 50, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 50, (4, 6), generator=g)
    grads = {}
    for kind in ("k1", "k2", "k3", "k1+", "k3+"):
        x = a.clone().requires_grad_()
        value = shardkl.kl_penalty(x, b, tokens, estimator=kind, reduction="none")
        value.sum().backward()
        grads[kind] = (value.detach(), x.grad)
    ref = reference(a, b, tokens)
    log_ratio = ref["q_logprobs"] - ref["p_logprobs"]
    torch.testing.assert_close(grads["k1+"][0], -log_ratio)
    torch.testing.assert_close(grads["k3+"][0], log_ratio.exp() - 1 - log_ratio)
    torch.testing.assert_close(grads["k2"][0], log_ratio.square() / 2)
    for kind in ("k1+", "k3+"):
        torch.testing.assert_close(grads[kind][0], grads[kind[:2]][0], rtol=0, atol=0)
        torch.testing.assert_close(grads[kind][1], grads["k2"][1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("clamps", [{}, {"clamp": 0.05}, {"log_ratio_clamp": 0.5}])
def test_straight_through_value_is_the_estimator_to_the_last_bit_in_float32(clamps: dict[str, float]) -> None:
    # k2 + (k - k2).detach() rounds the value to k2's ulp (0.040771 for 0.040818); the value must be k's own bits
    g = torch.Generator().manual_seed(0)
    a = 2 * torch.randn(64, 8, 300, generator=g)
    b = a + 1.5 * torch.randn(64, 8, 300, generator=g)
    tokens = torch.randint(0, 300, (64, 8), generator=g)
    for kind in ("k1", "k3"):
        value = shardkl.kl_penalty(a, b, tokens, estimator=kind, reduction="none", **clamps)
        straight = shardkl.kl_penalty(a, b, tokens, estimator=f"{kind}+", reduction="none", **clamps)
        assert straight.dtype == torch.float32
        assert torch.equal(straight, value), f"{kind}+: {(straight != value).sum()} values differ from {kind}'s"
        x = a.clone().requires_grad_()
        shardkl.kl_penalty(x, b, tokens, estimator=f"{kind}+", reduction="sum", **clamps).backward()
        k2 = a.clone().requires_grad_()
        shardkl.kl_penalty(k2, b, tokens, estimator="k2", reduction="sum").backward()
        assert torch.equal(x.grad, k2.grad), f"{kind}+: the gradient must be exactly k2's, unclamped"


def test_log_ratio_clamp_acts_on_both_sides_and_the_straight_through_gradient_ignores_it() -> None:
    # token 0 of row 0: log r = log π_ref(0) - log π(0) = +39.6; row 1: log r = -39.6
    a = torch.tensor([[-40.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0, 0.0], [-40.0, 0.0, 0.0]], dtype=torch.float64)
    tokens = torch.tensor([0, 0])
    ref = reference(a, b, tokens)
    log_ratio = ref["q_logprobs"] - ref["p_logprobs"]
    assert log_ratio[0] > 39 and log_ratio[1] < -39
    for kind in ("k1", "k2", "k3"):
        got = shardkl.kl_penalty(a, b, tokens, estimator=kind, reduction="none", log_ratio_clamp=5.0)
        expected = shardkl.estimators.from_log_ratio(log_ratio.clamp(-5.0, 5.0), kind)  # type: ignore[arg-type]
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{kind}: the clamp must bite on both sides")
    # the clamp bites on both rows, yet the + estimators' gradient is k2's from the unclamped log r (not zero)
    k2 = a.clone().requires_grad_()
    shardkl.kl_penalty(k2, b, tokens, estimator="k2", reduction="sum").backward()
    assert (k2.grad.abs() > 1).all(dim=-1).any()
    for kind in ("k1+", "k3+"):
        x = a.clone().requires_grad_()
        shardkl.kl_penalty(x, b, tokens, estimator=kind, reduction="sum", log_ratio_clamp=5.0).backward()
        torch.testing.assert_close(x.grad, k2.grad, rtol=0, atol=0, msg=f"{kind}: gradient from the clamped log r")


def test_clamps_as_in_verl() -> None:
    a = torch.tensor([[-40.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)  # log r = log π_ref(0) - log π(0) = 39.6
    tokens = torch.tensor([0])
    k3 = shardkl.kl_penalty(a, b, tokens, estimator="low_var_kl", reduction="none")
    assert k3.item() > 1e16
    clamped = shardkl.kl_penalty(a, b, tokens, estimator="low_var_kl", reduction="none", clamp=10.0,
                                 log_ratio_clamp=20.0)
    assert clamped.item() == 10.0
    log_r = torch.tensor(20.0, dtype=torch.float64)
    inner = shardkl.kl_penalty(a, b, tokens, estimator="k3", reduction="none", log_ratio_clamp=20.0)
    torch.testing.assert_close(inner, (log_r.exp() - 1 - log_r).reshape(1))
    x = a.clone().requires_grad_()
    shardkl.kl_penalty(x, b, tokens, estimator="k3", reduction="sum", clamp=10.0).backward()
    assert (x.grad == 0).all(), "a clamped value passes no gradient"
    x.grad = None
    shardkl.kl_penalty(x, b, tokens, estimator="k3+", reduction="sum", clamp=10.0).backward()
    assert x.grad.abs().sum() > 0, "the straight-through gradient is k2's, unclamped"
    exact = shardkl.kl_penalty(a, b, estimator="exact", reduction="none", clamp=0.25)
    assert exact.item() == 0.25  # KL = log(3/2) = 0.405 without the clamp
    with pytest.raises(ValueError, match="log_ratio_clamp applies to the sampled estimators"):
        shardkl.kl_penalty(a, b, estimator="exact", log_ratio_clamp=20.0)
    with pytest.raises(ValueError, match="clamp must be a number > 0"):
        shardkl.kl_penalty(a, b, estimator="exact", clamp=-1.0)


def test_kinds_reductions_and_errors() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 4, 20, generator=g)
    b = torch.randn(3, 4, 20, generator=g)
    tokens = torch.randint(0, 20, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    per_token = shardkl.exact_kl(a, b)
    for reduction in ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        torch.testing.assert_close(
            shardkl.kl_penalty(a, b, mask=mask, reduction=reduction),
            shardkl.reduce_tokens(per_token, mask, reduction=reduction),
        )
    for alias, kind in ESTIMATOR_ALIASES.items():
        torch.testing.assert_close(
            shardkl.kl_penalty(a, b, tokens, estimator=alias), shardkl.kl_penalty(a, b, tokens, estimator=kind)
        )
    torch.testing.assert_close(
        shardkl.kl_penalty(a, b, tokens, estimator="k3", reduction="none"), shardkl.sampled_kl(a, b, tokens)
    )
    with pytest.raises(ValueError, match="needs tokens"):
        shardkl.kl_penalty(a, b, estimator="k3")
    with pytest.raises(ValueError, match="estimator must be one of"):
        shardkl.kl_penalty(a, b, tokens, estimator="k4")  # type: ignore[arg-type]


def test_kl_penalty_module() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 5, 30, generator=g, requires_grad=True)
    b = torch.randn(2, 5, 30, generator=g)
    tokens = torch.randint(0, 30, (2, 5), generator=g)
    module = shardkl.nn.KLPenalty("k3+", kl_coef=0.25, reduction="seq_mean_token_mean")
    got = module(a, b, tokens)
    torch.testing.assert_close(got, 0.25 * shardkl.kl_penalty(a, b, tokens, estimator="k3+",
                                                               reduction="seq_mean_token_mean"))
    assert "k3+" in repr(module)
    with pytest.raises(ValueError, match="estimator must be one of"):
        shardkl.nn.KLPenalty("bogus")  # type: ignore[arg-type]


def test_grpo_loss_terms() -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(4, 6, 25, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 6, 25, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 25, (4, 6), generator=g)
    advantages = torch.randn(4, 1, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) > 0.3
    out = shardkl.grpo_loss(a, b, tokens, advantages, kl_coef=0.1, mask=mask)
    ref = reference(a, b, tokens)
    expected_pg = shardkl.reduce_tokens(-advantages * ref["p_logprobs"], mask, reduction="token_mean")
    expected_kl = shardkl.reduce_tokens(ref["exact_kl"], mask, reduction="token_mean")
    torch.testing.assert_close(out.policy_loss, expected_pg)
    torch.testing.assert_close(out.kl, expected_kl)
    torch.testing.assert_close(out.loss, expected_pg + 0.1 * expected_kl)
    (grad,) = torch.autograd.grad(out.loss, a)
    (expected_grad,) = torch.autograd.grad(expected_pg + 0.1 * expected_kl, a)
    torch.testing.assert_close(grad, expected_grad)
    # one advantage per sequence may come as [B] as well as [B, 1]
    per_sequence = shardkl.grpo_loss(a, b, tokens, advantages.squeeze(-1), kl_coef=0.1, mask=mask)
    torch.testing.assert_close(per_sequence.loss, out.loss)
    with pytest.raises(ValueError, match=r"advantages must be per token \(4, 6\) or per sequence \(4,\) or \(4, 1\)"):
        shardkl.grpo_loss(a, b, tokens, torch.zeros(5), kl_coef=0.1)


def test_grpo_advantages_take_exactly_three_shapes_and_refuse_what_merely_broadcasts() -> None:
    g = torch.Generator().manual_seed(6)
    a = torch.randn(4, 6, 25, generator=g, dtype=torch.float64)
    b = torch.randn(4, 6, 25, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 25, (4, 6), generator=g)
    per_sequence = torch.randn(4, generator=g, dtype=torch.float64)
    expected = shardkl.grpo_loss(a, b, tokens, per_sequence[:, None].expand(4, 6).clone(), kl_coef=0.1).policy_loss
    for accepted in (per_sequence, per_sequence[:, None]):
        got = shardkl.grpo_loss(a, b, tokens, accepted, kl_coef=0.1).policy_loss
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    listed = r"per token \(4, 6\) or per sequence \(4,\) or \(4, 1\), got "
    # [T] (per position), [1, T], [1], a scalar and [B, T, 1] all broadcast against [B, T] tokens: each is refused
    for shape in ((6,), (1, 6), (1,), (), (4, 6, 1), (1, 1)):
        with pytest.raises(ValueError, match=listed + re.escape(str(shape))):
            shardkl.grpo_loss(a, b, tokens, torch.zeros(shape, dtype=torch.float64), kl_coef=0.1)
    # one sequence of tokens [T]: per token [T], per sequence () or [1]
    row = shardkl.grpo_loss(a[0], b[0], tokens[0], per_sequence[0], kl_coef=0.1).policy_loss
    torch.testing.assert_close(shardkl.grpo_loss(a[0], b[0], tokens[0], per_sequence[:1], kl_coef=0.1).policy_loss,
                               row, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"per token \(6,\) or per sequence \(\) or \(1,\), got \(1, 6\)"):
        shardkl.grpo_loss(a[0], b[0], tokens[0], torch.zeros(1, 6, dtype=torch.float64), kl_coef=0.1)


def _check_kinds_sharded(rank: int, world: int) -> None:
    # a module holding a process group deep-copies (the copy shares the group, which cannot be copied)
    module = shardkl.nn.KLPenalty("k3+", kl_coef=0.5, layout=local_layout(split_sizes(101, world), rank))
    clone = copy.deepcopy(module)
    assert clone.layout is module.layout and clone.kl_coef == 0.5
    sizes = split_sizes(101, world, "uneven")
    g = torch.Generator().manual_seed(8)
    a = torch.randn(3, 7, 101, generator=g, dtype=torch.float64)
    b = a + 0.5 * torch.randn(3, 7, 101, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 101, (3, 7), generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.2
    for kind in ("exact", "k1", "k2", "k3", "k1+", "k3+"):
        full = a.clone().requires_grad_()
        expected = shardkl.kl_penalty(full, b, tokens, estimator=kind, mask=mask)
        expected.backward()
        x = local_slice(a, sizes, rank).clone().requires_grad_()
        with count_collectives() as counter:
            got = shardkl.kl_penalty(x, local_slice(b, sizes, rank), tokens, estimator=kind, mask=mask,
                                     layout=local_layout(sizes, rank))
            got.backward()
        assert counter.total == 1, counter.calls
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(x.grad, local_slice(full.grad, sizes, rank), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("world", [2, 3])
def test_kinds_on_sharded_vocabulary_match_single_process(world: int) -> None:
    run_ranks(_check_kinds_sharded, world)
