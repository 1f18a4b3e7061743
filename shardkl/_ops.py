"""The engine's ops: each divergence as a short program of tile passes and collectives (``_engine.Driver``).

An op says, for one call: what each tile reduces to (a kernel entry of :mod:`shardkl.kernels`, plus the logits
at a few ids read off the same tile), how the vocabulary blocks of a row combine, what travels in the one gather, how
the ranks' floats become per-token results, and — in backward — which kernel entry turns a tile into its logit
gradient. The tiles, the collectives, the checks and the gradients' way back to the inputs are the driver's.

- :class:`KLOp`: exact KL(P‖Q), the entropy of P and the tokens' log-probabilities (one gather of
  ``[LA, ENT(, LB, KL)]`` and the token logits per token).
- :class:`JSDOp`: ``JSD_β``, 0 < β < 1: the log-sum-exps of both inputs (one gather), then the terms of KL(P‖M)
  and KL(Q‖M) against the global mixture (one all-reduce).
- :class:`CompareOp`: P and Q both ways (both KLs, entropies, log-probs and top-1 ids) from the same tiles and one
  gather, values only (a model audit).
- :class:`TopKOp`: the KL between a top-k teacher and the student over K + 1 buckets (one gather of the tail's
  log-sum-exp and the student's logits at the K ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from shardkl import _divergences, _stats, _teacher_checks, estimators
from shardkl._divergences import Direction
from shardkl._engine import Driver, Gathered, run
from shardkl._inputs import Call
from shardkl._sources import Tile, held_values
from shardkl.kernels import GradInputs, scaled
from shardkl.kernels.eager import local_columns

NEG_INF = float("-inf")
# per-token float64 work of the top-k buckets, in blocks of about this many elements ([tokens, K + 1])
FINALISE_ELEMENTS = 1 << 14


class KLStats(NamedTuple):
    """Per-token results of :func:`shardkl.kl_stats`, each shaped like the logits without their last dimension.

    Attributes:
        exact_kl: KL(P‖Q) over the full vocabulary.
        entropy: entropy of P.
        p_logprobs: log P(x) at the given tokens (``None`` without tokens).
        q_logprobs: log Q(x) at the given tokens (``None`` without tokens).
        k1, k2, k3: Schulman's estimators of KL(P‖Q) at the tokens, assumed sampled from P (``None`` without tokens).
    """

    exact_kl: Tensor
    entropy: Tensor
    p_logprobs: Tensor | None
    q_logprobs: Tensor | None
    k1: Tensor | None
    k2: Tensor | None
    k3: Tensor | None


def merge_blocks(parts: Tensor) -> Tensor:
    """The merged KL stats of ``[blocks, num_stats, rows]`` block stats, in float64 (the driver hands over at most
    :data:`shardkl._engine.MERGE_GROUP` blocks at a time)."""
    return _stats.merge_stats(parts.to(torch.float64))


def _log_prob(token_logit: Tensor, lse: Tensor) -> Tensor:
    """``min(logit - lse, 0)``; ``-inf`` for a row with no mass at all (``-inf - -inf`` would be NaN). The clamp
    keeps a log-probability from exceeding 0 by a rounding (a token logit and a log-sum-exp computed apart)."""
    no_mass = torch.isinf(lse) & (lse < 0)
    return torch.where(no_mass, torch.full_like(lse, NEG_INF), (token_logit - lse).clamp(max=0.0))


def _ranks_merged(local: Tensor, gathered: Gathered, rows: slice, dtype: torch.dtype) -> Tensor:
    """The KL stats ``rows`` of the call merged over the ranks, in ``dtype``; this rank's own on one rank. The merge
    runs in float64, in rank order: O(tokens x ranks), no rounding of its own, the same numbers on every rank."""
    merged = local[rows] if gathered.world == 1 else _stats.merge_stats(gathered.body[:, rows])
    return merged.to(dtype)


def _kl(merged: Tensor) -> Tensor:
    """The KL row of merged two-input stats. Convention: a row where the first input has no mass at all (every logit
    -inf: an empty, masked row) has KL 0."""
    return torch.where(merged[_stats.LA] == NEG_INF, 0.0, merged[_stats.KL])


def _tile_values(d: Driver, tile: Tile, cols: Tensor) -> Tensor:
    """``[sides, rows, K]`` scaled logits of each side of ``tile`` at ``cols`` (relative to the tile), ``-inf``
    where the tile does not hold them."""
    sides = [tile.a] if tile.b is None else [tile.a, tile.b]
    return torch.stack([scaled(held_values(x, cols), d.dtype, d.temperature) for x in sides])


class KLOp:
    """Exact KL(P‖Q), entropy of P, and log P(x), log Q(x) at the tokens: one tile pass and one gather.

    Args:
        tokens: ``[rows]`` int64 global token ids, or ``None``.
        mask: the per-token mask (only its values are checked here), or ``None``.
        entropy: whether the caller reads the entropy (kernels may skip it otherwise).
    """

    def __init__(self, tokens: Tensor | None, mask: Tensor | None, *, entropy: bool) -> None:
        self.tokens, self.mask, self.entropy = tokens, mask, entropy

    def forward(self, d: Driver) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
        num_stats = _stats.num_stats(d.two)
        sides = 2 if d.two else 1
        local_tokens = None if self.tokens is None else (self.tokens - d.layout.start).unsqueeze(-1)

        def tile_fn(tile: Tile) -> Tensor:
            stats = d.kernels.kl_stats(tile.a, tile.b, temperature=d.temperature, dtype=d.dtype, entropy=self.entropy)
            if local_tokens is None:
                return stats
            # the token logits read off the tile the stats come from, so log P(x) = logit - lse is consistent
            values = _tile_values(d, tile, local_tokens[tile.rows] - tile.cols.start)[..., 0]
            return torch.cat([stats, values.to(stats.dtype)])

        def merge(parts: Tensor) -> Tensor:
            # stats by the chain rule in float64; exactly one block holds each token, the others read -inf
            return torch.cat([merge_blocks(parts[:, :num_stats]), parts[:, num_stats:].amax(dim=0).double()])

        identity = [NEG_INF, 0.0, NEG_INF, 0.0][:num_stats] + ([NEG_INF] * sides if local_tokens is not None else [])
        local = d.reduce(tile_fn, merge=merge, identity=identity)
        gathered = d.gather(
            local, lse_rows=[_stats.LA, _stats.LB][:sides], what="per-token statistics", tokens=self.tokens,
            mask=self.mask,
        )
        merged = _ranks_merged(local, gathered, slice(0, num_stats), d.dtype)
        lse_a, ent = merged[_stats.LA], merged[_stats.ENT]
        lse_b, kl = (merged[_stats.LB], _kl(merged)) if d.two else (None, None)
        zeros = torch.zeros(d.rows, dtype=d.dtype, device=d.device)
        logp = logq = zeros
        if local_tokens is not None:
            # exactly one rank holds each token; the others sent -inf
            held = gathered.body[:, num_stats:].amax(dim=0).to(d.dtype)
            logp = _log_prob(held[0], lse_a)
            logq = zeros if lse_b is None else _log_prob(held[1], lse_b)
        outputs = tuple(x.reshape(d.lead_shape) for x in (zeros if kl is None else kl, ent, logp, logq))
        return outputs, (lse_a, lse_b, kl, ent)

    def backward(
        self, d: Driver, saved: tuple[Tensor, ...], grads: tuple[Tensor | None, ...], needs: Sequence[bool]
    ) -> tuple[Tensor | None, ...]:
        lse_a, lse_b, kl, ent = saved
        grad_kl, grad_ent, grad_logp, grad_logq = grads
        if not d.two:
            grad_kl = grad_logq = None
        if self.tokens is None:
            grad_logp = grad_logq = None
        if not any(needs[4:8]):
            grad_logq = None
        flat = [None if g is None else g.reshape(-1).to(d.dtype) for g in (grad_kl, grad_ent, grad_logp, grad_logq)]
        if all(g is None for g in flat):
            return d.backward(None, needs)
        inputs = GradInputs(lse_a, lse_b, kl, ent, flat[0], flat[1], flat[2], flat[3], None)
        tokens = None if self.tokens is None else self.tokens - d.layout.start

        def tile_fn(tile: Tile, grad_a: Tensor | None, grad_b: Tensor | None) -> None:
            cols = None if tokens is None else local_columns(tokens[tile.rows], tile.cols)
            d.kernels.kl_grads(
                tile.a, tile.b, temperature=d.temperature, dtype=d.dtype,
                inputs=inputs.rows(tile.rows)._replace(token_cols=cols), grad_a=grad_a, grad_b=grad_b,
            )

        return d.backward(tile_fn, needs)


def run_kl(call: Call, *, entropy: bool = True) -> KLStats:
    """:class:`KLOp` on a resolved call: every per-token result, Schulman's estimators from the log-probs."""
    tokens = None if call.tokens is None else call.tokens.reshape(-1)
    kl, ent, logp, logq = run(call, KLOp(tokens, call.mask, entropy=entropy))
    if call.tokens is None:
        return KLStats(kl, ent, None, None, None, None, None)
    if call.q is None:
        return KLStats(kl, ent, logp, None, None, None, None)
    log_ratio = logq - logp
    k1, k2, k3 = (estimators.from_log_ratio(log_ratio, name) for name in estimators.SAMPLED_ESTIMATORS)  # type: ignore[arg-type]
    return KLStats(kl, ent, logp, logq, k1, k2, k3)


