"""Distillation divergences of vocabulary-sharded logits: generalised JSD, top-k teachers, and a loss helper.

- :func:`jsd`: ``β KL(P‖M) + (1−β) KL(Q‖M)``, ``M = βP + (1−β)Q``, over the full sharded vocabulary. For
  0 < β < 1 the forward takes two collectives (an all-gather of both inputs' per-rank log-sum-exps with the
  checks' metadata, then a sum over the ranks of the per-token partial divergences), the backward none. β = 0 and
  β = 1 are KL(P‖Q) and KL(Q‖P) (TRL's convention), one engine call each.
- :func:`topk_kl`: the KL between a teacher known only by its top-k log-probs and the student, over K + 1 buckets
  (the ids and an exact tail). One all-gather of the student's log-sum-exp without the ids and its logits at the
  ids (``K + 1`` floats per token per rank, whatever the vocabulary; its full log-sum-exp is their merge), none in
  backward.
- :func:`distillation_loss`: forward KL, reverse KL or JSD against full teacher logits or a :class:`TopKTeacher`,
  masked and reduced like :func:`shardkl.kl_penalty`.

The per-tile math lives in :mod:`shardkl._divergences` (no communication); this module walks ``[rows, cols]`` tiles
of logits (bounded memory, as the engine's kernels do), adds the collectives and checks, and defines the autograd
Functions. ``docs/distillation.md`` has the derivations and the table of what each divergence does to a student.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor

from shardkl import _divergences, _teacher_checks, _validation
from shardkl._divergences import Direction
from shardkl._dtensor import is_dtensor, to_local_like, unwrap_logits
from shardkl._engine import EngineSpec, _options_code, _row_blocks, compute_dtype
from shardkl._inputs import Call, resolve
from shardkl.distributed import ProcessGroup, all_gather_flat, all_reduce_sum, check_tiling
from shardkl.functional import exact_kl, run_engine
from shardkl.kernels import eager, scaled
from shardkl.layout import VocabLayout
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


# --- tiles of logits ------------------------------------------------------------------------------------------


class _DenseLogits:
    """``[rows, cols]`` tiles of scaled logits read from a ``[..., V_local]`` tensor, and its gradient.

    A tile is a view of the tensor (converted to the compute dtype, divided by the temperature); only a tile whose
    rows span blocks of a tensor that is not viewable as 2-D (e.g. ``logits[:, :-1]``) is copied.
    """

    def __init__(self, logits: Tensor, dtype: torch.dtype, temperature: float) -> None:
        self.logits = logits
        self.dtype = dtype
        self.temperature = temperature
        self.vocab = logits.shape[-1]
        self.rows = math.prod(logits.shape[:-1])
        self._blocks = [(row0, block) for row0, block, _ in _row_blocks(logits, None)] if logits.numel() else []

    def tile(self, rows: slice, cols: slice) -> Tensor:
        pieces = []
        for row0, block in self._blocks:
            lo, hi = max(rows.start, row0), min(rows.stop, row0 + block.shape[0])
            if lo < hi:
                pieces.append(block[lo - row0 : hi - row0, cols])
        return scaled(pieces[0] if len(pieces) == 1 else torch.cat(pieces), self.dtype, self.temperature)

    def new_grad(self) -> Tensor:
        return torch.zeros(self.logits.shape, dtype=self.logits.dtype, device=self.logits.device)

    def write_grad(self, grad: Tensor, rows: slice, cols: slice, tile_grad: Tensor) -> None:
        """Store the gradient with respect to one tile of *scaled* logits (``1/T`` applied here)."""
        if self.temperature != 1.0:
            tile_grad = tile_grad * (1.0 / self.temperature)
        grad.view(-1, self.vocab)[rows, cols] = tile_grad.to(grad.dtype)


def _tiles(rows: int, vocab: int) -> Iterator[tuple[slice, list[slice]]]:
    """The engine's eager tiling: row blocks, each with its vocabulary chunks (none for an empty shard)."""
    if rows == 0 or vocab == 0:
        return
    yield from eager.tiles(rows, vocab)


# --- the shared gather ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """Everything about a divergence call that is not a tensor."""

    engine: EngineSpec
    beta: float = 0.5
    direction: Direction = "forward"


