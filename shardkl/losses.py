"""KL penalty and policy-gradient losses for RL trainers, on sharded logits.

The penalty is KL(π‖π_ref) with π the policy (the sampling distribution, ``P`` elsewhere in shardkl) and π_ref
the reference (``Q``). Its per-token value comes from one :func:`shardkl.kl_stats` call (one collective, none in
backward); what differs between kinds is the **gradient** it sends to the policy logits. For tokens x ~ π:

============  ===========================================  ==============================================
kind          value per token (log r = log π_ref − log π)   E_x~π[gradient w.r.t. the policy logits]
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

from shardkl._stats import exp_gap
from shardkl.distributed import ProcessGroup
from shardkl.functional import KLStats, kl_stats
from shardkl.integrations.dtensor import is_dtensor
from shardkl.reduction import Reduction, check_mask, check_reduction, reduce_tokens

PenaltyKind = Literal["exact", "k1", "k2", "k3", "k1+", "k3+", "kl", "mse", "low_var_kl", "kl+", "low_var_kl+"]
PENALTY_KINDS: tuple[str, ...] = get_args(PenaltyKind)
# verl's names for the same estimators
KIND_ALIASES: dict[str, str] = {"kl": "k1", "mse": "k2", "low_var_kl": "k3", "kl+": "k1+", "low_var_kl+": "k3+"}


def canonical_kind(kind: str) -> str:
    """``kind`` with verl's aliases resolved; ``ValueError`` for an unknown name."""
    if kind not in PENALTY_KINDS:
        raise ValueError(f"kind must be one of {PENALTY_KINDS}, got {kind!r}")
    return KIND_ALIASES.get(kind, kind)