class CompareStats(NamedTuple):
    """Per-token results of :func:`shardkl.compare_stats`: two policies compared both ways, values only.

    Attributes:
        kl_pq: KL(P‖Q) over the full vocabulary.
        kl_qp: KL(Q‖P) over the full vocabulary.
        entropy_p, entropy_q: the entropy of each.
        p_logprobs, q_logprobs: log P and log Q at the given ids, shaped like them (``None`` without ids).
        top1_p, top1_q: int64 global id of each one's most likely token (the lowest such id on a tie; -1 for a row
            without a finite maximum).
    """

    kl_pq: Tensor
    kl_qp: Tensor
    entropy_p: Tensor
    entropy_q: Tensor
    p_logprobs: Tensor | None
    q_logprobs: Tensor | None
    top1_p: Tensor
    top1_q: Tensor


# rows of CompareOp's per-token floats: KL stats of (P, Q), of (Q, P), each side's maximum and its id, then the logits
# at the ids (each side's K)
_FORWARD, _REVERSE, _TOP = slice(0, 4), slice(4, 8), slice(8, 12)
_TOP_IDS = [9, 11]


def _merge_top(parts: Tensor) -> Tensor:
    """``[blocks, 4, rows]`` (max, id) of each side → ``[4, rows]``: the largest value, the lowest id on a tie."""
    values, ids = parts[:, [0, 2]], parts[:, [1, 3]]
    best = values.amax(dim=0)
    candidates = torch.where(values == best, ids, torch.full_like(ids, float("inf")))
    return torch.stack([best, candidates.amin(dim=0)], dim=1).reshape(4, -1)


