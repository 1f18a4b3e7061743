"""Vocabulary-sharded synthetic logits and sampling, identical for every world size.

Random numbers are drawn per block of ``BLOCK`` global vocabulary columns from a generator seeded by
``(seed, stream, block)``; a rank draws only the blocks that overlap its slice and crops them. The global
tensor is therefore the same whatever the split, yet no rank ever holds the full vocabulary.

Sampling uses the Gumbel-max trick: ``argmax_v (a_v + G_v)`` with ``G_v`` Gumbel noise drawn the same way.
Each rank finds its local maximum; one all-gather of ``(max, global id)`` per token picks the winner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor

from shardkl.distributed import ProcessGroup, argmax_over_ranks

BLOCK = 1024


def vocab_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Balanced contiguous split: the first ``vocab_size % world_size`` ranks hold one column more."""
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _block_seed(seed: int, stream: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{stream}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _blocks(start: int, stop: int, vocab_size: int) -> Iterator[tuple[int, int, int]]:
    """``(block, lo, hi)`` for the global blocks overlapping ``[start, stop)``, with the overlap's bounds."""
    for block in range(start // BLOCK, -(-stop // BLOCK)):
        lo, hi = max(start, block * BLOCK), min(stop, (block + 1) * BLOCK, vocab_size)
        if lo < hi:
            yield block, lo, hi


def _draw(rows: int, block: int, vocab_size: int, seed: int, stream: str, kind: str) -> Tensor:
    width = min(BLOCK, vocab_size - block * BLOCK)
    gen = torch.Generator().manual_seed(_block_seed(seed, stream, block))
    if kind == "normal":
        return torch.randn(rows, width, generator=gen)
    return torch.rand(rows, width, generator=gen)


def sharded_normal(
    rows: int, start: int, stop: int, vocab_size: int, *, seed: int, stream: str
) -> Tensor:
    """Columns ``[start, stop)`` of a ``[rows, vocab_size]`` float32 N(0, 1) tensor fixed by ``(seed, stream)``."""
    out = torch.empty(rows, stop - start)
    for block, lo, hi in _blocks(start, stop, vocab_size):
        base = block * BLOCK
        out[:, lo - start : hi - start] = _draw(rows, block, vocab_size, seed, stream, "normal")[
            :, lo - base : hi - base
        ]
    return out


def gumbel_max_sample(
    logits: Tensor,
    start: int,
    vocab_size: int,
    *,
    seed: int,
    samples: int,
    temperature: float = 1.0,
    group: ProcessGroup | None = None,
) -> Tensor:
    """Draw ``samples`` token ids per row from ``softmax(logits / T)`` over the sharded vocabulary.

    Args:
        logits: ``[rows, V_local]`` this rank's columns ``[start, start + V_local)``.
        start: first global column of this rank.
        vocab_size: global vocabulary size.
        seed: seed of the Gumbel noise (independent of the world size).
        samples: draws per row.
        temperature: softmax temperature.
        group: process group the vocabulary is split over.

    Returns:
        ``[samples, rows]`` int64 global token ids, identical on every rank and for every world size.
    """
    rows, local = logits.shape
    stop = start + local
    best = torch.full((samples, rows), float("-inf"), dtype=torch.float64)
    best_id = torch.full((samples, rows), -1.0, dtype=torch.float64)
    for s in range(samples):
        for block, lo, hi in _blocks(start, stop, vocab_size):
            base = block * BLOCK
            u = _draw(rows, block, vocab_size, seed, f"gumbel/{s}", "uniform")[:, lo - base : hi - base]
            # Gumbel(0, 1) noise; u = 0 gives -inf, which never wins
            scores = logits[:, lo - start : hi - start].float() / temperature - torch.log(-torch.log(u))
            value, index = scores.max(dim=-1)
            better = value.double() > best[s]  # strict: the lowest id wins a tie, as in one full argmax
            best[s] = torch.where(better, value.double(), best[s])
            best_id[s] = torch.where(better, (index + lo).double(), best_id[s])
    return argmax_over_ranks(best, best_id, group)
