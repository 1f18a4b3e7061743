"""Synthetic vocabulary-sharded logits, identical for every world size (application code of the seed experiment).

Each rank draws only the columns of its slice with :func:`shardkl.sampling.sharded_random`, so the global tensor
is the same whatever the split, yet no rank ever holds the full vocabulary.
"""

from __future__ import annotations

from torch import Tensor

from shardkl.sampling import sharded_random


def sharded_normal(rows: int, start: int, stop: int, vocab_size: int, *, seed: int, stream: str) -> Tensor:
    """Columns ``[start, stop)`` of a ``[rows, vocab_size]`` float32 N(0, 1) tensor fixed by ``(seed, stream)``."""
    return sharded_random(rows, start, stop, seed=seed, stream=stream, distribution="normal", vocab_size=vocab_size)
