"""Checks of a top-k teacher's ids and log-probs that ride in the one all-gather of :func:`shardkl.topk_kl`.

The checks that need only types and shapes (:func:`check_teacher`) run locally before any collective; they give
the same answer on every rank because every rank is passed the same arguments. The checks of the values
(duplicate ids in a token's top-k, ids outside ``[0, V)``, positive log-probs, probabilities summing above 1) are a
fixed-length vector of counts per rank (:func:`teacher_meta`, on the device, no host sync) appended to the gather;
after it, every rank runs :func:`check_gathered_teacher` on the same numbers and raises the same ``ValueError``, or
none does. ``V`` itself is only known after the gather. Rows that the mask drops are not checked (a padded position
may hold anything). No communication here.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Largest logsumexp of a token's teacher log-probs (the log of their total probability) that still counts as
# rounding: a top-V teacher in float32 sums to 1 within ~1e-6, bfloat16 log-probs (8 bits) within ~1e-2.
SUM_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
DEFAULT_TOLERANCE = 1e-4

# Layout of the per-rank teacher metadata vector (float64: every count and id below 2**53 is exact).
(
    K,
    ID_MIN,
    ID_MAX,
    ID_SUM,
    DUPLICATE_ROWS,
    FIRST_DUPLICATE,
    NAN_COUNT,
    FIRST_NAN,
    POSITIVE_COUNT,
    MAX_LOGPROB,
    OVER_ONE_ROWS,
    MAX_LOG_TOTAL,
    FIRST_OVER_ONE,
    TOLERANCE,
) = range(14)
NUM_TEACHER_META = 14


def check_teacher(teacher_ids: object, teacher_logprobs: object, lead_shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Types and shapes of a top-k teacher, checked locally; returns ``(ids, logprobs)`` unchanged.

    Raises:
        TypeError: not tensors, ids not integer, log-probs not floating.
        ValueError: shapes that are not ``[..., K]`` with the student's leading shape, or ``K == 0``.
    """
    if not isinstance(teacher_ids, Tensor):
        raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(teacher_ids).__name__}")
    if not isinstance(teacher_logprobs, Tensor):
        raise TypeError(f"teacher_logprobs must be a torch.Tensor, got {type(teacher_logprobs).__name__}")
    if teacher_ids.dtype.is_floating_point or teacher_ids.dtype.is_complex or teacher_ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must have an integer dtype (global token ids), got {teacher_ids.dtype}")
    if not teacher_logprobs.is_floating_point():
        raise TypeError(f"teacher_logprobs must have a floating dtype, got {teacher_logprobs.dtype}")
    if teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(
            f"teacher_ids and teacher_logprobs must have the same shape [..., K], got {tuple(teacher_ids.shape)} "
            f"and {tuple(teacher_logprobs.shape)}"
        )
    if teacher_ids.dim() != len(lead_shape) + 1 or teacher_ids.shape[:-1] != lead_shape:
        raise ValueError(
            f"teacher_ids must have shape [*{tuple(lead_shape)}, K] (the student logits' shape with K in place of "
            f"the vocabulary), got {tuple(teacher_ids.shape)}"
        )
    if teacher_ids.shape[-1] == 0:
        raise ValueError("teacher_ids must hold at least one id per token (K >= 1), got K = 0")
    return teacher_ids, teacher_logprobs


def _first(bad: Tensor) -> Tensor:
    """Index of the first True in a 1-D bool tensor, or -1; a 0-d tensor (no host sync)."""
    if not bad.numel():
        return torch.tensor(-1.0, dtype=torch.float64, device=bad.device)
    return torch.where(bad.any(), bad.to(torch.uint8).argmax(), -1).to(torch.float64)


