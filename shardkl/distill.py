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
of logits the way the fused engine does (its ``_Side`` gives a tile as a view of a logits tensor or as a matmul of a
:class:`shardkl.LinearLogits`; its ``_Grads`` turns a tile's logit gradient into gradients of the logits or of hidden
states, weight and bias), adds the collectives and checks, and defines the autograd Functions.
``docs/distillation.md`` has the derivations and the table of what each divergence does to a student.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor

from shardkl import _divergences, _teacher_checks, _validation
from shardkl._divergences import Direction
from shardkl._dtensor import is_dtensor, to_local_like, unwrap_linear, unwrap_logits
from shardkl._engine import EngineSpec, call_info, compute_dtype
from shardkl._fused import _Grads, _Side
from shardkl._fused import tiles as _fused_tiles
from shardkl._inputs import Call, resolve
from shardkl.distributed import ProcessGroup, all_gather_flat, all_reduce_sum, check_tiling
from shardkl.functional import exact_kl, run_engine
from shardkl.kernels import scaled
from shardkl.layout import VocabLayout
from shardkl.linear import LinearLogits
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

Source = Tensor | LinearLogits
_Parts = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]


def _parts(x: Source) -> _Parts:
    """``(logits, hidden, weight, bias)`` of one side, the autograd inputs of the Functions below."""
    if isinstance(x, LinearLogits):
        return None, x.hidden, x.weight, x.bias
    return x, None, None, None


def _side(parts: _Parts) -> _Side:
    return _Side(*parts)


def _blocks(side: _Side) -> Iterator[tuple[slice, list[slice]]]:
    """The fused engine's walk: vocabulary blocks of ``C`` columns (a block of weight rows is converted once), each
    with its row blocks; nothing for an empty shard."""
    rows, vocab = side.rows, side.vocab
    if rows == 0 or vocab == 0:
        return
    row_block, col_block = _fused_tiles(rows, vocab, side.device)
    row_slices = [slice(r, min(r + row_block, rows)) for r in range(0, rows, row_block)]
    for c0 in range(0, vocab, col_block):
        yield slice(c0, min(c0 + col_block, vocab)), row_slices


def _tile(side: _Side, rows: slice, cols: slice, block: tuple[Tensor, Tensor | None] | None, dtype: torch.dtype,
          temperature: float) -> Tensor:
    """One ``[rows, cols]`` tile of scaled logits in the compute dtype (a view, or a matmul for a linear side)."""
    return scaled(side.tile(rows, cols, block, dtype), dtype, temperature)


def _row0(parts: _Parts) -> Tensor | None:
    logits = parts[0]
    return logits[(0,) * (logits.dim() - 1)] if logits is not None and logits.numel() else None


def _input_dtype(parts: _Parts) -> torch.dtype:
    source = parts[0] if parts[0] is not None else parts[1]
    assert source is not None
    return source.dtype


def _device(parts: _Parts) -> torch.device:
    source = parts[0] if parts[0] is not None else parts[1]
    assert source is not None
    return source.device


# --- the shared gather ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """Everything about a divergence call that is not a tensor."""

    engine: EngineSpec
    beta: float = 0.5
    direction: Direction = "forward"


def _gather(body: Tensor, extra_meta: Tensor | None, meta: Tensor, spec: EngineSpec, what: str) -> Tensor:
    """All-gather ``[body, extra_meta, meta]`` as one float64 vector per rank; returns ``[world, length]``."""
    pieces = [body.to(torch.float64).reshape(-1)]
    if extra_meta is not None:
        pieces.append(extra_meta)
    pieces.append(meta)
    return all_gather_flat(torch.cat(pieces), spec.layout.group, what=what, timeout_s=spec.options.resolved_timeout_s)


