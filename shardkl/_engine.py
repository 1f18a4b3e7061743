"""The sharded engine: one autograd Function that turns local logits shards into per-token results.

Forward, on each rank: the kernels of ``impl`` reduce the local ``[rows, V_local]`` logits to per-token stats
(never a full-size fp32 copy), the sampled tokens' logits are read where this rank holds them, then **one**
all-gather of ``[stats, token logits, metadata]`` lets every rank check the call (``shardkl._validation``) and merge
the ranks in rank order. Backward recomputes P and Q tile by tile from the saved per-token log-sum-exps: no
collective, and nothing of size ``[N, V]`` is kept between the two passes (only references to the caller's logits).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from shardkl import _stats, _validation, kernels
from shardkl.distributed import all_gather_flat
from shardkl.kernels import GradInputs, Kernels, scaled
from shardkl.layout import VocabLayout
from shardkl.options import Options


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_blocks(a: Tensor, b: Tensor | None, row0: int = 0) -> Iterator[tuple[int, Tensor, Tensor | None]]:
    """Split ``[..., V]`` tensors into 2-D ``[rows, V]`` views, without copying, with their first row."""
    vocab = a.shape[-1]
    try:
        a2 = a.view(-1, vocab)
        b2 = None if b is None else b.view(-1, vocab)
    except RuntimeError:
        # not viewable as 2-D (e.g. logits[:, :-1]): recurse over the first dimension
        step = a[0].numel() // max(vocab, 1) if a.shape[0] else 0
        for i in range(a.shape[0]):
            yield from _row_blocks(a[i], None if b is None else b[i], row0 + i * step)
        return
    yield row0, a2, b2


def local_stats(
    a: Tensor,
    b: Tensor | None,
    temperature: float,
    dtype: torch.dtype,
    impl: Kernels | None = None,
    *,
    entropy: bool = True,
) -> Tensor:
    """Per-token stats of this rank's vocabulary slice, ``[num_stats, rows]``."""
    impl = kernels.resolve("eager", a.device, dtype, 0) if impl is None else impl
    vocab = a.shape[-1]
    rows = a.numel() // vocab if vocab else int(torch.tensor(a.shape[:-1]).prod())
    if vocab == 0 or rows == 0:
        # an empty shard is the identity of the merge: no mass, zero entropy and KL
        out = torch.zeros(_stats.num_stats(b is not None), rows, dtype=dtype, device=a.device)
        out[_stats.LA] = float("-inf")
        if b is not None:
            out[_stats.LB] = float("-inf")
        return out
    blocks = list(_row_blocks(a, b))
    if len(blocks) == 1:
        return impl.stats(blocks[0][1], blocks[0][2], temperature=temperature, dtype=dtype, entropy=entropy)
    return torch.cat(
        [impl.stats(a2, b2, temperature=temperature, dtype=dtype, entropy=entropy) for _, a2, b2 in blocks], dim=1
    )


