"""Distillation divergences of vocabulary-sharded logits: generalised JSD, top-k teachers, and a loss helper.

- :func:`jsd`: ``β KL(P‖M) + (1−β) KL(Q‖M)``, ``M = βP + (1−β)Q``, over the full sharded vocabulary. For
  0 < β < 1 the forward takes two collectives (an all-gather of both inputs' per-rank log-sum-exps with the
  checks' metadata, then a sum over the ranks of the per-token partial divergences), the backward none. β = 0 and
  β = 1 are KL(P‖Q) and KL(Q‖P) (TRL's convention), one engine call each.
- :func:`topk_kl`: the KL between a teacher known only by its top-k log-probs and the student, over K + 1 buckets
  (the ids and an exact tail). One all-gather of ``K + 2`` floats per token per rank, whatever the vocabulary, none
  in backward.
- :func:`distillation_loss`: forward KL, reverse KL or JSD against full teacher logits or a :class:`TopKTeacher`,
  masked and reduced like :func:`shardkl.kl_penalty`.

Each function resolves its arguments at the one front door (:func:`shardkl._inputs.resolve`) and runs an op of the
engine (:mod:`shardkl._ops`): the same tiles, kernels (``options.impl``), collectives and autograd path as the
exact KL. ``docs/distillation.md`` has the derivations and the table of what each divergence does to a student.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor

from shardkl import _teacher_checks
from shardkl._divergences import Direction
from shardkl._engine import run
from shardkl._inputs import resolve
from shardkl._ops import JSDOp, TopKOp, run_kl
from shardkl.distributed import ProcessGroup
from shardkl.functional import exact_kl
from shardkl.layout import VocabLayout
from shardkl.linear import LinearLogits, Logits
from shardkl.options import Options
from shardkl.reduction import Reduction, check_reduction, reduce_checked

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
DIRECTIONS: tuple[str, ...] = get_args(Direction)


class TopKTeacher(NamedTuple):
    """A teacher known by its top-k per token, as an inference engine returns it.

    Attributes:
        ids: ``[..., K]`` global token ids, distinct within each token.
        logprobs: ``[..., K]`` the teacher's log-probabilities of those ids under its **full** distribution (not
            renormalised over the top-k), so their probabilities sum to at most 1.
    """

    ids: Tensor
    logprobs: Tensor


def _check_beta(beta: object) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a number in [0, 1], got {type(beta).__name__}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (the weight of p_logits' distribution in the mixture), got {beta}")
    return float(beta)


def jsd(
    p_logits: Logits,
    q_logits: Logits,
    *,
    beta: float = 0.5,
    group: ProcessGroup | None = None,
    layout: VocabLayout | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "none",
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    options: Options | None = None,
) -> Tensor:
    """Generalised Jensen-Shannon divergence ``β KL(P‖M) + (1−β) KL(Q‖M)``, ``M = βP + (1−β)Q``, per token.

    Over the full vocabulary sharded across ``group``, with gradients to both inputs. 0 < β < 1 takes two
    collectives in forward (the log-sum-exps, then a sum of per-token partial divergences) and none in backward.
    At the ends it follows TRL's GKD convention: ``beta=0`` is KL(P‖Q) and ``beta=1`` is KL(Q‖P) (one collective
    each), so ``jsd(teacher_logits, student_logits, beta=b)`` equals TRL's
    ``generalized_jsd_loss(student_logits, teacher_logits, beta=b)`` per token (there, β = 0 is the forward KL
    KL(teacher‖student) and β = 1 the reverse KL). Each vocabulary term is summed in a non-negative form, so the
    result is never negative, and 0 exactly for identical inputs.

    Args:
        p_logits: this rank's slice of the logits of P, ``[..., V_local]`` (or a DTensor sharded on its last
            dimension).
        q_logits: this rank's slice of the logits of Q, same shape.
        beta: the weight of P in the mixture, in ``[0, 1]``.
        group, layout, temperature, valid_vocab_size, options: as in :func:`shardkl.kl_stats`; the temperature
            divides both inputs.
        mask: bool or 0/1 tensor shaped like the result; 1 = the token counts.
        reduction: see :func:`shardkl.reduce_tokens`.

    Returns:
        Per-token JSD ``[...]`` (masked tokens are 0) or a scalar, float32 (float64 if either input is float64),
        the same on every rank. For 0 < β < 1 it is at most ``−β log β − (1−β) log(1−β)``.

    Shape:
        logits ``[..., V_local]`` → ``[...]``.
    """
    beta = _check_beta(beta)
    check_reduction(reduction)
    call = resolve(
        p_logits, q_logits, None, mask, group=group, layout=layout, valid_vocab_size=valid_vocab_size,
        temperature=temperature, options=options, two_inputs=True,
    )
    assert call.q is not None
    if beta == 0.0:
        values = run_kl(call, entropy=False).exact_kl
    elif beta == 1.0:
        # KL(Q‖P): the KL op with the two inputs' roles exchanged
        values = run_kl(call._replace(p=call.q, q=call.p, names=call.names[::-1]), entropy=False).exact_kl
    else:
        (values,) = run(call, JSDOp(beta, call.mask))
    return reduce_checked(values, call.mask, reduction)


def _check_direction(direction: object) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def topk_kl(
    student_logits: Logits,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    direction: Direction = "forward",
    group: ProcessGroup | None = None,
    layout: VocabLayout | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "none",
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    options: Options | None = None,
) -> Tensor:
    """KL between a top-k teacher and the student over K + 1 buckets: the K ids, and the rest of the vocabulary.

    The student's probabilities of the K ids and of the tail (everything else, its mass from a log-sum-exp over the
    other ids, never from ``1 − Σ``) against the teacher's ``exp(t_k)`` and tail ``1 − Σ_k exp(t_k)``. Unlike the
    KL truncated to the top-k (which goes negative) or renormalised over it, this is a KL between two distributions:
    never negative, 0 only when the buckets agree, a lower bound of the full-vocabulary KL (coarse-graining never
    increases a KL), and equal to it when K = V. One collective in forward (``K + 1`` floats per token per rank),
    none in backward; the gradient goes to the student logits only, and each rank's part is local.

    A teacher whose top-k probabilities sum to 1 leaves an empty tail: ``"forward"`` then gets nothing from the
    tail, ``"reverse"`` gets ``+inf`` wherever the student puts mass outside the ids (KL(S‖T) with T = 0 there).

    Args:
        student_logits: this rank's slice of the student's logits, ``[..., V_local]`` (or a DTensor).
        teacher_ids: ``[..., K]`` global ids, distinct within each token, in ``[0, V)``; the same on every rank.
        teacher_logprobs: ``[..., K]`` the teacher's log-probabilities of those ids under its full distribution
            (their probabilities sum to at most 1, up to rounding). Taken as given: ``temperature`` does not
            rescale them, and no gradient flows to them.
        direction: ``"forward"``: KL(teacher‖student), mass-covering; ``"reverse"``: KL(student‖teacher),
            mode-seeking.
        group, layout, valid_vocab_size, options: as in :func:`shardkl.kl_stats`.
        mask: bool or 0/1 tensor ``[...]``; 1 = the token counts. Rows with 0 are neither checked nor counted.
        reduction: see :func:`shardkl.reduce_tokens`.
        temperature: the student's distribution is ``softmax(student_logits / T)``.

    Returns:
        Per-token divergence ``[...]`` (masked tokens are 0) or a scalar, the same on every rank.

    Raises:
        ValueError: on every rank, before or from the one collective: ids/log-probs shapes that differ, duplicate
            ids in a token's top-k, ids outside ``[0, V)``, positive or NaN log-probs, probabilities summing above
            1 by more than the rounding of their dtype.
        TypeError: ids that are not integers.

    Shape:
        student ``[..., V_local]``, teacher ``[..., K]`` → ``[...]``.
    """
    _check_direction(direction)
    check_reduction(reduction)
    call = resolve(
        student_logits, None, None, mask, group=group, layout=layout, valid_vocab_size=valid_vocab_size,
        temperature=temperature, options=options, two_inputs=False, p_name="student_logits",
        per_token={"teacher_ids": teacher_ids, "teacher_logprobs": teacher_logprobs},
    )
    ids, logprobs = _teacher_checks.check_teacher(
        call.per_token["teacher_ids"], call.per_token["teacher_logprobs"], call.p.shape[:-1]
    )
    k = ids.shape[-1]
    device = call.p.hidden.device if isinstance(call.p, LinearLogits) else call.p.device
    ids = ids.to(device=device, dtype=torch.long).reshape(-1, k)
    logprobs = logprobs.detach().to(device=device).reshape(-1, k)
    (values,) = run(call, TopKOp(ids, logprobs, direction, call.mask))
    return reduce_checked(values, call.mask, reduction)


# --- the loss helper ------------------------------------------------------------------------------------------


def distillation_loss(
    student_logits: Logits,
    teacher: Logits | TopKTeacher,
    *,
    divergence: Divergence = "forward_kl",
    beta: float | None = None,
    group: ProcessGroup | None = None,
    layout: VocabLayout | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "token_mean",
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    options: Options | None = None,
) -> Tensor:
    """Distillation loss of a student against a teacher, over a vocabulary sharded across ``group``.

    ============  ======================  ================================================================
    divergence    value per token         what it does to the student
    ============  ======================  ================================================================
    forward_kl    KL(teacher‖student)     mass-covering: puts mass wherever the teacher has any
    reverse_kl    KL(student‖teacher)     mode-seeking: concentrates on the teacher's modes
    jsd           JSD_β (TRL's GKD)       between the two; β = 0 forward, β = 1 reverse (TRL's convention)
    ============  ======================  ================================================================

    ``docs/distillation.md`` has the gradient each one sends.

    Args:
        student_logits: this rank's slice of the student's logits ``[..., V_local]`` (or a DTensor).
        teacher: the teacher's logits, sharded like the student's (usually computed under ``torch.no_grad()``), or
            a :class:`TopKTeacher` (``"forward_kl"`` and ``"reverse_kl"`` only, over K + 1 buckets; see
            :func:`topk_kl`).
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: the JSD's mixture weight of the teacher, ``M = β·teacher + (1−β)·student``, default 0.5; only with
            ``divergence="jsd"``.
        group, layout, valid_vocab_size, options: as in :func:`shardkl.kl_stats`.
        mask: bool or 0/1 tensor ``[...]``, 1 = a token that counts (e.g. a response token).
        reduction: ``"token_mean"`` (default) or any of :func:`shardkl.reduce_tokens`' reductions, ``"none"`` for
            per-token values.
        temperature: divides the student's logits and full teacher logits (a top-k teacher's log-probs are taken
            as given).

    Returns:
        A scalar, or per-token values ``[...]`` for ``reduction="none"``.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if beta is not None and divergence != "jsd":
        raise ValueError(f"beta is the JSD's mixture weight and applies to divergence='jsd' only, got {divergence!r}")
    common: dict[str, Any] = {
        "group": group, "layout": layout, "mask": mask, "reduction": reduction, "temperature": temperature,
        "valid_vocab_size": valid_vocab_size, "options": options,
    }
    if isinstance(teacher, TopKTeacher):
        if divergence == "jsd":
            raise ValueError(
                "divergence='jsd' needs the teacher's full logits; a TopKTeacher supports 'forward_kl' and "
                "'reverse_kl' over K + 1 buckets"
            )
        direction: Direction = "forward" if divergence == "forward_kl" else "reverse"
        return topk_kl(student_logits, teacher.ids, teacher.logprobs, direction=direction, **common)
    if isinstance(teacher, tuple):
        raise TypeError(
            "a top-k teacher must be a shardkl.TopKTeacher(ids, logprobs), got a plain tuple; full teacher logits "
            "must be a tensor"
        )
    if divergence == "jsd":
        return jsd(teacher, student_logits, beta=0.5 if beta is None else beta, **common)
    # the KL op: one collective, both inputs' gradients; P is the first argument
    pair = (teacher, student_logits) if divergence == "forward_kl" else (student_logits, teacher)
    return exact_kl(*pair, **common)


__all__ = [
    "DIRECTIONS",
    "DIVERGENCES",
    "Direction",
    "Divergence",
    "TopKTeacher",
    "distillation_loss",
    "jsd",
    "topk_kl",
]
