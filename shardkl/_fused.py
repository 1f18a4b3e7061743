"""The engine for logits given by their linear layer (:class:`shardkl.LinearLogits`) on either side.

Forward walks this rank's vocabulary in blocks of ``C`` columns and the tokens in blocks of ``R`` rows. For each
``[R, C]`` tile it computes the logits of each side (a matmul ``hidden @ weight_c.T`` for a linear side, a view for
a logits tensor), reduces them to per-token leaf stats with the kernels of ``impl``, and drops them; the stats of
the vocabulary blocks are merged per token with the stats monoid. Nothing of size ``[N, V_local]`` ever exists.
The forward then ends in the same single all-gather as the logits engine (:func:`shardkl._engine.gather_and_merge`).

Backward recomputes each tile from the saved per-token log-sum-exps and KL, forms the tile's logit gradient ``G``
with the same kernels, and turns it into ``grad_hidden += G @ weight_c``, ``grad_weight_c += G.T @ hidden`` and
``grad_bias_c += G.sum(0)``, each only where that input requires grad (a frozen teacher costs its recomputation
matmul only). No collective: ``grad_hidden`` is this rank's partial sum over its vocabulary rows (see
:mod:`shardkl.linear`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from shardkl import _stats, kernels
from shardkl._engine import (
    EngineSpec,
    _token_logits,
    call_info,
    compute_dtype,
    gather_and_merge,
    outputs,
)
from shardkl.kernels import GradInputs
from shardkl.linear import logits_tile, matmul, operand_dtype

# Elements of one [R, C] logit tile and its widest vocabulary block (the matmul's N dimension). On a CPU each side's
# tile and the kernels' temporaries are a few MiB (in cache, and ~4% of the logits at 2048 x 32k); on a GPU a tile
# must fill the device (a [1024, 4096] fp32 tile is 16 MiB, against 1.2 GB of bf16 logits at 32k x 19k).
TILE_ELEMENTS = 1 << 18
MAX_TILE_COLS = 512
CUDA_TILE_ELEMENTS = 1 << 22
CUDA_MAX_TILE_COLS = 4096


class _Side:
    """One side of the call (P or Q): a logits tensor, or hidden states and this rank's output-layer rows."""

    def __init__(
        self, logits: Tensor | None, hidden: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> None:
        self.logits, self.weight, self.bias = logits, weight, bias
        if logits is not None:
            self.lead_shape = logits.shape[:-1]
            self.vocab = logits.shape[-1]
            self.rows = logits.numel() // self.vocab if self.vocab else int(torch.tensor(self.lead_shape).prod())
            try:
                self.flat: Tensor | None = logits.view(-1, self.vocab)
            except RuntimeError:
                # not viewable as 2-D (e.g. logits[:, :-1]): tiles are gathered through the original layout
                self.flat = None
            self.hidden = None
        else:
            assert hidden is not None and weight is not None
            self.lead_shape = hidden.shape[:-1]
            self.vocab = weight.shape[0]
            # [N, H]; a copy only for hidden states that are not viewable as 2-D (O(N H), never O(N V))
            self.hidden = hidden.reshape(-1, hidden.shape[-1])
            self.rows = self.hidden.shape[0]
            self.flat = None

    @property
    def device(self) -> torch.device:
        source = self.logits if self.logits is not None else self.hidden
        assert source is not None
        return source.device

    @property
    def linear(self) -> bool:
        return self.hidden is not None

    def block(self, cols: slice, dtype: torch.dtype) -> tuple[Tensor, Tensor | None] | None:
        """This vocabulary block's weight rows (in the matmuls' operand dtype) and bias (in the compute dtype);
        ``None`` for a logits side."""
        if self.weight is None:
            return None
        bias = None if self.bias is None else self.bias[cols].to(dtype)
        return self.weight[cols].to(operand_dtype(self.weight, dtype)), bias

    def tile(self, rows: slice, cols: slice, block: tuple[Tensor, Tensor | None] | None, dtype: torch.dtype) -> Tensor:
        """Raw (not temperature-scaled) logits of the tile ``[rows, cols]``."""
        if block is not None:
            assert self.hidden is not None
            return logits_tile(self.hidden[rows], block[0], block[1], dtype)
        assert self.logits is not None
        if self.flat is not None:
            return self.flat[rows, cols]
        index = torch.unravel_index(torch.arange(rows.start, rows.stop, device=self.logits.device), self.lead_shape)
        return self.logits[(*index, cols)]  # type: ignore[index]

    def token_logits(self, tokens: Tensor, start: int, dtype: torch.dtype, temperature: float) -> Tensor:
        """Scaled logit at each token id this rank holds; ``-inf`` where another rank holds it."""
        local = tokens - start
        if self.logits is not None:
            return _token_logits(self.logits, local, dtype, temperature)
        assert self.hidden is not None and self.weight is not None
        out = torch.full(local.shape, float("-inf"), dtype=dtype, device=self.hidden.device)
        held = (local >= 0) & (local < self.vocab)
        if self.vocab == 0 or not bool(held.any()):
            return out
        rows = torch.nonzero(held).squeeze(-1)
        cols = local[rows]
        # one dot product per held token, in the compute dtype like the tiles
        values = (self.hidden[rows].to(dtype) * self.weight[cols].to(dtype)).sum(-1)
        if self.bias is not None:
            values = values + self.bias[cols].to(dtype)
        out[rows] = values / temperature if temperature != 1.0 else values
        return out


def tiles(rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """``(rows, columns)`` of the logit tiles for a ``[rows, vocab]`` block on ``device``."""
    cuda = device.type == "cuda"
    elements, widest = (CUDA_TILE_ELEMENTS, CUDA_MAX_TILE_COLS) if cuda else (TILE_ELEMENTS, MAX_TILE_COLS)
    cols = max(1, min(vocab, widest))
    return max(1, elements // cols), cols


def _empty_stats(two: bool, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # an empty shard is the identity of the merge: no mass, zero entropy and KL
    out = torch.zeros(_stats.num_stats(two), rows, dtype=dtype, device=device)
    out[_stats.LA] = float("-inf")
    if two:
        out[_stats.LB] = float("-inf")
    return out


def _merge_blocks(parts: Tensor, group: int = 16) -> Tensor:
    """The merged stats of ``[blocks, num_stats, rows]`` block stats, in float64, ``group`` blocks at a time: the
    merge's temporaries are then ``[group, rows]`` arrays, not ``[blocks, rows]`` ones (a few MiB at 60 blocks)."""
    while parts.shape[0] > 1:
        parts = torch.stack([_stats.merge_stats(parts[i : i + group].double()) for i in range(0, len(parts), group)])
    return parts[0]


class FusedStatsFunction(torch.autograd.Function):
    """Per-token ``(kl, entropy, logp, logq)`` where either side may be given as ``hidden @ weight.T + bias``.

    Inputs per side: ``logits`` (a tensor) or ``hidden, weight, bias`` (the others ``None``); side B may be absent.
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
        tokens: Tensor | None,
        mask: Tensor | None,
        spec: EngineSpec,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        side_a = _Side(a_logits, a_hidden, a_weight, a_bias)
        two = b_logits is not None or b_hidden is not None
        side_b = _Side(b_logits, b_hidden, b_weight, b_bias) if two else None
        dtype = compute_dtype(a_logits, a_hidden, a_weight, b_logits, b_hidden, b_weight)
        device = (a_logits if a_logits is not None else a_hidden).device  # type: ignore[union-attr]
        rows, vocab, temperature = side_a.rows, side_a.vocab, spec.temperature
        impl = kernels.resolve(spec.options.impl, device, dtype, rows * vocab)
        row_block, col_block = tiles(rows, vocab, device)
        starts = range(0, vocab, col_block)
        # the stats of every vocabulary block ([blocks, 4, rows]: a few floats per token and block), merged once at
        # the end in float64 (with 60 blocks of a 32k vocabulary, fp32 merges would add their rounding to a tiny KL;
        # one merge instead of one per block also saves ~30 small kernels per block on a GPU)
        parts = torch.empty(len(starts), _stats.num_stats(two), rows, dtype=dtype, device=device)
        for block, c0 in enumerate(starts):
            cols = slice(c0, min(c0 + col_block, vocab))
            block_a = side_a.block(cols, dtype)
            block_b = None if side_b is None else side_b.block(cols, dtype)
            for r0 in range(0, rows, row_block):
                rs = slice(r0, min(r0 + row_block, rows))
                tile_a = side_a.tile(rs, cols, block_a, dtype)
                tile_b = None if side_b is None else side_b.tile(rs, cols, block_b, dtype)
                parts[block, :, rs] = impl.stats(
                    tile_a, tile_b, temperature=temperature, dtype=dtype, entropy=spec.entropy
                )
        stats = _empty_stats(two, rows, dtype, device) if len(starts) == 0 else _merge_blocks(parts)
        flat_tokens = None if tokens is None else tokens.reshape(-1)
        token_logits = None
        if flat_tokens is not None:
            start = spec.layout.start
            pieces = [side_a.token_logits(flat_tokens, start, dtype, temperature)]
            if side_b is not None:
                pieces.append(side_b.token_logits(flat_tokens, start, dtype, temperature))
            token_logits = torch.stack(pieces)
        dtypes = [x.dtype for x in (a_logits, a_hidden, b_logits, b_hidden) if x is not None]
        info = call_info(
            spec, kept=vocab, rows=rows, lead_shape=side_a.lead_shape, p_dtype=dtypes[0],
            q_dtype=dtypes[1] if two else None,
        )
        row0 = None
        if a_logits is not None and a_logits.numel():
            row0 = a_logits[(0,) * (a_logits.dim() - 1)]
        merged = gather_and_merge(
            stats, token_logits, info, spec, row0=row0, tokens=flat_tokens, mask=mask, dtype=dtype
        )
        ctx.save_for_backward(
            a_logits, a_hidden, a_weight, a_bias, b_logits, b_hidden, b_weight, b_bias, flat_tokens,
            merged.lse_a, merged.lse_b, merged.kl, merged.ent,
        )
        ctx.spec, ctx.dtype, ctx.kernels = spec, dtype, impl
        ctx.set_materialize_grads(False)
        return outputs(merged, rows, side_a.lead_shape, dtype, device)  # type: ignore[return-value]

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_kl: Tensor | None, grad_ent: Tensor | None, grad_logp: Tensor | None, grad_logq: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        (a_logits, a_hidden, a_weight, a_bias, b_logits, b_hidden, b_weight, b_bias, tokens,
         lse_a, lse_b, kl, ent) = ctx.saved_tensors
        spec, dtype, impl = ctx.spec, ctx.dtype, ctx.kernels
        needs = ctx.needs_input_grad
        side_a = _Side(a_logits, a_hidden, a_weight, a_bias)
        two = b_logits is not None or b_hidden is not None
        side_b = _Side(b_logits, b_hidden, b_weight, b_bias) if two else None
        if not two:
            grad_kl = grad_logq = None
        if tokens is None:
            grad_logp = grad_logq = None
        if not any(needs[4:8]):
            grad_logq = None
        incoming = [None if g is None else g.reshape(-1).to(dtype) for g in (grad_kl, grad_ent, grad_logp, grad_logq)]
        grads = _Grads(side_a, needs[0:4], dtype)
        grads_b = None if side_b is None else _Grads(side_b, needs[4:8], dtype)
        if side_a.vocab == 0 or all(g is None for g in incoming) or not (grads.any or (grads_b and grads_b.any)):
            return (*grads.result(), *(grads_b.result() if grads_b else (None,) * 4), None, None, None)
        local_tokens = None if tokens is None else tokens - spec.layout.start
        rows, vocab, temperature = side_a.rows, side_a.vocab, spec.temperature
        row_block, col_block = tiles(rows, vocab, lse_a.device)
        for c0 in range(0, vocab, col_block):
            cols = slice(c0, min(c0 + col_block, vocab))
            block_a = side_a.block(cols, dtype)
            block_b = None if side_b is None else side_b.block(cols, dtype)
            grads.start_block(cols)
            if grads_b is not None:
                grads_b.start_block(cols)
            for r0 in range(0, rows, row_block):
                rs = slice(r0, min(r0 + row_block, rows))
                tile_a = side_a.tile(rs, cols, block_a, dtype)
                tile_b = None if side_b is None else side_b.tile(rs, cols, block_b, dtype)
                token_cols = None
                if local_tokens is not None:
                    local = local_tokens[rs] - c0
                    inside = (local >= 0) & (local < cols.stop - c0)
                    token_cols = torch.where(inside, local, torch.full_like(local, -1))
                grad_kl, grad_ent, grad_logp, grad_logq = incoming
                inputs = GradInputs(lse_a, lse_b, kl, ent, grad_kl, grad_ent, grad_logp, grad_logq, None).rows(rs)
                inputs = inputs._replace(token_cols=token_cols)
                buffer_a = grads.buffer(tile_a)
                buffer_b = None if grads_b is None else grads_b.buffer(tile_a)
                impl.grads(
                    tile_a, tile_b, temperature=temperature, dtype=dtype, inputs=inputs, grad_a=buffer_a,
                    grad_b=buffer_b,
                )
                grads.add(buffer_a, rs, cols, block_a)
                if grads_b is not None:
                    grads_b.add(buffer_b, rs, cols, block_b)
            grads.end_block(cols)
            if grads_b is not None:
                grads_b.end_block(cols)
        return (*grads.result(), *(grads_b.result() if grads_b else (None,) * 4), None, None, None)


class _Grads:
    """Gradient accumulators of one side: logits, or hidden / weight / bias (each only where required)."""

    def __init__(self, side: _Side, needs: tuple[bool, ...], dtype: torch.dtype) -> None:
        self.side, self.dtype = side, dtype
        need_logits, need_hidden, need_weight, need_bias = needs
        self.logits = self.hidden = self.weight = self.bias = None
        self.block_weight: Tensor | None = None
        self.block_bias: Tensor | None = None
        if side.logits is not None and need_logits:
            # fresh and contiguous, so its 2-D view lines up with the tiles even for non-viewable inputs
            self.logits = torch.zeros(side.logits.shape, dtype=side.logits.dtype, device=side.logits.device)
        if side.linear:
            assert side.hidden is not None and side.weight is not None
            if need_hidden:
                self.hidden = torch.zeros(side.hidden.shape, dtype=dtype, device=side.hidden.device)
            if need_weight:
                self.weight = torch.zeros(side.weight.shape, dtype=side.weight.dtype, device=side.weight.device)
            if need_bias and side.bias is not None:
                self.bias = torch.zeros(side.bias.shape, dtype=side.bias.dtype, device=side.bias.device)
        self.any = any(x is not None for x in (self.logits, self.hidden, self.weight, self.bias))

    def buffer(self, like: Tensor) -> Tensor | None:
        """A tile-shaped buffer for this side's logit gradient, or ``None`` if no input of this side needs it."""
        return torch.empty(like.shape, dtype=self.dtype, device=like.device) if self.any else None

    def start_block(self, cols: slice) -> None:
        width = cols.stop - cols.start
        if self.weight is not None:
            self.block_weight = torch.zeros(width, self.weight.shape[1], dtype=self.dtype, device=self.weight.device)
        if self.bias is not None:
            self.block_bias = torch.zeros(width, dtype=self.dtype, device=self.bias.device)

    def add(self, grad: Tensor | None, rows: slice, cols: slice, block: tuple[Tensor, Tensor | None] | None) -> None:
        """Turn one tile's logit gradient ``G`` into this side's input gradients."""
        if grad is None:
            return
        if self.logits is not None:
            self.logits.view(-1, self.side.vocab)[rows, cols] = grad
        if block is None:
            return
        hidden = self.side.hidden
        assert hidden is not None
        weight = block[0]
        # the matmuls read G in the weight's operand dtype (half on CUDA: tensor cores) and accumulate in fp32
        operand = grad.to(weight.dtype)
        if self.hidden is not None:
            self.hidden[rows] += matmul(operand, weight, self.dtype)
        if self.block_weight is not None:
            self.block_weight += matmul(operand.t(), hidden[rows].to(weight.dtype), self.dtype)
        if self.block_bias is not None:
            self.block_bias += grad.sum(0)

    def end_block(self, cols: slice) -> None:
        if self.weight is not None and self.block_weight is not None:
            self.weight[cols] = self.block_weight
        if self.bias is not None and self.block_bias is not None:
            self.bias[cols] = self.block_bias

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        hidden = self.hidden
        if hidden is not None and self.side.hidden is not None:
            shape = (*self.side.lead_shape, self.side.hidden.shape[-1])
            source_dtype = self.side.hidden.dtype
            hidden = hidden.reshape(shape).to(source_dtype)
        return self.logits, hidden, self.weight, self.bias


__all__ = ["FusedStatsFunction", "MAX_TILE_COLS", "TILE_ELEMENTS", "tiles"]