def _token_logits(x: Tensor, local_tokens: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """Scaled logit at each token id this rank holds; ``-inf`` where another rank holds it."""
    vocab = x.shape[-1]
    held = (local_tokens >= 0) & (local_tokens < vocab)
    out = torch.full(local_tokens.shape, float("-inf"), dtype=dtype, device=x.device)
    if vocab == 0 or not bool(held.any()):
        return out
    rows = torch.nonzero(held).squeeze(-1)
    cols = local_tokens[rows]
    try:
        values = x.view(-1, vocab)[rows, cols]
    except RuntimeError:
        # rows not viewable as one 2-D tensor (e.g. logits[:, :-1]): index through the original layout
        values = x[torch.unravel_index(rows, x.shape[:-1]) + (cols,)]
    out[rows] = scaled(values, dtype, temperature)
    return out


def _log_prob(token_logit: Tensor, lse: Tensor) -> Tensor:
    """``logit - lse``; ``-inf`` for a row with no mass at all (``-inf - -inf`` would be NaN)."""
    return torch.where(torch.isinf(lse) & (lse < 0), torch.full_like(lse, float("-inf")), token_logit - lse)


@dataclass(frozen=True)
class EngineSpec:
    """Everything about one call that is not a tensor (and that every rank must agree on, checked in the gather).

    Attributes:
        layout: this rank's slice (padding included) and the group.
        layout_given: the layout came from the caller or a DTensor, rather than the default equal-split guess.
        temperature: softmax temperature.
        options: how the call runs.
        entropy: whether the caller reads the entropy (kernels may skip it otherwise).
        names: the public names of the two inputs, for the messages of the checks.
    """

    layout: VocabLayout
    layout_given: bool
    temperature: float
    options: Options
    entropy: bool = True
    names: tuple[str, str] = ("p_logits", "q_logits")


def _options_code(options: Options) -> int:
    """One number that differs when the ranks' options differ (the timeout may differ per rank)."""
    return zlib.crc32(repr((options.impl, options.validate, options.nan_policy)).encode())


def _token_rows(a: Tensor, b: Tensor | None, tokens: Tensor, start: int, dtype: torch.dtype, t: float) -> Tensor:
    local = tokens - start
    rows = [_token_logits(a, local, dtype, t)]
    if b is not None:
        rows.append(_token_logits(b, local, dtype, t))
    return torch.stack(rows)


class Merged(NamedTuple):
    """Global per-token results after the gather, each ``[rows]`` in the compute dtype (``None`` where absent)."""

    lse_a: Tensor
    ent: Tensor
    lse_b: Tensor | None
    kl: Tensor | None
    logp: Tensor | None
    logq: Tensor | None


def gather_and_merge(
    stats: Tensor,
    token_logits: Tensor | None,
    info: _validation.CallInfo,
    spec: EngineSpec,
    *,
    row0: Tensor | None,
    tokens: Tensor | None,
    mask: Tensor | None,
    dtype: torch.dtype,
) -> Merged:
    """The one collective of a forward call, the checks every rank runs on it, and the merge of the ranks.

    Args:
        stats: ``[num_stats, rows]`` this rank's stats.
        token_logits: ``[1 or 2, rows]`` scaled logits of the tokens this rank holds (``-inf`` elsewhere), or
            ``None`` without tokens.
        info: what this rank knows about the call, for the cross-rank checks.
        spec: the call's layout, temperature and options.
        row0: the first row of ``p``'s logits (for the probabilities look-alike check), or ``None``.
        tokens: ``[rows]`` global token ids, or ``None``.
        mask: the per-token mask (its values are checked here), or ``None``.
        dtype: the compute dtype of the results.
    """
    num_stats, rows = stats.shape
    options = spec.options
    # float64 on the wire: exact for fp32 stats and for every id and size in the metadata
    pieces = [stats.to(torch.float64).reshape(-1)]
    if token_logits is not None:
        pieces.append(token_logits.to(torch.float64).reshape(-1))
    pieces.append(_validation.local_meta(info, stats, row0, tokens, mask))
    # The one collective of the call: per-token stats, sampled-token logits and per-rank metadata.
    gathered = all_gather_flat(
        torch.cat(pieces), spec.layout.group, what="per-token statistics", timeout_s=options.resolved_timeout_s
    )
    world = gathered.shape[0]
    meta = gathered[:, -_validation.NUM_META :].tolist()
    # every rank checks the same gathered numbers, so all of them raise (or none does)
    _validation.check_gathered(meta, validate=options.validate, shape=info.lead_shape, names=spec.names)
    if world == 1:
        # one group: the merge is the identity, except the convention for a row where P has no mass (KL 0)
        merged = stats.to(dtype)
        if num_stats == 4:
            merged[_stats.KL] = torch.where(merged[_stats.LA] == float("-inf"), 0.0, merged[_stats.KL])
    else:
        # the merge runs in float64: it is O(tokens x ranks) and removes the rounding of the merge itself
        merged = _stats.merge_stats(gathered[:, : num_stats * rows].reshape(world, num_stats, rows)).to(dtype)
    lse_a, ent = merged[_stats.LA], merged[_stats.ENT]
    two = num_stats == 4
    lse_b, kl = (merged[_stats.LB], merged[_stats.KL]) if two else (None, None)
    logp = logq = None
    if token_logits is not None:
        num_token_rows = token_logits.shape[0]
        token_part = gathered[:, num_stats * rows : (num_stats + num_token_rows) * rows]
        # exactly one rank holds each token; the others sent -inf
        held = token_part.reshape(world, num_token_rows, rows).amax(dim=0).to(dtype)
        logp = _log_prob(held[0], lse_a)
        if lse_b is not None:
            logq = _log_prob(held[1], lse_b)
    return Merged(lse_a, ent, lse_b, kl, logp, logq)


def call_info(
    spec: EngineSpec, *, kept: int, rows: int, lead_shape: torch.Size, p_dtype: torch.dtype, q_dtype: torch.dtype | None
) -> _validation.CallInfo:
    """This rank's :class:`shardkl._validation.CallInfo` for a call."""
    return _validation.CallInfo(
        layout=spec.layout,
        layout_given=spec.layout_given,
        kept=kept,
        rows=rows,
        lead_shape=lead_shape,
        p_dtype=p_dtype,
        q_dtype=q_dtype,
        temperature=spec.temperature,
        nan_policy=spec.options.nan_policy,
        options_code=_options_code(spec.options),
    )


def outputs(merged: Merged, rows: int, lead_shape: torch.Size, dtype: torch.dtype, device: torch.device) -> tuple:
    """The four outputs ``(kl, entropy, logp, logq)`` shaped like the tokens; zeros where absent."""
    zeros = torch.zeros(rows, dtype=dtype, device=device)
    values = (merged.kl, merged.ent, merged.logp, merged.logq)
    return tuple((zeros if v is None else v).reshape(lead_shape) for v in values)


class ShardedStatsFunction(torch.autograd.Function):
    """Per-token ``(kl, entropy, logp, logq)`` of sharded logits; ``kl``/``logq`` are zeros without ``b``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        a: Tensor,
        b: Tensor | None,
        tokens: Tensor | None,
        mask: Tensor | None,
        spec: EngineSpec,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dtype = compute_dtype(a, b)
        lead_shape = a.shape[:-1]
        temperature, layout = spec.temperature, spec.layout
        impl = kernels.resolve(spec.options.impl, a.device, dtype, a.numel())
        stats = local_stats(a, b, temperature, dtype, impl, entropy=spec.entropy)
        rows = stats.shape[1]
        flat_tokens = None if tokens is None else tokens.reshape(-1)
        token_logits = None
        if flat_tokens is not None:
            token_logits = _token_rows(a, b, flat_tokens, layout.start, dtype, temperature)
        info = call_info(
            spec, kept=a.shape[-1], rows=rows, lead_shape=lead_shape, p_dtype=a.dtype,
            q_dtype=None if b is None else b.dtype,
        )
        row0 = a[(0,) * (a.dim() - 1)] if a.numel() else None
        merged = gather_and_merge(
            stats, token_logits, info, spec, row0=row0, tokens=flat_tokens, mask=mask, dtype=dtype
        )
        lse_a, ent, lse_b, kl = merged.lse_a, merged.ent, merged.lse_b, merged.kl
        ctx.save_for_backward(a, b, flat_tokens, lse_a, lse_b, kl, ent)
        ctx.temperature = temperature
        ctx.start = layout.start
        ctx.dtype = dtype
        ctx.kernels = impl
        ctx.set_materialize_grads(False)
        return outputs(merged, rows, lead_shape, dtype, a.device)  # type: ignore[return-value]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_kl: Tensor | None, grad_ent: Tensor | None, grad_logp: Tensor | None, grad_logq: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        a, b, tokens, lse_a, lse_b, kl, ent = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if b is None:
            grad_kl = grad_logq = None
        if tokens is None:
            grad_logp = grad_logq = None
        if not need_b:
            grad_logq = None
        flat = [None if g is None else g.reshape(-1).to(ctx.dtype) for g in (grad_kl, grad_ent, grad_logp, grad_logq)]
        grad_kl, grad_ent, grad_logp, grad_logq = flat
        # every element is written below; the gradient of b needs P, so it is computed even without a's
        grad_a = torch.empty(a.shape, dtype=a.dtype, device=a.device) if need_a else None
        grad_b = None if b is None or not need_b else torch.empty(b.shape, dtype=b.dtype, device=b.device)
        vocab = a.shape[-1]
        if vocab == 0 or all(g is None for g in flat):
            for grad in (grad_a, grad_b):
                if grad is not None:
                    grad.zero_()
            return (grad_a, grad_b, None, None, None)
        local_tokens = None if tokens is None else tokens - ctx.start
        held = None
        if local_tokens is not None:
            inside = (local_tokens >= 0) & (local_tokens < vocab)
            held = torch.where(inside, local_tokens, torch.full_like(local_tokens, -1))
        inputs = GradInputs(lse_a, lse_b, kl, ent, grad_kl, grad_ent, grad_logp, grad_logq, held)
        # grad_a / grad_b are fresh contiguous tensors, so their 2-D views line up with every row block of a
        ga2 = None if grad_a is None else grad_a.view(-1, vocab)
        gb2 = None if grad_b is None else grad_b.view(-1, vocab)
        for row0, a2, b2 in _row_blocks(a, b):
            rs = slice(row0, row0 + a2.shape[0])
            ctx.kernels.grads(
                a2,
                b2,
                temperature=ctx.temperature,
                dtype=ctx.dtype,
                inputs=inputs.rows(rs),
                grad_a=None if ga2 is None else ga2[rs],
                grad_b=None if gb2 is None else gb2[rs],
            )
        return (grad_a, grad_b, None, None, None)
