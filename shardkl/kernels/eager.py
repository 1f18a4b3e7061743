"""Eager kernels: the math of :mod:`shardkl._stats` and :mod:`shardkl._divergences` as PyTorch ops on
memory-bounded tiles. The reference every other implementation is tested against.

A ``[rows, cols]`` block is cut into tiles of at most ``CHUNK_ELEMENTS`` elements (whole rows while a row fits,
vocabulary chunks of at most ``MAX_VOCAB_CHUNK`` columns otherwise), so the extra memory of a call is O(rows) plus a
few tile-sized fp32 temporaries, whatever the vocabulary. The chunks of a row are combined as each op says: the KL
stats by the stats monoid (in float64), the JSD terms by a float64 sum, the top-k log-sum-exps by ``logaddexp`` in
float64.

The tiling helpers take the per-tile functions as arguments, so an implementation that only replaces the per-tile
math (:mod:`shardkl.kernels.compiled`) reuses the tiling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from shardkl import _divergences, _stats
from shardkl.kernels import GradInputs, Kernels, scaled

# Elements per tile: the fp32 temporaries of one tile are ~1 MiB each.
CHUNK_ELEMENTS = 1 << 18
# Widest vocabulary chunk; wider rows are split and combined per op.
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


def local_columns(cols: Tensor, chunk: slice) -> Tensor:
    """Column indices relative to ``chunk``, with every index outside it set to -1."""
    local = cols - chunk.start
    return torch.where((local >= 0) & (local < chunk.stop - chunk.start), local, torch.full_like(local, -1))


# --- KL statistics ------------------------------------------------------------------------------------------


def leaf(
    a: Tensor, b: Tensor | None, temperature: float, dtype: torch.dtype, *, entropy: bool = True, kl: bool = True
) -> Tensor:
    """Leaf stats of one raw tile with eager PyTorch ops."""
    return _stats.leaf_stats(
        scaled(a, dtype, temperature), None if b is None else scaled(b, dtype, temperature), entropy=entropy, kl=kl
    )


def tile_grads(
    a: Tensor, b: Tensor | None, temperature: float, dtype: torch.dtype, inputs: GradInputs
) -> tuple[Tensor, Tensor | None]:
    """KL gradients of one raw tile with respect to the raw logits (``1/T`` applied), in the compute dtype."""
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
    """KL stats of a ``[rows, cols]`` block from the leaf stats of its tiles, merged per row block in float64."""
    rows, vocab = a.shape
    out = torch.empty(_stats.num_stats(b is not None), rows, dtype=dtype, device=a.device)
    for rs, col_slices in tiles(rows, vocab, elements):
        leaves = [leaf_fn(a[rs, cs], None if b is None else b[rs, cs], temperature, dtype) for cs in col_slices]
        # float64: the merge's gap terms keep a tiny KL's digits and cannot overflow
        out[:, rs] = leaves[0] if len(leaves) == 1 else _stats.merge_stats(torch.stack(leaves).double()).to(dtype)
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
    """Write the KL gradients of a ``[rows, cols]`` block tile by tile."""
    rows, vocab = a.shape
    for rs, col_slices in tiles(rows, vocab, elements):
        row_inputs = inputs.rows(rs)
        for cs in col_slices:
            cols = row_inputs.token_cols
            tile_inputs = row_inputs._replace(token_cols=None if cols is None else local_columns(cols, cs))
            da, db = grads_fn(a[rs, cs], None if b is None else b[rs, cs], temperature, dtype, tile_inputs)
            if grad_a is not None:
                grad_a[rs, cs] = da
            if grad_b is not None and db is not None:
                grad_b[rs, cs] = db


def kl_stats(
    a: Tensor, b: Tensor | None, *, temperature: float, dtype: torch.dtype, entropy: bool = True, kl: bool = True
) -> Tensor:
    """KL stats of a ``[rows, cols]`` block: ``[num_stats, rows]`` in ``dtype``.

    Args:
        a, b: ``[rows, cols]`` raw logits of P and Q (any row stride; ``b`` may be ``None``).
        temperature: divides both.
        dtype: the compute dtype (float32 or float64).
        entropy: ``False``: the entropy row may hold anything (the caller does not read it).
        kl: ``False``: the KL row may hold anything (only the log-sum-exps are read).
    """

    def leaf_fn(x: Tensor, y: Tensor | None, t: float, d: torch.dtype) -> Tensor:
        return leaf(x, y, t, d, entropy=entropy, kl=kl)

    return tiled_stats(leaf_fn, a, b, temperature=temperature, dtype=dtype)


def kl_grads(
    a: Tensor,
    b: Tensor | None,
    *,
    temperature: float,
    dtype: torch.dtype,
    inputs: GradInputs,
    grad_a: Tensor | None,
    grad_b: Tensor | None,
) -> None:
    """Write the KL gradients of a ``[rows, cols]`` block into ``grad_a`` / ``grad_b`` (each skipped if ``None``).

    Args:
        inputs: the saved per-token results and incoming gradients (:class:`shardkl.kernels.GradInputs`).
        grad_a, grad_b: ``[rows, cols]`` contiguous outputs in the inputs' dtypes (or the compute dtype).
    """
    tiled_grads(tile_grads, a, b, temperature=temperature, dtype=dtype, inputs=inputs, grad_a=grad_a, grad_b=grad_b)


# --- generalised JSD -------------------------------------------------------------------------------------------


def tiled_sum(
    tile_fn: Callable[[slice, slice], Tensor], rows: int, vocab: int, k: int, device: torch.device,
    elements: int | None = None,
) -> Tensor:
    """``[k, rows]`` float64 sums over the column chunks of ``tile_fn(rows, cols) -> [k, r]``."""
    out = torch.zeros(k, rows, dtype=torch.float64, device=device)
    for rs, col_slices in tiles(rows, vocab, elements):
        for cs in col_slices:
            out[:, rs] += tile_fn(rs, cs).to(torch.float64)
    return out


def jsd_terms(
    a: Tensor,
    b: Tensor,
    *,
    temperature: float,
    dtype: torch.dtype,
    lse_a: Tensor,
    lse_b: Tensor,
    beta: float,
) -> Tensor:
    """This block's per-token sums of the terms of KL(P‖M) and KL(Q‖M), ``M = βP + (1−β)Q``: ``[2, rows]`` float64.

    Each term is in its non-negative form (``w·x − w + m`` with ``x = log w − log m``), so nothing cancels however
    small the divergence (:func:`shardkl._divergences.jsd_tile_terms`).

    Args:
        a, b: ``[rows, cols]`` raw logits of P and Q.
        lse_a, lse_b: ``[rows]`` the **global** log-sum-exps of ``a / T`` and ``b / T`` (compute dtype). Rows where
            either is not finite may hold anything (the engine replaces them).
        beta: the mixture weight, 0 < β < 1.
    """
    return tiled_sum(
        lambda rs, cs: _divergences.jsd_tile_terms(
            scaled(a[rs, cs], dtype, temperature), scaled(b[rs, cs], dtype, temperature), lse_a[rs], lse_b[rs], beta
        ),
        a.shape[0], a.shape[1], 2, a.device,
    )


def jsd_grads(
    a: Tensor,
    b: Tensor,
    *,
    temperature: float,
    dtype: torch.dtype,
    lse_a: Tensor,
    lse_b: Tensor,
    kl_pm: Tensor,
    kl_qm: Tensor,
    grad: Tensor,
    beta: float,
    grad_a: Tensor | None,
    grad_b: Tensor | None,
) -> None:
    """Write ``grad · ∂JSD_β`` with respect to the raw logits: ``β g P_v (x_v − KL(P‖M)) / T`` into ``grad_a``
    and ``(1−β) g Q_v (y_v − KL(Q‖M)) / T`` into ``grad_b`` (each skipped if ``None``); 0 where the column's
    probability is 0 or ``grad`` is 0.

    Args:
        lse_a, lse_b, kl_pm, kl_qm: ``[rows]`` global results of the forward pass (compute dtype).
        grad: ``[rows]`` the incoming gradient of the per-token JSD.
    """
    rows, vocab = a.shape
    for rs, col_slices in tiles(rows, vocab):
        for cs in col_slices:
            ga, gb = _divergences.jsd_tile_grads(
                scaled(a[rs, cs], dtype, temperature), scaled(b[rs, cs], dtype, temperature), lse_a[rs], lse_b[rs],
                kl_pm[rs], kl_qm[rs], beta, grad[rs], need_a=grad_a is not None, need_b=grad_b is not None,
            )
            if grad_a is not None and ga is not None:
                grad_a[rs, cs] = ga if temperature == 1.0 else ga.mul_(1.0 / temperature)
            if grad_b is not None and gb is not None:
                grad_b[rs, cs] = gb if temperature == 1.0 else gb.mul_(1.0 / temperature)


# --- top-k teacher ----------------------------------------------------------------------------------------------


def topk_stats(s: Tensor, *, temperature: float, dtype: torch.dtype, ids: Tensor) -> Tensor:
    """``[2, rows]`` float64: the log-sum-exp of ``s / T`` over the block, and over its columns not among ``ids``.

    Args:
        s: ``[rows, cols]`` raw student logits.
        ids: ``[rows, K]`` int64 teacher ids relative to the block's first column; values outside ``[0, cols)``
            are not in this block.

    The excluded log-sum-exp is accumulated in float64 around its own maximum (never ``1 − Σ``, and never lost to
    underflow when the tail is far below the ids: ``s = [110, 0, 0]`` without id 0 gives ``log 2``).
    """
    rows, vocab = s.shape
    out = torch.full((2, rows), float("-inf"), dtype=torch.float64, device=s.device)
    for rs, col_slices in tiles(rows, vocab):
        for cs in col_slices:
            part = _divergences.topk_tile_stats(scaled(s[rs, cs], dtype, temperature), ids[rs] - cs.start)
            out[:, rs] = torch.logaddexp(out[:, rs], part)
    return out


def topk_grads(
    s: Tensor,
    *,
    temperature: float,
    dtype: torch.dtype,
    ids: Tensor,
    lse_excl: Tensor,
    tail_coef: Tensor,
    id_coef: Tensor,
    grad_s: Tensor,
) -> None:
    """Write the top-k gradient with respect to the raw student logits into ``grad_s``.

    A column outside the ids gets ``exp(s_v / T − lse_excl) · tail_coef / T`` (its share of the tail times a
    per-token factor; 0 where the tail has no mass), the column of ``ids[r, k]`` gets ``id_coef[r, k] / T``.

    Args:
        s: ``[rows, cols]`` raw student logits.
        ids: ``[rows, K]`` int64 ids relative to the block (values outside ``[0, cols)`` are not in this block).
        lse_excl: ``[rows]`` the global log-sum-exp of the tail (compute dtype).
        tail_coef: ``[rows]``, id_coef: ``[rows, K]``: the per-token factors, incoming gradient included.
        grad_s: ``[rows, cols]`` contiguous output.
    """
    rows, vocab = s.shape
    for rs, col_slices in tiles(rows, vocab):
        for cs in col_slices:
            g = _divergences.topk_tile_grads(
                scaled(s[rs, cs], dtype, temperature), ids[rs] - cs.start, lse_excl[rs], tail_coef[rs], id_coef[rs]
            )
            grad_s[rs, cs] = g if temperature == 1.0 else g.mul_(1.0 / temperature)


KERNELS = Kernels("eager", kl_stats, kl_grads, jsd_terms, jsd_grads, topk_stats, topk_grads)

__all__ = [
    "CHUNK_ELEMENTS",
    "KERNELS",
    "MAX_VOCAB_CHUNK",
    "jsd_grads",
    "jsd_terms",
    "kl_grads",
    "kl_stats",
    "leaf",
    "local_columns",
    "tile_grads",
    "tiled_grads",
    "tiled_stats",
    "tiled_sum",
    "tiles",
    "topk_grads",
    "topk_stats",
]
