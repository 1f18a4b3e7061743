"""Eager kernels: the math of :mod:`shardkl._stats` as PyTorch ops on memory-bounded tiles.

A ``[rows, V_local]`` block is cut into tiles of at most ``CHUNK_ELEMENTS`` elements (whole rows while a row fits,
vocabulary chunks of at most ``MAX_VOCAB_CHUNK`` columns merged with the stats monoid otherwise), so the extra
memory of a call is O(rows) plus a few tile-sized fp32 temporaries, whatever the vocabulary.

:func:`tiled_stats` and :func:`tiled_grads` take the per-tile functions as arguments, so an implementation that
only replaces the per-tile math can reuse the tiling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from shardkl import _stats
from shardkl.kernels import GradInputs, Kernels, scaled

# Elements per tile: the fp32 temporaries of one tile are ~1 MiB each.
CHUNK_ELEMENTS = 1 << 18
# Widest vocabulary chunk; wider rows are split and merged with the stats monoid.
MAX_VOCAB_CHUNK = 1 << 15

LeafFn = Callable[[Tensor, "Tensor | None", float, torch.dtype], Tensor]
TileGradsFn = Callable[..., "tuple[Tensor, Tensor | None]"]


def tiles(rows: int, vocab: int, elements: int | None = None) -> Iterator[tuple[slice, list[slice]]]:
    """``(row slice, column slices)`` of the tiles of a ``[rows, vocab]`` block, row block by row block."""
    elements = CHUNK_ELEMENTS if elements is None else elements
    vocab_chunk = max(1, min(vocab, MAX_VOCAB_CHUNK, elements))
    rows_chunk = max(1, elements // vocab_chunk)
    col_slices = [slice(c, min(c + vocab_chunk, vocab)) for c in range(0, vocab, vocab_chunk)]
    for r in range(0, rows, rows_chunk):
        yield slice(r, min(r + rows_chunk, rows)), col_slices


def leaf(a: Tensor, b: Tensor | None, temperature: float, dtype: torch.dtype, *, entropy: bool = True) -> Tensor:
    """Leaf stats of one raw tile with eager PyTorch ops."""
    return _stats.leaf_stats(
        scaled(a, dtype, temperature), None if b is None else scaled(b, dtype, temperature), entropy=entropy
    )


def _leaf_without_entropy(a: Tensor, b: Tensor | None, temperature: float, dtype: torch.dtype) -> Tensor:
    return leaf(a, b, temperature, dtype, entropy=False)


def tile_grads(
    a: Tensor, b: Tensor | None, temperature: float, dtype: torch.dtype, inputs: GradInputs
) -> tuple[Tensor, Tensor | None]:
    """Gradients of one raw tile with respect to the raw logits (``1/T`` applied), in the compute dtype."""
    grad_a, grad_b = _stats.chunk_grads(
        scaled(a, dtype, temperature), None if b is None else scaled(b, dtype, temperature), **inputs._asdict()
    )
    if temperature != 1.0:
        grad_a = grad_a.mul_(1.0 / temperature)
        grad_b = None if grad_b is None else grad_b.mul_(1.0 / temperature)
    return grad_a, grad_b


def tiled_stats(
    leaf_fn: LeafFn,
    a: Tensor,
    b: Tensor | None,
    *,
    temperature: float,
    dtype: torch.dtype,
    elements: int | None = None,
) -> Tensor:
    """Stats of a ``[rows, V_local]`` block from the leaf stats of its tiles, merged per row block."""
    rows, vocab = a.shape
    out = torch.empty(_stats.num_stats(b is not None), rows, dtype=dtype, device=a.device)
    for rs, col_slices in tiles(rows, vocab, elements):
        leaves = [leaf_fn(a[rs, cs], None if b is None else b[rs, cs], temperature, dtype) for cs in col_slices]
        out[:, rs] = leaves[0] if len(leaves) == 1 else _stats.merge_stats(torch.stack(leaves))
    return out


def tiled_grads(
    grads_fn: TileGradsFn,
    a: Tensor,
    b: Tensor | None,
    *,
    temperature: float,
    dtype: torch.dtype,
    inputs: GradInputs,
    grad_a: Tensor | None,
    grad_b: Tensor | None,
    elements: int | None = None,
) -> None:
    """Write the gradients of a ``[rows, V_local]`` block tile by tile."""
    rows, vocab = a.shape
    for rs, col_slices in tiles(rows, vocab, elements):
        row_inputs = inputs.rows(rs)
        for cs in col_slices:
            cols = row_inputs.token_cols
            if cols is not None:
                local = cols - cs.start
                cols = torch.where((local >= 0) & (local < cs.stop - cs.start), local, torch.full_like(local, -1))
            da, db = grads_fn(
                a[rs, cs], None if b is None else b[rs, cs], temperature, dtype, row_inputs._replace(token_cols=cols)
            )
            if grad_a is not None:
                grad_a[rs, cs] = da
            if grad_b is not None and db is not None:
                grad_b[rs, cs] = db


def stats(a: Tensor, b: Tensor | None, *, temperature: float, dtype: torch.dtype, entropy: bool = True) -> Tensor:
    """Stats of a ``[rows, V_local]`` block (see :class:`shardkl.kernels.Kernels`)."""
    return tiled_stats(leaf if entropy else _leaf_without_entropy, a, b, temperature=temperature, dtype=dtype)


def grads(
    a: Tensor,
    b: Tensor | None,
    *,
    temperature: float,
    dtype: torch.dtype,
    inputs: GradInputs,
    grad_a: Tensor | None,
    grad_b: Tensor | None,
) -> None:
    """Gradients of a ``[rows, V_local]`` block (see :class:`shardkl.kernels.Kernels`)."""
    tiled_grads(tile_grads, a, b, temperature=temperature, dtype=dtype, inputs=inputs, grad_a=grad_a, grad_b=grad_b)


KERNELS = Kernels("eager", stats, grads)