def _call_info(spec: EngineSpec, p: Tensor, q_dtype: torch.dtype | None, rows: int) -> _validation.CallInfo:
    return _validation.CallInfo(
        layout=spec.layout,
        layout_given=spec.layout_given,
        kept=p.shape[-1],
        rows=rows,
        lead_shape=p.shape[:-1],
        p_dtype=p.dtype,
        q_dtype=q_dtype,
        temperature=spec.temperature,
        nan_policy=spec.options.nan_policy,
        options_code=_options_code(spec.options),
    )


def _gather(body: Tensor, extra_meta: Tensor | None, meta: Tensor, spec: EngineSpec, what: str) -> Tensor:
    """All-gather ``[body, extra_meta, meta]`` as one float64 vector per rank; returns ``[world, length]``."""
    pieces = [body.to(torch.float64).reshape(-1)]
    if extra_meta is not None:
        pieces.append(extra_meta)
    pieces.append(meta)
    return all_gather_flat(torch.cat(pieces), spec.layout.group, what=what, timeout_s=spec.options.resolved_timeout_s)


def _no_mass(rows: int, dtype: torch.dtype, device: torch.device, *shape: int) -> Tensor:
    return torch.full((*shape, rows) if shape else (rows,), float("-inf"), dtype=dtype, device=device)


# --- generalised JSD ------------------------------------------------------------------------------------------


