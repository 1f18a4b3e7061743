"""Masked reductions of per-token values, in the aggregation modes of RL trainers.

The last dimension of a per-token tensor is the sequence; all leading dimensions index sequences.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

Reduction = Literal[
    "none", "sum", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"
]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def check_reduction(reduction: str) -> None:
    """Raise ``ValueError`` for an unknown reduction name."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_mask(mask: object, shape: torch.Size) -> None:
    """Raise for a mask that is not a bool/0-1 tensor shaped like the per-token result (one host sync)."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"mask must have the per-token shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"mask must be bool or hold only 0 and 1, got dtype {mask.dtype} with other values")


def reduce_tokens(values: Tensor, mask: Tensor | None = None, *, reduction: Reduction = "none") -> Tensor:
    """Reduce per-token values over the tokens that ``mask`` keeps.

    Args:
        values: per-token values, ``[..., seq]``.
        mask: bool or 0/1 tensor shaped like ``values`` (1 = the token counts); ``None`` keeps all.
        reduction: ``"none"`` (masked tokens set to 0), ``"sum"``, ``"token_mean"`` (mean over kept tokens),
            ``"seq_mean_token_mean"`` (mean per sequence, then over sequences) or ``"seq_mean_token_sum"`` (sum per
            sequence, then mean over sequences) or ``"seq_mean_token_sum_norm"`` (Dr. GRPO, verl's semantics: the
            sum over sequences of each sequence's token sum, divided by the horizon ``values.shape[-1]``, a
            constant, so no sequence is weighted by its length). Sequences with no kept token are left out of the
            mean over sequences; a mean over nothing is 0.

    Returns:
        ``values``' shape for ``"none"``, else a scalar.
    """
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a torch.Tensor of per-token values, got {type(values).__name__}")
    check_reduction(reduction)
    check_mask(mask, values.shape)
    return reduce_checked(values, mask, reduction)


def reduce_checked(values: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """:func:`reduce_tokens` for a reduction and mask that were already checked (no host sync)."""
    weight = torch.ones_like(values) if mask is None else mask.to(device=values.device, dtype=values.dtype)
    masked = torch.where(weight > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if reduction == "none":
        return masked
    if reduction == "sum":
        return masked.sum()
    if reduction == "token_mean":
        return masked.sum() / weight.sum().clamp(min=1)
    if reduction == "seq_mean_token_sum_norm":
        # divide by the padded length, not by a count of tokens or sequences (Dr. GRPO; verl's loss_agg_mode)
        horizon = values.shape[-1] if values.dim() else 1
        return masked.sum() / max(horizon, 1)
    seq_values = masked if masked.dim() else masked.reshape(1)
    seq_weight = weight if weight.dim() else weight.reshape(1)
    seq_sum = seq_values.sum(dim=-1)
    seq_count = seq_weight.sum(dim=-1)
    per_seq = seq_sum / seq_count.clamp(min=1) if reduction == "seq_mean_token_mean" else seq_sum
    has_tokens = (seq_count > 0).to(values.dtype)
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)