def _check_clamp(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0 or None, got {value!r}")


def penalty_from_stats(
    stats: KLStats, *, kind: PenaltyKind = "exact", clamp: float | None = None, log_ratio_clamp: float | None = None
) -> Tensor:
    """Per-token KL penalty from the results of :func:`shardkl.kl_stats` (no further collective).

    Args:
        stats: ``kl_stats(policy_logits, ref_logits, tokens)``; sampled kinds need the tokens.
        kind: see the module docstring.
        clamp: clamp each token's value to ``[-clamp, clamp]`` (verl's ``low_var_kl`` uses 10, NeMo-RL's
            ``kl_output_clamp_value``); where it bites the gradient is 0, except in the ``+`` kinds, whose
            gradient is always the unclamped k2 one (as in verl).
        log_ratio_clamp: clamp ``log r`` to ``[-c, c]`` before a sampled estimator (verl: 20; NeMo-RL's
            ``kl_input_clamp_value``).

    Returns:
        Per-token penalty, shaped like ``stats.exact_kl``.
    """
    kind = canonical_kind(kind)  # type: ignore[assignment]
    _check_clamp("clamp", clamp)
    _check_clamp("log_ratio_clamp", log_ratio_clamp)
    if kind == "exact":
        if log_ratio_clamp is not None:
            raise ValueError("log_ratio_clamp applies to the sampled kinds only, got it with kind='exact'")
        value = stats.exact_kl
        return value if clamp is None else value.clamp(max=clamp)
    if stats.p_logprobs is None or stats.q_logprobs is None:
        raise ValueError(f"kind={kind!r} is a sampled estimator and needs tokens sampled from the policy")
    log_ratio = stats.q_logprobs - stats.p_logprobs
    clamped = log_ratio if log_ratio_clamp is None else log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    base = kind.rstrip("+")
    if base == "k1":
        value = -clamped
    elif base == "k2":
        value = clamped.square() / 2
    else:
        # r - 1 - log r without the cancellation of exp(d) - 1 - d at small d
        value = exp_gap(clamped)
    if clamp is not None:
        value = value.clamp(-clamp, clamp)
    if kind.endswith("+"):
        # straight-through: the forward value is the estimator, the gradient is k2's (unbiased for on-policy x)
        surrogate = log_ratio.square() / 2
        value = surrogate + (value - surrogate).detach()
    return value


def kl_penalty(
    policy_logits: Tensor,
    ref_logits: Tensor,
    tokens: Tensor | None = None,
    *,
    kind: PenaltyKind = "exact",
    group: ProcessGroup | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "token_mean",
    clamp: float | None = None,
    log_ratio_clamp: float | None = None,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
) -> Tensor:
    """KL(π‖π_ref) penalty for RL losses, over a vocabulary sharded across ``group`` (one collective).

    ``"exact"`` (the default, and the recommended kind) uses the full vocabulary and gives the exact gradient of
    KL(π‖π_ref); the sampled kinds use only the tokens (see the table in :mod:`shardkl.losses` for the gradient
    each one gives in expectation).

    Args:
        policy_logits: this rank's vocabulary slice of the policy logits ``[..., V_local]`` (or a DTensor); the
            tokens must be sampled from this policy for the sampled kinds to mean what the table says.
        ref_logits: the reference policy's slice, same shape; usually computed under ``torch.no_grad()``.
        tokens: global token ids ``[...]``; required for every kind but ``"exact"``.
        kind: ``"exact"``, ``"k1"``, ``"k2"``, ``"k3"``, ``"k1+"``, ``"k3+"`` or verl's names.
        group: process group the vocabulary is split over (e.g. Megatron's tensor-parallel group); ``None`` for
            full-vocabulary tensors or DTensors.
        mask: bool or 0/1 tensor ``[...]``, 1 = response token that counts.
        reduction: ``"token_mean"`` (default), ``"seq_mean_token_sum"``, ``"seq_mean_token_mean"``,
            ``"seq_mean_token_sum_norm"``, ``"sum"`` or ``"none"``; see :func:`shardkl.reduce_tokens`.
        clamp, log_ratio_clamp: optional clamps, off by default; see :func:`penalty_from_stats`.
        temperature: sampling temperature, applied to both logits.
        valid_vocab_size: real vocabulary size when the vocabulary is padded (Megatron); padding is ignored.

    Returns:
        A scalar, or the per-token penalty ``[...]`` for ``reduction="none"``.
    """
    kind_name = canonical_kind(kind)
    check_reduction(reduction)
    if kind_name != "exact" and tokens is None:
        raise ValueError(f"kind={kind!r} is a sampled estimator and needs tokens sampled from the policy")
    _check_clamp("clamp", clamp)
    _check_clamp("log_ratio_clamp", log_ratio_clamp)
    stats = kl_stats(
        policy_logits,
        ref_logits,
        tokens if kind_name != "exact" else None,
        group=group,
        temperature=temperature,
        valid_vocab_size=valid_vocab_size,
    )
    per_token = penalty_from_stats(stats, kind=kind, clamp=clamp, log_ratio_clamp=log_ratio_clamp)
    return reduce_tokens(per_token, _local_mask(mask), reduction=reduction)


def _local_mask(mask: Tensor | None) -> Tensor | None:
    # a per-token DTensor (mask, tokens, advantages; replicated over the vocabulary group) pairs with the plain
    # per-token results, which hold this rank's rows
    return mask.to_local() if mask is not None and is_dtensor(mask) else mask  # type: ignore[attr-defined]


class GRPOLoss(NamedTuple):
    """Terms of :func:`grpo_loss`; ``loss`` is the one to back-propagate.

    Attributes:
        loss: ``policy_loss + beta * kl``.
        policy_loss: aggregated ``-advantage * log π(x)``.
        kl: aggregated KL penalty of the chosen kind.
        logprobs: per-token ``log π(x)`` ``[...]``, detached.
        exact_kl: per-token exact KL(π‖π_ref) ``[...]``, detached (free: it comes with the same collective).
    """

    loss: Tensor
    policy_loss: Tensor
    kl: Tensor
    logprobs: Tensor
    exact_kl: Tensor


def grpo_loss(
    policy_logits: Tensor,
    ref_logits: Tensor,
    tokens: Tensor,
    advantages: Tensor,
    *,
    beta: float,
    kind: PenaltyKind = "exact",
    group: ProcessGroup | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "token_mean",
    clamp: float | None = None,
    log_ratio_clamp: float | None = None,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
) -> GRPOLoss:
    """On-policy GRPO-style loss ``-advantage · log π(x) + β · KL(π‖π_ref)`` with one collective.

    Args:
        policy_logits, ref_logits, tokens: as in :func:`kl_penalty`; ``tokens`` are the sampled responses.
        advantages: per-token or per-sequence advantages, broadcastable to ``tokens.shape`` (e.g. ``[B, 1]``).
        beta: KL coefficient.
        kind, group, mask, reduction, clamp, log_ratio_clamp, temperature, valid_vocab_size: as in
            :func:`kl_penalty`; both terms are aggregated with the same ``reduction`` and ``mask``.

    Returns:
        :class:`GRPOLoss`.
    """
    canonical_kind(kind)
    check_reduction(reduction)
    tokens, advantages = _local_mask(tokens), _local_mask(advantages)  # type: ignore[assignment]
    if not isinstance(advantages, Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    try:
        broadcastable = torch.broadcast_shapes(advantages.shape, tokens.shape) == tokens.shape
    except RuntimeError:
        broadcastable = False
    if not broadcastable:
        raise ValueError(
            f"advantages must broadcast to the tokens' shape {tuple(tokens.shape)}, got {tuple(advantages.shape)}"
        )
    mask = _local_mask(mask)
    check_mask(mask, tokens.shape)
    stats = kl_stats(
        policy_logits, ref_logits, tokens, group=group, temperature=temperature, valid_vocab_size=valid_vocab_size
    )
    assert stats.p_logprobs is not None
    per_token_pg = -advantages.to(stats.p_logprobs.dtype) * stats.p_logprobs
    policy_loss = reduce_tokens(per_token_pg, mask, reduction=reduction)
    penalty = penalty_from_stats(stats, kind=kind, clamp=clamp, log_ratio_clamp=log_ratio_clamp)
    kl = reduce_tokens(penalty, mask, reduction=reduction)
    return GRPOLoss(policy_loss + beta * kl, policy_loss, kl, stats.p_logprobs.detach(), stats.exact_kl.detach())


__all__ = [
    "KIND_ALIASES",
    "PENALTY_KINDS",
    "GRPOLoss",
    "PenaltyKind",
    "canonical_kind",
    "grpo_loss",
    "kl_penalty",
    "penalty_from_stats",
]