class _JSDFunction(torch.autograd.Function):
    """Per-token ``JSD_β`` of sharded logits for 0 < β < 1: two collectives in forward, none in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, a: Tensor, b: Tensor, mask: Tensor | None, spec: _Spec
    ) -> Tensor:
        dtype = compute_dtype(a, b)
        engine, beta = spec.engine, spec.beta
        lead_shape = a.shape[:-1]
        src_a = _DenseLogits(a, dtype, engine.temperature)
        src_b = _DenseLogits(b, dtype, engine.temperature)
        rows, vocab = src_a.rows, src_a.vocab
        lse = _no_mass(rows, dtype, a.device, 2)
        for rs, col_slices in _tiles(rows, vocab):
            leaves = [
                torch.stack((_divergences.tile_lse(src_a.tile(rs, cs)), _divergences.tile_lse(src_b.tile(rs, cs))))
                for cs in col_slices
            ]
            lse[:, rs] = torch.logsumexp(torch.stack(leaves), dim=0)
        zeros = torch.zeros(rows, dtype=dtype, device=a.device)
        # the engine's stats layout (LA, ENT, LB, KL), so the shared checks read NaN and +inf of both inputs
        stats = torch.stack((lse[0], zeros, lse[1], zeros))
        meta = _validation.local_meta(_call_info(engine, a, b.dtype, rows), stats, a, None, mask)
        # Collective 1 of 2: every rank's log-sum-exps of both inputs (log M needs the global ones) and metadata.
        gathered = _gather(lse, None, meta, engine, "log-sum-exps of the JSD")
        world = gathered.shape[0]
        # every rank checks the same gathered numbers, so all of them raise (or none does)
        _validation.check_gathered(
            gathered[:, -_validation.NUM_META :].tolist(), validate=engine.options.validate, shape=lead_shape
        )
        # merged in float64, in rank order: the same on every rank
        merged = torch.logsumexp(gathered[:, : 2 * rows].reshape(world, 2, rows), dim=0).to(dtype)
        lse_a, lse_b = merged[0], merged[1]
        partial = torch.zeros(2, rows, dtype=dtype, device=a.device)
        for rs, col_slices in _tiles(rows, vocab):
            for cs in col_slices:
                partial[:, rs] += _divergences.jsd_tile_terms(
                    src_a.tile(rs, cs), src_b.tile(rs, cs), lse_a[rs], lse_b[rs], beta
                )
        # Collective 2 of 2: the per-token partial KL(P‖M) and KL(Q‖M) of every rank's columns, summed.
        total = all_reduce_sum(
            partial.to(torch.float64), engine.layout.group, what="partial JSD terms",
            timeout_s=engine.options.resolved_timeout_s,
        )
        kl_pm, kl_qm = total[0].to(dtype), total[1].to(dtype)
        value = (beta * total[0] + (1 - beta) * total[1]).to(dtype)
        ctx.save_for_backward(a, b, lse_a, lse_b, kl_pm, kl_qm)
        ctx.spec = spec
        ctx.dtype = dtype
        ctx.set_materialize_grads(False)
        return value.reshape(lead_shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, b, lse_a, lse_b, kl_pm, kl_qm = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        engine, beta, dtype = ctx.spec.engine, ctx.spec.beta, ctx.dtype
        src_a = _DenseLogits(a, dtype, engine.temperature)
        src_b = _DenseLogits(b, dtype, engine.temperature)
        grad_a = src_a.new_grad() if need_a else None
        grad_b = src_b.new_grad() if need_b else None
        if grad is None or not (need_a or need_b):
            return grad_a, grad_b, None, None
        g = grad.reshape(-1).to(dtype)
        for rs, col_slices in _tiles(src_a.rows, src_a.vocab):
            for cs in col_slices:
                ga, gb = _divergences.jsd_tile_grads(
                    src_a.tile(rs, cs), src_b.tile(rs, cs), lse_a[rs], lse_b[rs], kl_pm[rs], kl_qm[rs], beta, g[rs],
                    need_a=need_a, need_b=need_b,
                )
                if grad_a is not None and ga is not None:
                    src_a.write_grad(grad_a, rs, cs, ga)
                if grad_b is not None and gb is not None:
                    src_b.write_grad(grad_b, rs, cs, gb)
        return grad_a, grad_b, None, None


def _check_beta(beta: object) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a number in [0, 1], got {type(beta).__name__}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (the weight of p_logits' distribution in the mixture), got {beta}")
    return float(beta)


def _spec(call: Call, *, beta: float = 0.5, direction: Direction = "forward") -> _Spec:
    engine = EngineSpec(call.layout, call.layout_given, call.temperature, call.options, entropy=False)
    return _Spec(engine, beta, direction)


def jsd(
    p_logits: Tensor,
    q_logits: Tensor,
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
            divides both inputs. ``options.impl`` chooses the engine's kernels at β = 0 and 1; for 0 < β < 1 the
            passes run eager PyTorch on memory-bounded tiles.
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
        values = run_engine(call, entropy=False).exact_kl
    elif beta == 1.0:
        # KL(Q‖P): the engine with the two inputs' roles exchanged
        values = run_engine(call._replace(p=call.q, q=call.p), entropy=False).exact_kl
    else:
        values = _JSDFunction.apply(call.p, call.q, call.mask, _spec(call, beta=beta))
    return reduce_checked(values, call.mask, reduction)


# --- top-k teacher --------------------------------------------------------------------------------------------


class _TopKFunction(torch.autograd.Function):
    """Per-token bucket KL between a top-k teacher and sharded student logits: one collective, none in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, s: Tensor, ids: Tensor, logprobs: Tensor, mask: Tensor | None, spec: _Spec
    ) -> Tensor:
        engine = spec.engine
        dtype = compute_dtype(s, logprobs)
        lead_shape = s.shape[:-1]
        src = _DenseLogits(s, dtype, engine.temperature)
        rows, vocab, k = src.rows, src.vocab, ids.shape[-1]
        local_ids = ids - engine.layout.start
        lse = _no_mass(rows, dtype, s.device)
        lse_excl = _no_mass(rows, torch.float64, s.device)
        s_ids = _no_mass(k, dtype, s.device, rows)
        for rs, col_slices in _tiles(rows, vocab):
            parts = [_divergences.topk_tile_stats(src.tile(rs, cs), local_ids[rs] - cs.start) for cs in col_slices]
            lse[rs] = torch.logsumexp(torch.stack([p[0] for p in parts]), dim=0)
            lse_excl[rs] = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
            # each id lies in at most one tile; the others read -inf
            s_ids[rs] = torch.stack([p[2] for p in parts]).amax(dim=0)
        keep = None if mask is None else (mask.reshape(-1) != 0)
        # this rank's full log-sum-exp only feeds the shared checks (NaN, +inf); the global one is the merge of
        # the buckets, so it does not travel
        stats = torch.stack((lse, torch.zeros_like(lse)))
        meta = _validation.local_meta(_call_info(engine, s, None, rows), stats, s, None, mask)
        teacher_meta = _teacher_checks.teacher_meta(ids, logprobs, keep)
        body = torch.cat([lse_excl, s_ids.reshape(-1).to(torch.float64)])
        # The one collective: per token the student's log-sum-exp without the teacher's ids and its logits at the
        # ids this rank holds (K + 1 floats, whatever V), then the teacher's and the call's check metadata.
        gathered = _gather(body, teacher_meta, meta, engine, "student statistics at the teacher's top-k")
        world = gathered.shape[0]
        n_meta, n_teacher = _validation.NUM_META, _teacher_checks.NUM_TEACHER_META
        # every rank checks the same gathered numbers, so all of them raise (or none does)
        valid = _validation.check_gathered(
            gathered[:, -n_meta:].tolist(), validate=engine.options.validate, shape=lead_shape
        )
        if not engine.layout_given:
            # the ids are global, so the default equal-split assumption must hold
            check_tiling(
                [(int(r[_validation.START]), int(r[_validation.STOP])) for r in gathered[:, -n_meta:].tolist()],
                _validation._EQUAL_SPLIT_HINT,
            )
        _teacher_checks.check_gathered_teacher(
            gathered[:, -(n_meta + n_teacher) : -n_meta].tolist(), valid, validate=engine.options.validate
        )
        # merged in float64, in rank order: the same on every rank
        excl64 = torch.logsumexp(gathered[:, :rows], dim=0)
        # exactly one rank holds each id; the others sent -inf
        ids64 = gathered[:, rows : (1 + k) * rows].reshape(world, rows, k).amax(dim=0)
        tolerance = _teacher_checks.SUM_TOLERANCE.get(logprobs.dtype, _teacher_checks.DEFAULT_TOLERANCE)
        buckets = _divergences.buckets(excl64, ids64, logprobs.to(torch.float64), tolerance)
        value = _divergences.topk_divergence(buckets, spec.direction)
        inputs = _divergences.topk_grad_inputs(
            buckets, _divergences.student_lse(excl64, ids64), excl64, spec.direction
        )
        ctx.save_for_backward(s, local_ids, *(x.to(dtype) for x in inputs))
        ctx.spec = spec
        ctx.dtype = dtype
        ctx.set_materialize_grads(False)
        return value.to(dtype).reshape(lead_shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        s, local_ids, *saved = ctx.saved_tensors
        inputs = _divergences.TopKGradInputs(*saved)
        src = _DenseLogits(s, ctx.dtype, ctx.spec.engine.temperature)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad_s = src.new_grad()
        if grad is None:
            return grad_s, None, None, None, None
        g = grad.reshape(-1).to(ctx.dtype)
        for rs, col_slices in _tiles(src.rows, src.vocab):
            row_inputs = _divergences.TopKGradInputs(*(x[rs] for x in inputs))
            for cs in col_slices:
                tile_grad = _divergences.topk_tile_grads(src.tile(rs, cs), local_ids[rs] - cs.start, row_inputs, g[rs])
                src.write_grad(grad_s, rs, cs, tile_grad)
        return grad_s, None, None, None, None


def _check_direction(direction: object) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def topk_kl(
    student_logits: Tensor,
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
        group, layout, valid_vocab_size, options: as in :func:`shardkl.kl_stats` (``options.impl`` is not used: the
            passes run eager PyTorch on memory-bounded tiles).
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
    )
    if is_dtensor(student_logits):
        mesh_dim = unwrap_logits(student_logits, None, None).mesh_dim
        teacher_ids = to_local_like("teacher_ids", teacher_ids, mesh_dim)
        teacher_logprobs = to_local_like("teacher_logprobs", teacher_logprobs, mesh_dim)
    ids, logprobs = _teacher_checks.check_teacher(teacher_ids, teacher_logprobs, call.p.shape[:-1])
    k = ids.shape[-1]
    ids = ids.to(device=call.p.device, dtype=torch.long).reshape(-1, k)
    logprobs = logprobs.detach().to(device=call.p.device).reshape(-1, k)
    values = _TopKFunction.apply(call.p, ids, logprobs, call.mask, _spec(call, direction=direction))
    return reduce_checked(values, call.mask, reduction)


# --- the loss helper ------------------------------------------------------------------------------------------


def distillation_loss(
    student_logits: Tensor,
    teacher: Tensor | TopKTeacher,
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
    # the engine: one collective, both inputs' gradients; P is the first argument
    if divergence == "forward_kl":
        return exact_kl(teacher, student_logits, **common)
    return exact_kl(student_logits, teacher, **common)


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
