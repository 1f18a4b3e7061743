"""KL penalty and policy-gradient losses for RL trainers, on sharded logits.

The penalty is KL(π‖π_ref) with π the policy, whose logits are ``p_logits`` (P, the sampling distribution, as
everywhere in shardkl), and π_ref the reference, ``q_logits`` (Q). Its per-token value comes from one engine call
(one collective, none in backward); what differs between estimators is the **gradient** it sends to the policy
logits. For tokens x ~ π:

============  ===========================================  ==============================================
estimator     value per token (log r = log π_ref − log π)   E_x~π[gradient w.r.t. the policy logits]
============  ===========================================  ==============================================
``exact``     Σ_v π_v log(π_v / π_ref,v), full vocabulary   ∇ KL(π‖π_ref), exactly (no sampling noise)
``k1``        −log r                                        0 (the score function has mean zero)
``k2``        (log r)² / 2                                  ∇ KL(π‖π_ref)
``k3``        r − 1 − log r                                 ∇ KL(π_ref‖π), the *reverse* KL
``k1+``       k1 (straight-through k2 gradient)              ∇ KL(π‖π_ref)
``k3+``       k3 (straight-through k2 gradient)              ∇ KL(π‖π_ref)
============  ===========================================  ==============================================

Derivation, with ∇ over the policy logits and E[∇ log π(x)] = 0: ∇k1 = ∇log π(x); ∇k2 = (log π − log π_ref)(x)
∇log π(x), whose mean is Σ_x ∇π_x (log π_x − log π_ref,x) = ∇KL(π‖π_ref); ∇k3 = (1 − r(x)) ∇log π(x), whose mean
is −Σ_x π_ref,x ∇log π_x = ∇(−E_π_ref[log π]) = ∇KL(π_ref‖π). verl's names are accepted: ``"kl"`` = k1,
``"mse"`` = k2, ``"low_var_kl"`` = k3, and ``"kl+"``/``"low_var_kl+"``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from shardkl import estimators
from shardkl._inputs import resolve
from shardkl._ops import KLStats, run_kl
from shardkl.distributed import ProcessGroup
from shardkl.layout import VocabLayout
from shardkl.linear import Logits
from shardkl.options import Options
from shardkl.reduction import Reduction, check_reduction, reduce_checked

Estimator = Literal["exact", "k1", "k2", "k3", "k1+", "k3+", "kl", "mse", "low_var_kl", "kl+", "low_var_kl+"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
# verl's names for the same estimators
ESTIMATOR_ALIASES: dict[str, str] = {"kl": "k1", "mse": "k2", "low_var_kl": "k3", "kl+": "k1+", "low_var_kl+": "k3+"}


def canonical_estimator(estimator: str) -> str:
    """``estimator`` with verl's aliases resolved; ``ValueError`` for an unknown name."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return ESTIMATOR_ALIASES.get(estimator, estimator)


