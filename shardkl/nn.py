"""``torch.nn`` modules over the functional API, for trainers that assemble their loss from modules."""

from __future__ import annotations

from torch import Tensor, nn

from shardkl.distributed import ProcessGroup
from shardkl.losses import PenaltyKind, canonical_kind, kl_penalty
from shardkl.reduction import Reduction, check_reduction


class KLPenalty(nn.Module):
    """``coef · KL(π‖π_ref)`` penalty of sharded logits, as a module; see :func:`shardkl.kl_penalty`.

    Args:
        kind: ``"exact"`` (default), ``"k1"``, ``"k2"``, ``"k3"``, ``"k1+"``, ``"k3+"`` or verl's names.
        coef: multiplies the penalty (β of the RL loss).
        group: process group of the vocabulary split, e.g. ``parallel_state.get_tensor_model_parallel_group()``.
        reduction, clamp, log_ratio_clamp, temperature, valid_vocab_size: as in :func:`shardkl.kl_penalty`.

    Example:
        >>> penalty = KLPenalty("exact", coef=0.04, group=tp_group)
        >>> loss = pg_loss + penalty(policy_logits, ref_logits, tokens, mask=response_mask)
    """

    def __init__(
        self,
        kind: PenaltyKind = "exact",
        *,
        coef: float = 1.0,
        group: ProcessGroup | None = None,
        reduction: Reduction = "token_mean",
        clamp: float | None = None,
        log_ratio_clamp: float | None = None,
        temperature: float = 1.0,
        valid_vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        canonical_kind(kind)
        check_reduction(reduction)
        self.kind = kind
        self.coef = coef
        self.group = group
        self.reduction = reduction
        self.clamp = clamp
        self.log_ratio_clamp = log_ratio_clamp
        self.temperature = temperature
        self.valid_vocab_size = valid_vocab_size

    def forward(
        self, policy_logits: Tensor, ref_logits: Tensor, tokens: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """The penalty; a scalar, or ``[...]`` per token with ``reduction="none"``."""
        value = kl_penalty(
            policy_logits,
            ref_logits,
            tokens,
            kind=self.kind,
            group=self.group,
            mask=mask,
            reduction=self.reduction,
            clamp=self.clamp,
            log_ratio_clamp=self.log_ratio_clamp,
            temperature=self.temperature,
            valid_vocab_size=self.valid_vocab_size,
        )
        return value * self.coef if self.coef != 1.0 else value

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, coef={self.coef}, reduction={self.reduction!r}, clamp={self.clamp}"


__all__ = ["KLPenalty"]