def teacher_meta(ids: Tensor, logprobs: Tensor, keep: Tensor | None) -> Tensor:
    """``[NUM_TEACHER_META]`` float64 counts of this rank's teacher inputs, on their device.

    Args:
        ids: ``[rows, K]`` int64 global ids.
        logprobs: ``[rows, K]`` the teacher's log-probs (any float dtype).
        keep: ``[rows]`` bool, the rows that count (``None``: all).
    """
    device = ids.device
    rows, k = ids.shape
    tolerance = SUM_TOLERANCE.get(logprobs.dtype, DEFAULT_TOLERANCE)
    # the log-probs in fp32 (or their float64): no copy for the usual fp32 input
    t = logprobs if logprobs.dtype in (torch.float32, torch.float64) else logprobs.float()
    values: list[Tensor | float] = [0.0] * NUM_TEACHER_META
    values[K] = float(k)
    values[TOLERANCE] = tolerance
    kept = None if keep is None else keep.unsqueeze(-1)
    if ids.numel():
        # dropped rows move neither the minimum nor the maximum; no kept row at all reads as ids in range
        int64 = torch.iinfo(torch.int64)
        lowest = ids if kept is None else ids.masked_fill(~kept, int64.max)
        values[ID_MIN] = lowest.min().double()
        del lowest
        highest = ids if kept is None else ids.masked_fill(~kept, int64.min)
        values[ID_MAX] = highest.max().double()
        del highest
        if kept is not None:
            any_kept = kept.any()
            values[ID_MIN] = torch.where(any_kept, values[ID_MIN], 0.0)
            values[ID_MAX] = torch.where(any_kept, values[ID_MAX], 0.0)
    values[ID_SUM] = (ids if kept is None else ids.masked_fill(~kept, 0)).sum().double()
    keep = torch.ones(rows, dtype=torch.bool, device=device) if keep is None else keep
    # a duplicate shows as two equal neighbours once each row is sorted
    ordered = ids.sort(dim=-1).values
    duplicate = ((ordered[:, 1:] == ordered[:, :-1]).any(-1) if k > 1 else torch.zeros_like(keep)) & keep
    del ordered
    values[DUPLICATE_ROWS] = duplicate.sum().double()
    values[FIRST_DUPLICATE] = _first(duplicate)
    nan = (torch.isnan(t).any(-1) | (t == float("inf")).any(-1)) & keep
    values[NAN_COUNT] = nan.sum().double()
    values[FIRST_NAN] = _first(nan)
    finite = torch.where(keep.unsqueeze(-1) & ~torch.isnan(t), t, float("-inf"))
    values[POSITIVE_COUNT] = (finite > tolerance).sum().double()
    values[MAX_LOGPROB] = finite.max().double() if finite.numel() else float("-inf")
    log_total = torch.logsumexp(finite, dim=-1)
    del finite
    over = log_total > tolerance
    values[OVER_ONE_ROWS] = over.sum().double()
    values[MAX_LOG_TOTAL] = log_total.max().double() if log_total.numel() else float("-inf")
    values[FIRST_OVER_ONE] = _first(over)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])


def check_gathered_teacher(meta: list[list[float]], valid_vocab: int, *, validate: bool) -> None:
    """Raise the same ``ValueError`` on every rank if any rank's teacher inputs are bad.

    Args:
        meta: the gathered teacher metadata, one list per rank in rank order.
        valid_vocab: the number of real vocabulary ids, known only after the gather.
        validate: also check that the ranks passed the same teacher ids.
    """
    for r, row in enumerate(meta):
        where = f" on rank {r}" if len(meta) > 1 else ""
        if row[NAN_COUNT] > 0:
            raise ValueError(
                f"teacher_logprobs hold NaN or +inf in {int(row[NAN_COUNT])} token row(s){where} (first at flat "
                f"token index {int(row[FIRST_NAN])}); log-probabilities must be <= 0 or -inf"
            )
        if row[POSITIVE_COUNT] > 0:
            raise ValueError(
                f"teacher_logprobs must be log-probabilities (<= 0), got {int(row[POSITIVE_COUNT])} positive "
                f"value(s){where}, the largest {row[MAX_LOGPROB]:.6g}"
            )
        if row[OVER_ONE_ROWS] > 0:
            raise ValueError(
                f"the teacher's top-k probabilities must sum to at most 1 (they are log-probs under its full "
                f"distribution), but {int(row[OVER_ONE_ROWS])} token row(s){where} sum to more (the largest "
                f"exp(logsumexp) = 1 + {row[MAX_LOG_TOTAL]:.3g}, first at flat token index "
                f"{int(row[FIRST_OVER_ONE])}; rounding tolerance {row[TOLERANCE]:g} in log space). Renormalised "
                "top-k log-probs are not the teacher's log-probs"
            )
        if row[DUPLICATE_ROWS] > 0:
            raise ValueError(
                f"teacher_ids must be distinct within each token's top-k, got duplicates in "
                f"{int(row[DUPLICATE_ROWS])} token row(s){where} (first at flat token index "
                f"{int(row[FIRST_DUPLICATE])})"
            )
        lo, hi = int(row[ID_MIN]), int(row[ID_MAX])
        if lo < 0 or hi >= valid_vocab:
            raise ValueError(
                f"teacher_ids must be ids in [0, {valid_vocab}) (the vocabulary size, summed over the shards), "
                f"got min {lo} and max {hi}{where}"
            )
    if validate and any(row[ID_SUM] != meta[0][ID_SUM] for row in meta):
        sums = ", ".join(f"rank {r}: {row[ID_SUM]:.0f}" for r, row in enumerate(meta))
        raise ValueError(
            f"ranks passed different teacher_ids (sums of the ids: {sums}); every rank of the group must pass the "
            "same teacher_ids and teacher_logprobs"
        )


__all__ = [
    "DEFAULT_TOLERANCE",
    "NUM_TEACHER_META",
    "SUM_TOLERANCE",
    "check_gathered_teacher",
    "check_teacher",
    "teacher_meta",
]