class CompareOp:
    """P and Q compared both ways from the same tiles and one gather: KL(P‖Q), KL(Q‖P), both entropies, both
    log-probabilities at K ids per token, and both top-1 ids. Forward only (its results carry no gradient).

    Args:
        ids: ``[rows, K]`` int64 global ids to read the log-probabilities at, or ``None``.
    """

    def __init__(self, ids: Tensor | None) -> None:
        self.ids = ids

    def forward(self, d: Driver) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
        assert d.two
        ids = None if self.ids is None else self.ids.to(d.device)
        local_ids = None if ids is None else ids - d.layout.start
        k = 0 if ids is None else ids.shape[-1]

        def tile_fn(tile: Tile) -> Tensor:
            assert tile.b is not None
            kernel, t, dtype = d.kernels.kl_stats, d.temperature, d.dtype
            # both directions from the same tile (for a linear side: one matmul for both)
            parts = [kernel(x, y, temperature=t, dtype=dtype) for x, y in ((tile.a, tile.b), (tile.b, tile.a))]
            for x in (tile.a, tile.b):
                # the raw logits' maximum (the temperature does not move it) and its column in this rank's slice
                best, column = x.max(dim=-1)
                parts.append(torch.stack([best.to(dtype), (column + tile.cols.start).to(dtype)]))
            if local_ids is not None:
                values = _tile_values(d, tile, local_ids[tile.rows] - tile.cols.start)
                parts.append(values.transpose(1, 2).reshape(2 * k, -1).to(dtype))
            return torch.cat(parts)

        def merge(parts: Tensor) -> Tensor:
            stats = [merge_blocks(parts[:, _FORWARD]), merge_blocks(parts[:, _REVERSE])]
            return torch.cat([*stats, _merge_top(parts[:, _TOP].double()), parts[:, 12:].amax(dim=0).double()])

        identity = [NEG_INF, 0.0, NEG_INF, 0.0] * 2 + [NEG_INF, -1.0] * 2 + [NEG_INF] * (2 * k)
        local = d.reduce(tile_fn, merge=merge, identity=identity).double()
        # the top-1 columns as global ids (exact in float64)
        local[_TOP_IDS] += d.layout.start
        gathered = d.gather(
            local, lse_rows=[_stats.LA, _stats.LB], what="per-token statistics of both directions",
            tokens=ids, offsets_used=True,
        )
        body = gathered.body
        forward = _ranks_merged(local, gathered, _FORWARD, d.dtype)
        reverse = _ranks_merged(local, gathered, _REVERSE, d.dtype)
        top = local[_TOP] if gathered.world == 1 else _merge_top(body[:, _TOP])
        # -1 where a row has no finite maximum (no mass, or NaN / +inf logits)
        top1 = torch.where(torch.isfinite(top[[0, 2]]), top[[1, 3]], -1.0).long()
        outputs = [_kl(forward), _kl(reverse), forward[_stats.ENT], reverse[_stats.ENT]]
        if ids is not None:
            # exactly one rank holds each id; the others sent -inf
            held = body[:, 12:].amax(dim=0).to(d.dtype).reshape(2, k, -1).transpose(1, 2)
            lse = forward[[_stats.LA, _stats.LB]].unsqueeze(-1)
            outputs += [_log_prob(held[0], lse[0]), _log_prob(held[1], lse[1])]
        shape = d.lead_shape
        shaped = [x.reshape(shape) for x in outputs[:4]] + [x.reshape(*shape, k) for x in outputs[4:]]
        return (*shaped, top1[0].reshape(shape), top1[1].reshape(shape)), ()

    def backward(
        self, d: Driver, saved: tuple[Tensor, ...], grads: tuple[Tensor | None, ...], needs: Sequence[bool]
    ) -> tuple[Tensor | None, ...]:
        raise RuntimeError("compare_stats gives values only; differentiate exact_kl or kl_stats instead")