def _check_clamp(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0 or None, got {value!r}")


def penalty_from_stats(
    stats: KLStats,
    *,
    estimator: Estimator = "exact",
    clamp: float | None = None,
    log_ratio_clamp: float | None = None,
) -> Tensor:
    """Per-token KL penalty from the results of :func:`shardkl.kl_stats` (no further collective).

    Args:
        stats: ``kl_stats(p_logits, q_logits, tokens)``; sampled estimators need the tokens.
        estimator: see the module docstring.
        clamp: clamp each token's value to ``[-clamp, clamp]`` (verl's ``low_var_kl`` uses 10, NeMo-RL's
            ``kl_output_clamp_value``); where it bites the gradient is 0, except in the ``+`` estimators, whose
            gradient is always the unclamped k2 one (as in verl).
        log_ratio_clamp: clamp ``log r`` to ``[-c, c]`` before a sampled estimator (verl: 20; NeMo-RL's
            ``kl_input_clamp_value``).

    Returns:
        Per-token penalty, shaped like ``stats.exact_kl``.
    """
    name = canonical_estimator(estimator)
    _check_clamp("clamp", clamp)
    _check_clamp("log_ratio_clamp", log_ratio_clamp)
    if name == "exact":
        if log_ratio_clamp is not None:
            raise ValueError("log_ratio_clamp applies to the sampled estimators only, got it with estimator='exact'")
        value = stats.exact_kl
        return value if clamp is None else value.clamp(max=clamp)
    if stats.p_logprobs is None or stats.q_logprobs is None:
        raise ValueError(f"estimator={estimator!r} is sampled and needs tokens sampled from the policy")
    log_ratio = stats.q_logprobs - stats.p_logprobs
    clamped = log_ratio if log_ratio_clamp is None else log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    value = estimators.from_log_ratio(clamped, name.rstrip("+"))  # type: ignore[arg-type]
    if clamp is not None:
        value = value.clamp(-clamp, clamp)
    if name.endswith("+"):
        # straight-through: the forward value is the estimator's, exactly (k2 - k2.detach() is exactly 0 where k2 is
        # finite), and the gradient is that of k2 from the unclamped log r (unbiased for on-policy x), as in verl
        surrogate = estimators.from_log_ratio(log_ratio, "k2")
        value = value.detach() + (surrogate - surrogate.detach())
    return value


def kl_penalty(
    p_logits: Logits,
    q_logits: Logits,
    tokens: Tensor | None = None,
    *,
    estimator: Estimator = "exact",
    group: ProcessGroup | None = None,
    layout: VocabLayout | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "token_mean",
    clamp: float | None = None,
    log_ratio_clamp: float | None = None,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    options: Options | None = None,
) -> Tensor:
    """KL(π‖π_ref) penalty for RL losses, over a vocabulary sharded across ``group`` (one collective).

    ``"exact"`` (the default, and the recommended estimator) uses the full vocabulary and gives the exact gradient
    of KL(π‖π_ref); the sampled estimators use only the tokens (see the table in :mod:`shardkl.losses` for the
    gradient each one gives in expectation).

    Args:
        p_logits: this rank's vocabulary slice of the policy logits ``[..., V_local]`` (or a DTensor); the tokens
            must be sampled from this policy for the sampled estimators to mean what the table says.
        q_logits: the reference policy's slice, same shape; usually computed under ``torch.no_grad()``.
        tokens: global token ids ``[...]``; required for every estimator but ``"exact"``.
        estimator: ``"exact"``, ``"k1"``, ``"k2"``, ``"k3"``, ``"k1+"``, ``"k3+"`` or verl's names.
        group, layout, temperature, valid_vocab_size, options: as in :func:`shardkl.kl_stats`.
        mask: bool or 0/1 tensor ``[...]``, 1 = response token that counts.
        reduction: ``"token_mean"`` (default), ``"seq_mean_token_sum"``, ``"seq_mean_token_mean"``,
            ``"seq_mean_token_sum_norm"``, ``"sum"`` or ``"none"``; see :func:`shardkl.reduce_tokens`.
        clamp, log_ratio_clamp: optional clamps, off by default; see :func:`penalty_from_stats`.

    Returns:
        A scalar, or the per-token penalty ``[...]`` for ``reduction="none"``.
    """
    name = canonical_estimator(estimator)
    check_reduction(reduction)
    if name != "exact" and tokens is None:
        raise ValueError(f"estimator={estimator!r} is sampled and needs tokens sampled from the policy")
    _check_clamp("clamp", clamp)
    _check_clamp("log_ratio_clamp", log_ratio_clamp)
    call = resolve(
        p_logits, q_logits, tokens if name != "exact" else None, mask, group=group, layout=layout,
        valid_vocab_size=valid_vocab_size, temperature=temperature, options=options, two_inputs=True,
    )
    stats = run_kl(call, entropy=False)
    per_token = penalty_from_stats(stats, estimator=estimator, clamp=clamp, log_ratio_clamp=log_ratio_clamp)
    return reduce_checked(per_token, call.mask, reduction)


class GRPOLoss(NamedTuple):
    """Terms of :func:`grpo_loss`; ``loss`` is the one to back-propagate.

    Attributes:
        loss: ``policy_loss + kl_coef * kl``.
        policy_loss: aggregated ``-advantage * log π(x)``.
        kl: aggregated KL penalty of the chosen estimator, unscaled.
        logprobs: per-token ``log π(x)`` ``[...]``, detached.
        exact_kl: per-token exact KL(π‖π_ref) ``[...]``, detached (free: it comes with the same collective).
    """

    loss: Tensor
    policy_loss: Tensor
    kl: Tensor
    logprobs: Tensor
    exact_kl: Tensor


def _advantages(advantages: object, shape: torch.Size) -> Tensor:
    """Per-token advantages from exactly one of three shapes: ``[...]`` as the tokens, or one per sequence, the
    tokens' shape without the last dimension or with a trailing 1 (broadcast over the sequence). A shape that merely
    broadcasts (``[T]`` for ``[B, T]`` tokens) is refused: it would silently apply one row to every sequence."""
    if not isinstance(advantages, Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    per_token = tuple(shape)
    if advantages.shape == per_token:
        return advantages
    if not per_token:
        raise ValueError(f"advantages must be per token (), as the tokens, got {tuple(advantages.shape)}")
    without_last, trailing_one = per_token[:-1], (*per_token[:-1], 1)
    if advantages.shape == trailing_one:
        return advantages
    if advantages.shape == without_last:
        return advantages.unsqueeze(-1)
    raise ValueError(
        f"advantages must be per token {per_token} or per sequence {without_last} or {trailing_one}, got "
        f"{tuple(advantages.shape)} (exactly one of these three shapes: one that merely broadcasts is refused)"
    )


def grpo_loss(
    p_logits: Logits,
    q_logits: Logits,
    tokens: Tensor,
    advantages: Tensor,
    *,
    kl_coef: float,
    estimator: Estimator = "exact",
    group: ProcessGroup | None = None,
    layout: VocabLayout | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "token_mean",
    clamp: float | None = None,
    log_ratio_clamp: float | None = None,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    options: Options | None = None,
) -> GRPOLoss:
    """On-policy GRPO-style loss ``-advantage · log π(x) + kl_coef · KL(π‖π_ref)`` with one collective.

    Args:
        p_logits, q_logits, tokens: as in :func:`kl_penalty`; ``tokens`` are the sampled responses.
        advantages: per-token ``[...]`` (the tokens' shape) or per-sequence advantages: the tokens' shape without
            the last dimension (``[B]`` for ``[B, T]`` tokens) or with a trailing 1 (``[B, 1]``). Exactly one of
            these three shapes: one that merely broadcasts (``[T]`` for ``[B, T]`` tokens) raises ``ValueError``.
        kl_coef: the KL coefficient (β in the GRPO paper).
        estimator, group, layout, mask, reduction, clamp, log_ratio_clamp, temperature, valid_vocab_size, options:
            as in :func:`kl_penalty`; both terms are aggregated with the same ``reduction`` and ``mask``.

    Returns:
        :class:`GRPOLoss`.
    """
    canonical_estimator(estimator)
    check_reduction(reduction)
    call = resolve(
        p_logits, q_logits, tokens, mask, group=group, layout=layout, valid_vocab_size=valid_vocab_size,
        temperature=temperature, options=options, two_inputs=True, per_token={"advantages": advantages},
    )
    assert call.tokens is not None
    per_token_advantage = _advantages(call.per_token["advantages"], call.tokens.shape)
    stats = run_kl(call, entropy=False)
    assert stats.p_logprobs is not None
    per_token_pg = -per_token_advantage.to(stats.p_logprobs.dtype) * stats.p_logprobs
    policy_loss = reduce_checked(per_token_pg, call.mask, reduction)
    penalty = penalty_from_stats(stats, estimator=estimator, clamp=clamp, log_ratio_clamp=log_ratio_clamp)
    kl = reduce_checked(penalty, call.mask, reduction)
    return GRPOLoss(policy_loss + kl_coef * kl, policy_loss, kl, stats.p_logprobs.detach(), stats.exact_kl.detach())


__all__ = [
    "ESTIMATORS",
    "ESTIMATOR_ALIASES",
    "Estimator",
    "GRPOLoss",
    "canonical_estimator",
    "grpo_loss",
    "kl_penalty",
    "penalty_from_stats",
]