def _no_mass(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``-inf`` everywhere: the log-sum-exp of no columns, the identity of the merges below."""
    return torch.full(shape, float("-inf"), dtype=dtype, device=device)


# --- generalised JSD ------------------------------------------------------------------------------------------


class _JSDFunction(torch.autograd.Function):
    """Per-token ``JSD_β`` for 0 < β < 1: two collectives in forward, none in backward.

    Inputs per side: ``logits`` (a tensor), or ``hidden, weight, bias`` of a :class:`shardkl.LinearLogits`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        a_logits: Tensor | None,
        a_hidden: Tensor | None,
        a_weight: Tensor | None,
        a_bias: Tensor | None,
        b_logits: Tensor | None,
        b_hidden: Tensor | None,
        b_weight: Tensor | None,
        b_bias: Tensor | None,
        mask: Tensor | None,
        spec: _Spec,
    ) -> Tensor:
        parts_a: _Parts = (a_logits, a_hidden, a_weight, a_bias)
        parts_b: _Parts = (b_logits, b_hidden, b_weight, b_bias)
        side_a, side_b = _side(parts_a), _side(parts_b)
        engine, beta = spec.engine, spec.beta
        temperature = engine.temperature
        dtype = compute_dtype(*parts_a[:3], *parts_b[:3])
        device = _device(parts_a)
        rows, lead_shape = side_a.rows, side_a.lead_shape
        # accumulated over the column tiles in float64: [2, rows] only, and the rounding of ~60 fp32 merges would
        # reach the digits of a JSD of 5e-9
        lse = _no_mass((2, rows), torch.float64, device)
        for cols, row_slices in _blocks(side_a):
            block_a, block_b = side_a.block(cols, dtype), side_b.block(cols, dtype)
            for rs in row_slices:
                tile_a = _tile(side_a, rs, cols, block_a, dtype, temperature)
                tile_b = _tile(side_b, rs, cols, block_b, dtype, temperature)
                part = torch.stack((_divergences.tile_lse(tile_a), _divergences.tile_lse(tile_b)))
                lse[:, rs] = torch.logaddexp(lse[:, rs], part.to(torch.float64))
        zeros = torch.zeros(rows, dtype=torch.float64, device=device)
        # the engine's stats layout (LA, ENT, LB, KL), so the shared checks read NaN and +inf of both inputs
        stats = torch.stack((lse[0], zeros, lse[1], zeros))
        info = call_info(
            engine, kept=side_a.vocab, rows=rows, lead_shape=lead_shape, p_dtype=_input_dtype(parts_a),
            q_dtype=_input_dtype(parts_b),
        )
        meta = _validation.local_meta(info, stats, _row0(parts_a), None, mask)
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
        partial = torch.zeros(2, rows, dtype=dtype, device=device)
        for cols, row_slices in _blocks(side_a):
            block_a, block_b = side_a.block(cols, dtype), side_b.block(cols, dtype)
            for rs in row_slices:
                partial[:, rs] += _divergences.jsd_tile_terms(
                    _tile(side_a, rs, cols, block_a, dtype, temperature),
                    _tile(side_b, rs, cols, block_b, dtype, temperature),
                    lse_a[rs], lse_b[rs], beta,
                )
        # Collective 2 of 2: the per-token partial KL(P‖M) and KL(Q‖M) of every rank's columns, summed.
        total = all_reduce_sum(
            partial.to(torch.float64), engine.layout.group, what="partial JSD terms",
            timeout_s=engine.options.resolved_timeout_s,
        )
        kl_pm, kl_qm = total[0].to(dtype), total[1].to(dtype)
        value = (beta * total[0] + (1 - beta) * total[1]).to(dtype)
        ctx.save_for_backward(*parts_a, *parts_b, lse_a, lse_b, kl_pm, kl_qm)
        ctx.spec, ctx.dtype = spec, dtype
        ctx.set_materialize_grads(False)
        return value.reshape(lead_shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        parts_a, parts_b = tuple(saved[0:4]), tuple(saved[4:8])
        lse_a, lse_b, kl_pm, kl_qm = saved[8:12]
        spec, dtype = ctx.spec, ctx.dtype
        temperature, beta = spec.engine.temperature, spec.beta
        side_a, side_b = _side(parts_a), _side(parts_b)
        grads_a = _Grads(side_a, ctx.needs_input_grad[0:4], dtype)
        grads_b = _Grads(side_b, ctx.needs_input_grad[4:8], dtype)
        if grad is not None and (grads_a.any or grads_b.any):
            g = grad.reshape(-1).to(dtype)
            for cols, row_slices in _blocks(side_a):
                block_a, block_b = side_a.block(cols, dtype), side_b.block(cols, dtype)
                grads_a.start_block(cols)
                grads_b.start_block(cols)
                for rs in row_slices:
                    ga, gb = _divergences.jsd_tile_grads(
                        _tile(side_a, rs, cols, block_a, dtype, temperature),
                        _tile(side_b, rs, cols, block_b, dtype, temperature),
                        lse_a[rs], lse_b[rs], kl_pm[rs], kl_qm[rs], beta, g[rs],
                        need_a=grads_a.any, need_b=grads_b.any,
                    )
                    # the tile's gradient is with respect to the scaled logits: 1/T for the raw ones
                    grads_a.add(_unscaled(ga, temperature), rs, cols, block_a)
                    grads_b.add(_unscaled(gb, temperature), rs, cols, block_b)
                grads_a.end_block(cols)
                grads_b.end_block(cols)
        return (*grads_a.result(), *grads_b.result(), None, None)


def _unscaled(grad: Tensor | None, temperature: float) -> Tensor | None:
    return grad if grad is None or temperature == 1.0 else grad.mul_(1.0 / temperature)


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
    p_logits: Source,
    q_logits: Source,
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
        values = run_engine(call._replace(p=call.q, q=call.p, names=call.names[::-1]), entropy=False).exact_kl
    else:
        values = _JSDFunction.apply(*_parts(call.p), *_parts(call.q), call.mask, _spec(call, beta=beta))
    return reduce_checked(values, call.mask, reduction)


# --- top-k teacher --------------------------------------------------------------------------------------------


class _TopKFunction(torch.autograd.Function):
    """Per-token bucket KL between a top-k teacher and the sharded student: one collective, none in backward.

    The student is ``logits`` (a tensor), or ``hidden, weight, bias`` of a :class:`shardkl.LinearLogits`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        s_logits: Tensor | None,
        s_hidden: Tensor | None,
        s_weight: Tensor | None,
        s_bias: Tensor | None,
        ids: Tensor,
        logprobs: Tensor,
        mask: Tensor | None,
        spec: _Spec,
    ) -> Tensor:
        parts: _Parts = (s_logits, s_hidden, s_weight, s_bias)
        side = _side(parts)
        engine = spec.engine
        temperature = engine.temperature
        dtype = compute_dtype(*parts[:3], logprobs)
        device = _device(parts)
        rows, lead_shape, k = side.rows, side.lead_shape, ids.shape[-1]
        local_ids = ids - engine.layout.start
        lse = _no_mass((rows,), dtype, device)
        lse_excl = _no_mass((rows,), torch.float64, device)
        s_ids = _no_mass((rows, k), dtype, device)
        for cols, row_slices in _blocks(side):
            block = side.block(cols, dtype)
            for rs in row_slices:
                tile = _tile(side, rs, cols, block, dtype, temperature)
                tile_lse, tile_excl, tile_ids = _divergences.topk_tile_stats(tile, local_ids[rs] - cols.start)
                lse[rs] = torch.logaddexp(lse[rs], tile_lse)
                lse_excl[rs] = torch.logaddexp(lse_excl[rs], tile_excl)
                # each id lies in at most one tile; the others read -inf
                s_ids[rs] = torch.maximum(s_ids[rs], tile_ids)
        keep = None if mask is None else (mask.reshape(-1) != 0)
        # this rank's full log-sum-exp only feeds the shared checks (NaN, +inf); the global one is the merge of
        # the buckets, so it does not travel
        stats = torch.stack((lse, torch.zeros_like(lse)))
        info = call_info(
            engine, kept=side.vocab, rows=rows, lead_shape=lead_shape, p_dtype=_input_dtype(parts), q_dtype=None
        )
        meta = _validation.local_meta(info, stats, _row0(parts), None, mask)
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
        ctx.save_for_backward(*parts, local_ids, *(x.to(dtype) for x in inputs))
        ctx.spec, ctx.dtype = spec, dtype
        ctx.set_materialize_grads(False)
        return value.to(dtype).reshape(lead_shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        parts, local_ids = tuple(saved[0:4]), saved[4]
        inputs = _divergences.TopKGradInputs(*saved[5:])
        side, dtype, temperature = _side(parts), ctx.dtype, ctx.spec.engine.temperature
        grads = _Grads(side, ctx.needs_input_grad[0:4], dtype)
        if grad is not None and grads.any:
            g = grad.reshape(-1).to(dtype)
            for cols, row_slices in _blocks(side):
                block = side.block(cols, dtype)
                grads.start_block(cols)
                for rs in row_slices:
                    row_inputs = _divergences.TopKGradInputs(*(x[rs] for x in inputs))
                    tile_grad = _divergences.topk_tile_grads(
                        _tile(side, rs, cols, block, dtype, temperature), local_ids[rs] - cols.start, row_inputs, g[rs]
                    )
                    grads.add(_unscaled(tile_grad, temperature), rs, cols, block)
                grads.end_block(cols)
        return (*grads.result(), None, None, None, None)


def _check_direction(direction: object) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def topk_kl(
    student_logits: Source,
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
    mesh_dim = None
    if is_dtensor(student_logits):
        mesh_dim = unwrap_logits("student_logits", student_logits, None).mesh_dim
    elif isinstance(student_logits, LinearLogits) and is_dtensor(student_logits.weight):
        mesh_dim = unwrap_linear("student_logits", student_logits, None).mesh_dim
    if mesh_dim is not None:
        # per-token teacher tensors, replicated over the vocabulary mesh dimension like tokens and masks
        teacher_ids = to_local_like("teacher_ids", teacher_ids, mesh_dim)
        teacher_logprobs = to_local_like("teacher_logprobs", teacher_logprobs, mesh_dim)
    ids, logprobs = _teacher_checks.check_teacher(teacher_ids, teacher_logprobs, call.p.shape[:-1])
    k = ids.shape[-1]
    parts = _parts(call.p)
    ids = ids.to(device=_device(parts), dtype=torch.long).reshape(-1, k)
    logprobs = logprobs.detach().to(device=_device(parts)).reshape(-1, k)
    values = _TopKFunction.apply(*parts, ids, logprobs, call.mask, _spec(call, direction=direction))
    return reduce_checked(values, call.mask, reduction)


# --- the loss helper ------------------------------------------------------------------------------------------


def distillation_loss(
    student_logits: Source,
    teacher: Source | TopKTeacher,
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
    # the engine: one collective, both inputs' gradients; P is the first argument (exact_kl takes LinearLogits
    # too, though its annotation says Tensor)
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