def run_compare(call: Call) -> CompareStats:
    """:class:`CompareOp` on a resolved call, without autograd; its tokens ``[...]`` or ``[..., K]`` (log-probs
    shaped like them) or ``None``."""
    lead = call.p.shape[:-1]
    tokens = call.tokens
    ids = None if tokens is None else tokens.reshape(lead.numel(), tokens.shape[-1] if tokens.dim() > len(lead) else 1)
    outputs = run(call, CompareOp(ids), differentiable=False)
    kl_pq, kl_qp, ent_p, ent_q = outputs[:4]
    logp, logq = (None, None) if tokens is None else (x.reshape(tokens.shape) for x in outputs[4:6])
    return CompareStats(kl_pq, kl_qp, ent_p, ent_q, logp, logq, outputs[-2], outputs[-1])


def _finite_rows(lse_a: Tensor, lse_b: Tensor) -> Tensor:
    return torch.isfinite(lse_a) & torch.isfinite(lse_b)


class JSDOp:
    """``JSD_β = β KL(P‖M) + (1−β) KL(Q‖M)``, ``M = βP + (1−β)Q``, 0 < β < 1: two rounds.

    Round one gathers both inputs' log-sum-exps (``log M_v`` needs the global ones); round two sums the terms of
    KL(P‖M) and KL(Q‖M) against the global mixture over every rank's columns (an all-reduce). A row where either
    input has no mass (every logit ``-inf``: a padded, masked row) gives 0; a row holding NaN or ``+inf`` gives NaN.
    """

    def __init__(self, beta: float, mask: Tensor | None) -> None:
        self.beta, self.mask = beta, mask

    def forward(self, d: Driver) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
        def lse_fn(tile: Tile) -> Tensor:
            stats = d.kernels.kl_stats(tile.a, tile.b, temperature=d.temperature, dtype=d.dtype, entropy=False,
                                       kl=False)
            return stats[[_stats.LA, _stats.LB]]

        def merge_lse(parts: Tensor) -> Tensor:
            return torch.logsumexp(parts.to(torch.float64), dim=0)

        local = d.reduce(lse_fn, merge=merge_lse, identity=[NEG_INF, NEG_INF])
        # Collective 1 of 2 (in the driver): every rank's log-sum-exps of both inputs, and the checks' metadata.
        gathered = d.gather(local, lse_rows=[0, 1], what="log-sum-exps of the JSD", mask=self.mask)
        lse = torch.logsumexp(gathered.body, dim=0) if gathered.world > 1 else local.to(torch.float64)
        lse_a, lse_b = lse[0].to(d.dtype), lse[1].to(d.dtype)

        def terms_fn(tile: Tile) -> Tensor:
            assert tile.b is not None
            rows = tile.rows
            return d.kernels.jsd_terms(tile.a, tile.b, temperature=d.temperature, dtype=d.dtype, lse_a=lse_a[rows],
                                       lse_b=lse_b[rows], beta=self.beta)

        partial = d.reduce(terms_fn, merge=lambda parts: parts.sum(dim=0), identity=[0.0, 0.0])
        # Collective 2 of 2: the per-token partial KL(P‖M) and KL(Q‖M) of every rank's columns, summed.
        total = d.all_reduce(partial, what="partial JSD terms")
        finite = _finite_rows(lse_a, lse_b)
        invalid = torch.isnan(lse_a) | torch.isnan(lse_b) | (lse_a == float("inf")) | (lse_b == float("inf"))
        value = self.beta * total[0] + (1 - self.beta) * total[1]
        value = torch.where(finite, value, torch.where(invalid, float("nan"), 0.0)).to(d.dtype)
        return (value.reshape(d.lead_shape),), (lse_a, lse_b, total[0].to(d.dtype), total[1].to(d.dtype))

    def backward(
        self, d: Driver, saved: tuple[Tensor, ...], grads: tuple[Tensor | None, ...], needs: Sequence[bool]
    ) -> tuple[Tensor | None, ...]:
        lse_a, lse_b, kl_pm, kl_qm = saved
        if grads[0] is None:
            return d.backward(None, needs)
        # rows without a distribution on either side (masked padding) send nothing back
        grad = torch.where(_finite_rows(lse_a, lse_b), grads[0].reshape(-1).to(d.dtype), 0.0)

        def tile_fn(tile: Tile, grad_a: Tensor | None, grad_b: Tensor | None) -> None:
            assert tile.b is not None
            rows = tile.rows
            d.kernels.jsd_grads(
                tile.a, tile.b, temperature=d.temperature, dtype=d.dtype, lse_a=lse_a[rows], lse_b=lse_b[rows],
                kl_pm=kl_pm[rows], kl_qm=kl_qm[rows], grad=grad[rows], beta=self.beta, grad_a=grad_a, grad_b=grad_b,
            )

        return d.backward(tile_fn, needs)


