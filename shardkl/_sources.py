"""Sources of the engine's tiles: one side's logits as a tensor, or as ``hidden @ weight.T + bias``. No collectives.

A call has one or two **sides** (P and Q; the top-k student alone). Each side is a :class:`Side`: this rank's
``[..., V_local]`` logits, or a :class:`shardkl.LinearLogits` (hidden states and this rank's rows of the output
layer), whose logits never exist as a whole. :class:`Sources` walks the sides in **tiles** of tokens × vocabulary
columns, the same tiles for both sides:

- logits on every side: the whole ``[rows, V_local]`` block is one tile (a 2-D view, never a copy), so a kernel
  sees the block in one native call or one launch and chooses its own tiling inside (several row blocks only for
  logits that are not viewable as 2-D, e.g. ``logits[:, :-1]``);
- a linear side anywhere: ``[R, C]`` tiles (:func:`tile_shape`), the linear side's from a matmul with a block of
  ``C`` weight rows (converted once per block), a logits side's as a view of the same columns.

:class:`Sink` is the other direction: where a tile's logit gradient goes — into the logits' gradient (in place when
the tile is whole rows), or through two matmuls into ``grad_hidden``, ``grad_weight`` and ``grad_bias``, each only
where that input requires grad.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from shardkl.linear import logits_tile, matmul, operand_dtype

# Elements of one [R, C] tile of a linear side and its widest vocabulary block (the matmul's N dimension). On a CPU
# each side's tile and the kernels' temporaries are a few MiB (in cache, and ~4% of the logits at 2048 x 32k); on a
# GPU a tile must fill the device (a [1024, 4096] fp32 tile is 16 MiB, against 1.2 GB of bf16 logits at 32k x 19k).
TILE_ELEMENTS = 1 << 18
MAX_TILE_COLS = 512
CUDA_TILE_ELEMENTS = 1 << 22
CUDA_MAX_TILE_COLS = 4096


def tile_shape(rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """``(rows, columns)`` of the tiles of a linear side's ``[rows, vocab]`` logits on ``device``."""
    cuda = device.type == "cuda"
    elements, widest = (CUDA_TILE_ELEMENTS, CUDA_MAX_TILE_COLS) if cuda else (TILE_ELEMENTS, MAX_TILE_COLS)
    cols = max(1, min(vocab, widest))
    return max(1, elements // cols), cols


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are computed in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


class Side:
    """One side of a call (P, Q or the student): a logits tensor, or hidden states and this rank's output-layer
    rows (``hidden`` ``[..., H]``, ``weight`` ``[V_local, H]``, ``bias`` ``[V_local]`` or ``None``)."""

    def __init__(
        self, logits: Tensor | None, hidden: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> None:
        self.logits, self.weight, self.bias = logits, weight, bias
        self.flat: Tensor | None = None
        self.hidden: Tensor | None = None
        if logits is not None:
            self.lead_shape = logits.shape[:-1]
            self.vocab = logits.shape[-1]
            self.rows = int(self.lead_shape.numel())
            try:
                self.flat = logits.view(-1, self.vocab)
            except RuntimeError:
                # not viewable as 2-D (e.g. logits[:, :-1]): tiles come from row blocks or the original layout
                self.flat = None
        else:
            assert hidden is not None and weight is not None
            self.lead_shape = hidden.shape[:-1]
            self.vocab = weight.shape[0]
            # [N, H]; a copy only for hidden states that are not viewable as 2-D (O(N H), never O(N V))
            self.hidden = hidden.reshape(-1, hidden.shape[-1])
            self.rows = self.hidden.shape[0]

    @property
    def source(self) -> Tensor:
        """The tensor the side is read from (logits, or hidden states)."""
        source = self.logits if self.logits is not None else self.hidden
        assert source is not None
        return source

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
        """Raw (not temperature-scaled) logits of the tile ``[rows, cols]``: a matmul in the compute dtype for a
        linear side, a view (a gather for logits not viewable as 2-D) for a logits side."""
        if block is not None:
            assert self.hidden is not None
            return logits_tile(self.hidden[rows], block[0], block[1], dtype)
        if self.flat is not None:
            return self.flat[rows, cols]
        assert self.logits is not None
        index = torch.unravel_index(torch.arange(rows.start, rows.stop, device=self.logits.device), self.lead_shape)
        return self.logits[(*index, cols)]  # type: ignore[index]


WeightBlock = tuple[Tensor, "Tensor | None"]
Blocks = tuple["WeightBlock | None", "WeightBlock | None"]


class Tile(NamedTuple):
    """One tile of a call: its rows (tokens) and vocabulary columns, and each side's raw logits there."""

    rows: slice
    cols: slice
    a: Tensor
    b: Tensor | None


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


class Sources:
    """The sides of one call and the tiles both are walked in (see the module docstring)."""

    def __init__(self, a: Side, b: Side | None, dtype: torch.dtype) -> None:
        self.a, self.b, self.dtype = a, b, dtype
        self.rows, self.vocab, self.lead_shape = a.rows, a.vocab, a.lead_shape
        self.device = a.source.device
        self.linear = a.linear or (b is not None and b.linear)
        if self.rows == 0 or self.vocab == 0:
            self.num_blocks = 0
        elif self.linear:
            self.row_block, self.col_block = tile_shape(self.rows, self.vocab, self.device)
            self.num_blocks = -(-self.vocab // self.col_block)
        else:
            self.num_blocks = 1

    def column_blocks(self) -> Iterator[tuple[slice, Blocks, Iterator[Tile]]]:
        """``(columns, weight blocks, tiles)`` of each vocabulary block, in order; the tiles of a block cover every
        row once. The weight blocks (a linear side's rows of the block in the matmuls' operand dtype, and its bias)
        are ``None`` for logits sides."""
        if self.num_blocks == 0:
            return
        if not self.linear:
            assert self.a.logits is not None
            b = None if self.b is None else self.b.logits
            cols = slice(0, self.vocab)
            tiles = (
                Tile(slice(r0, r0 + a2.shape[0]), cols, a2, b2) for r0, a2, b2 in _row_blocks(self.a.logits, b)
            )
            yield cols, (None, None), tiles
            return
        for c0 in range(0, self.vocab, self.col_block):
            cols = slice(c0, min(c0 + self.col_block, self.vocab))
            blocks = (self.a.block(cols, self.dtype), None if self.b is None else self.b.block(cols, self.dtype))
            yield cols, blocks, self._linear_tiles(cols, blocks)

    def tiles(self) -> Iterator[tuple[int, Tile]]:
        """Every tile with the index of its vocabulary block."""
        for index, (_, _, tiles) in enumerate(self.column_blocks()):
            for tile in tiles:
                yield index, tile

    def _linear_tiles(self, cols: slice, blocks: Blocks) -> Iterator[Tile]:
        for r0 in range(0, self.rows, self.row_block):
            rows = slice(r0, min(r0 + self.row_block, self.rows))
            tile_b = None if self.b is None else self.b.tile(rows, cols, blocks[1], self.dtype)
            yield Tile(rows, cols, self.a.tile(rows, cols, blocks[0], self.dtype), tile_b)


def held_values(x: Tensor, cols: Tensor) -> Tensor:
    """``x[r, cols[r, k]]`` where ``cols[r, k]`` lies in ``[0, x.shape[1])``, ``-inf`` elsewhere: ``[rows, K]``.

    The logits of a tile at token ids (or a teacher's top-k ids) given relative to the tile's first column.
    """
    inside = (cols >= 0) & (cols < x.shape[1])
    values = x.gather(1, torch.where(inside, cols, torch.zeros_like(cols))) if x.shape[1] else torch.zeros_like(
        cols, dtype=x.dtype
    )
    return torch.where(inside, values, torch.full((), float("-inf"), dtype=x.dtype, device=x.device))


class Sink:
    """Where one side's tile gradients go: its logits' gradient, or ``hidden`` / ``weight`` / ``bias`` (each only
    where required), accumulated in the compute dtype and returned in the inputs' dtypes."""

    def __init__(self, side: Side, needs: tuple[bool, ...], dtype: torch.dtype) -> None:
        self.side, self.dtype = side, dtype
        need_logits, need_hidden, need_weight, need_bias = needs
        self.logits = self.hidden = self.weight = self.bias = None
        self.block_weight: Tensor | None = None
        self.block_bias: Tensor | None = None
        if side.logits is not None and need_logits:
            # fresh and contiguous, so its 2-D view lines up with every tile, also for non-viewable inputs
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

    def target(self, tile: Tile, x: Tensor) -> Tensor | None:
        """A contiguous tensor for the tile's logit gradient, in the dtype of the tile's logits ``x``: a view of the
        logits' gradient for whole rows, else a buffer; ``None`` if no input of this side needs it."""
        if not self.any:
            return None
        if self.logits is not None and not self.side.linear and tile.cols.stop - tile.cols.start == self.side.vocab:
            return self.logits.view(-1, self.side.vocab)[tile.rows]
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    def start_block(self, cols: slice) -> None:
        width = cols.stop - cols.start
        if self.weight is not None:
            self.block_weight = torch.zeros(width, self.weight.shape[1], dtype=self.dtype, device=self.weight.device)
        if self.bias is not None:
            self.block_bias = torch.zeros(width, dtype=self.dtype, device=self.bias.device)

    def add(self, grad: Tensor | None, tile: Tile, block: tuple[Tensor, Tensor | None] | None) -> None:
        """Turn one tile's logit gradient ``G`` (written into :meth:`target`) into this side's input gradients."""
        if grad is None:
            return
        if self.logits is not None:
            view = self.logits.view(-1, self.side.vocab)[tile.rows, tile.cols]
            if view.data_ptr() != grad.data_ptr():
                view.copy_(grad)
        if block is None:
            return
        hidden = self.side.hidden
        assert hidden is not None
        weight = block[0]
        # the matmuls read G in the weight's operand dtype (half on CUDA: tensor cores) and accumulate in fp32
        operand = grad.to(weight.dtype)
        if self.hidden is not None:
            self.hidden[tile.rows] += matmul(operand, weight, self.dtype)
        if self.block_weight is not None:
            self.block_weight += matmul(operand.t(), hidden[tile.rows].to(weight.dtype), self.dtype)
        if self.block_bias is not None:
            self.block_bias += grad.sum(0)

    def end_block(self, cols: slice) -> None:
        if self.weight is not None and self.block_weight is not None:
            self.weight[cols] = self.block_weight
        if self.bias is not None and self.block_bias is not None:
            self.bias[cols] = self.block_bias

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``(logits, hidden, weight, bias)`` gradients, ``None`` where not required."""
        hidden = self.hidden
        if hidden is not None and self.side.hidden is not None:
            shape = (*self.side.lead_shape, self.side.hidden.shape[-1])
            hidden = hidden.reshape(shape).to(self.side.source.dtype)
        return self.logits, hidden, self.weight, self.bias


__all__ = [
    "CUDA_MAX_TILE_COLS",
    "CUDA_TILE_ELEMENTS",
    "MAX_TILE_COLS",
    "TILE_ELEMENTS",
    "Side",
    "Sink",
    "Sources",
    "Tile",
    "compute_dtype",
    "held_values",
    "tile_shape",
]
