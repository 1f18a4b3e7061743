"""``torch.nn`` modules over the functional API, for trainers that assemble their loss from modules."""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from shardkl.distill import DIVERGENCES, Divergence, TopKTeacher, distillation_loss
from shardkl.distributed import ProcessGroup
from shardkl.layout import VocabLayout
from shardkl.linear import Logits
from shardkl.losses import Estimator, canonical_estimator, kl_penalty
from shardkl.options import Options, check_options
from shardkl.reduction import Reduction, check_reduction


class _SharesProcessGroup(nn.Module):
    """A module holding a process group (and a layout that refers to one): a deep copy shares them, since a process
    group cannot be copied."""

    group: ProcessGroup | None
    layout: VocabLayout | None

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        memo[id(self.group)] = self.group
        if self.layout is not None:
            memo[id(self.layout)] = self.layout
        clone = copy.copy(self)
        clone.__dict__ = copy.deepcopy(self.__dict__, memo)
        return clone


class KLPenalty(_SharesProcessGroup):
    """``kl_coef · KL(π‖π_ref)`` penalty of sharded logits, as a module; see :func:`shardkl.kl_penalty`.

    Args:
        estimator: ``"exact"`` (default), ``"k1"``, ``"k2"``, ``"k3"``, ``"k1+"``, ``"k3+"`` or verl's names.
        kl_coef: multiplies the penalty (β of the RL loss).
        group: process group of the vocabulary split, e.g. ``parallel_state.get_tensor_model_parallel_group()``.
        layout, reduction, clamp, log_ratio_clamp, temperature, valid_vocab_size, options: as in
            :func:`shardkl.kl_penalty`.

    A deep copy of the module shares its process group (a group cannot be copied).

    Example:
        >>> penalty = KLPenalty("exact", kl_coef=0.04, group=tp_group)
        >>> loss = pg_loss + penalty(policy_logits, ref_logits, tokens, mask=response_mask)
    """

    def __init__(
        self,
        estimator: Estimator = "exact",
        *,
        kl_coef: float = 1.0,
        group: ProcessGroup | None = None,
        layout: VocabLayout | None = None,
        reduction: Reduction = "token_mean",
        clamp: float | None = None,
        log_ratio_clamp: float | None = None,
        temperature: float = 1.0,
        valid_vocab_size: int | None = None,
        options: Options | None = None,
    ) -> None:
        super().__init__()
        canonical_estimator(estimator)
        check_reduction(reduction)
        self.estimator = estimator
        self.kl_coef = kl_coef
        self.group = group
        self.layout = layout
        self.reduction = reduction
        self.clamp = clamp
        self.log_ratio_clamp = log_ratio_clamp
        self.temperature = temperature
        self.valid_vocab_size = valid_vocab_size
        self.options = check_options(options)

    def forward(
        self, p_logits: Logits, q_logits: Logits, tokens: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """The penalty; a scalar, or ``[...]`` per token with ``reduction="none"``."""
        value = kl_penalty(
            p_logits,
            q_logits,
            tokens,
            estimator=self.estimator,
            group=self.group,
            layout=self.layout,
            mask=mask,
            reduction=self.reduction,
            clamp=self.clamp,
            log_ratio_clamp=self.log_ratio_clamp,
            temperature=self.temperature,
            valid_vocab_size=self.valid_vocab_size,
            options=self.options,
        )
        return value * self.kl_coef if self.kl_coef != 1.0 else value

    def extra_repr(self) -> str:
        return (
            f"estimator={self.estimator!r}, kl_coef={self.kl_coef}, reduction={self.reduction!r}, clamp={self.clamp}"
        )


class DistillationLoss(_SharesProcessGroup):
    """Distillation loss of sharded student logits against a teacher, as a module; see
    :func:`shardkl.distillation_loss`.

    Args:
        divergence: ``"forward_kl"`` (KL(teacher‖student), default), ``"reverse_kl"`` (KL(student‖teacher)) or
            ``"jsd"`` (TRL's generalised JSD with mixture weight ``beta``).
        beta: the JSD's mixture weight of the teacher (default 0.5); only with ``divergence="jsd"``.
        group: process group of the vocabulary split, e.g. ``parallel_state.get_tensor_model_parallel_group()``.
        layout, reduction, temperature, valid_vocab_size, options: as in :func:`shardkl.distillation_loss`.

    A deep copy of the module shares its process group (a group cannot be copied).

    Example:
        >>> loss_fn = DistillationLoss("jsd", beta=0.5, group=tp_group)
        >>> loss = loss_fn(student_logits, teacher_logits, mask=response_mask)
        >>> loss = DistillationLoss("reverse_kl", group=tp_group)(student_logits, TopKTeacher(ids, logprobs))
    """

    def __init__(
        self,
        divergence: Divergence = "forward_kl",
        *,
        beta: float | None = None,
        group: ProcessGroup | None = None,
        layout: VocabLayout | None = None,
        reduction: Reduction = "token_mean",
        temperature: float = 1.0,
        valid_vocab_size: int | None = None,
        options: Options | None = None,
    ) -> None:
        super().__init__()
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if beta is not None and divergence != "jsd":
            raise ValueError(
                f"beta is the JSD's mixture weight and applies to divergence='jsd' only, got {divergence!r}"
            )
        check_reduction(reduction)
        self.divergence = divergence
        self.beta = beta
        self.group = group
        self.layout = layout
        self.reduction = reduction
        self.temperature = temperature
        self.valid_vocab_size = valid_vocab_size
        self.options = check_options(options)

    def forward(self, student_logits: Logits, teacher: Logits | TopKTeacher, mask: Tensor | None = None) -> Tensor:
        """The loss; a scalar, or ``[...]`` per token with ``reduction="none"``."""
        return distillation_loss(
            student_logits,
            teacher,
            divergence=self.divergence,
            beta=self.beta,
            group=self.group,
            layout=self.layout,
            mask=mask,
            reduction=self.reduction,
            temperature=self.temperature,
            valid_vocab_size=self.valid_vocab_size,
            options=self.options,
        )

    def extra_repr(self) -> str:
        beta = "" if self.beta is None else f", beta={self.beta}"
        return f"divergence={self.divergence!r}{beta}, reduction={self.reduction!r}, temperature={self.temperature}"


__all__ = ["DistillationLoss", "KLPenalty"]