class TopKOp:
    """KL between a top-k teacher and the student over K + 1 buckets (the K ids, and the tail): one gather.

    Per token each rank sends its log-sum-exp (for the checks), its tail's log-sum-exp (its columns without the
    ids) and its logits at the ids it holds (``-inf`` elsewhere): ``K + 2`` floats, whatever the vocabulary.

    Args:
        ids: ``[rows, K]`` int64 global ids.
        logprobs: ``[rows, K]`` the teacher's log-probabilities (no gradient).
        direction: ``"forward"`` KL(teacher‖student) or ``"reverse"`` KL(student‖teacher).
        mask: the per-token mask: rows with 0 are neither checked nor counted, or ``None``.
    """

    def __init__(self, ids: Tensor, logprobs: Tensor, direction: Direction, mask: Tensor | None) -> None:
        self.ids, self.logprobs, self.direction, self.mask = ids, logprobs, direction, mask

    def forward(self, d: Driver) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
        k = self.ids.shape[-1]
        local_ids = self.ids - d.layout.start

        def tile_fn(tile: Tile) -> Tensor:
            cols = local_ids[tile.rows] - tile.cols.start
            lse = d.kernels.topk_stats(tile.a, temperature=d.temperature, dtype=d.dtype, ids=cols)
            # the student's logits at the ids, read off the same tile
            return torch.cat([lse, _tile_values(d, tile, cols)[0].t().to(torch.float64)])

        def merge(parts: Tensor) -> Tensor:
            return torch.cat([torch.logsumexp(parts[:, :2], dim=0), parts[:, 2:].amax(dim=0)])

        local = d.reduce(tile_fn, merge=merge, identity=[NEG_INF] * (2 + k))
        keep = None if self.mask is None else (self.mask.reshape(-1) != 0)
        teacher_meta = _teacher_checks.teacher_meta(self.ids, self.logprobs, keep)
        # The one collective: per token the student's lse, its tail's lse and its logits at the ids this rank holds
        # (K + 2 floats, whatever V), then the teacher's and the call's check metadata.
        gathered = d.gather(
            local, lse_rows=[0], what="student statistics at the teacher's top-k", mask=self.mask,
            extra_meta=teacher_meta, offsets_used=True,
        )
        _teacher_checks.check_gathered_teacher(gathered.extra, gathered.valid, validate=d.spec.options.validate)
        body = gathered.body.to(torch.float64)
        # merged in float64, in rank order: the same on every rank; exactly one rank holds each id
        lse_excl = torch.logsumexp(body[:, 1], dim=0)
        s_ids = body[:, 2:].amax(dim=0).t()
        tolerance = _teacher_checks.SUM_TOLERANCE.get(self.logprobs.dtype, _teacher_checks.DEFAULT_TOLERANCE)
        value = torch.empty(d.rows, dtype=d.dtype, device=d.device)
        tail_coef = torch.empty(d.rows, dtype=d.dtype, device=d.device)
        id_coef = torch.empty(d.rows, k, dtype=d.dtype, device=d.device)
        # the buckets of a block of tokens at a time: their float64 temporaries stay a few hundred KiB (a fraction
        # of a percent of the logits) whatever the number of tokens
        step = max(1, FINALISE_ELEMENTS // (k + 1))
        for r0 in range(0, d.rows, step):
            rows = slice(r0, r0 + step)
            buckets = _divergences.buckets(lse_excl[rows], s_ids[rows], self.logprobs[rows].double(), tolerance)
            value[rows] = _divergences.topk_divergence(buckets, self.direction)
            tail_coef[rows], id_coef[rows] = _divergences.topk_grad_coefs(buckets, self.direction)
        return (value.reshape(d.lead_shape),), (lse_excl.to(d.dtype), tail_coef, id_coef)

    def backward(
        self, d: Driver, saved: tuple[Tensor, ...], grads: tuple[Tensor | None, ...], needs: Sequence[bool]
    ) -> tuple[Tensor | None, ...]:
        lse_excl, tail_coef, id_coef = saved
        if grads[0] is None:
            return d.backward(None, needs)
        grad = grads[0].reshape(-1).to(d.dtype)
        # a token with no incoming gradient gets 0, not 0 * inf (an infinite divergence's factors)
        tail = torch.where(grad == 0, 0.0, grad * tail_coef)
        ids_coef = torch.where(grad.unsqueeze(-1) == 0, 0.0, grad.unsqueeze(-1) * id_coef)
        local_ids = self.ids - d.layout.start

        def tile_fn(tile: Tile, grad_s: Tensor | None, _: Tensor | None) -> None:
            if grad_s is None:
                return
            rows = tile.rows
            d.kernels.topk_grads(
                tile.a, temperature=d.temperature, dtype=d.dtype, ids=local_ids[rows] - tile.cols.start,
                lse_excl=lse_excl[rows], tail_coef=tail[rows], id_coef=ids_coef[rows], grad_s=grad_s,
            )

        return d.backward(tile_fn, needs)


__all__ = ["CompareOp", "CompareStats", "JSDOp", "KLOp", "KLStats", "TopKOp", "merge_blocks", "run_compare", "run_kl"]
