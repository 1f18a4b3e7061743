"""Sharded synthetic logits: identical for every split of the vocabulary."""

from __future__ import annotations

import torch

from shardkl.apps.synthetic import sharded_normal
from shardkl.sampling import BLOCK

VOCAB = 2 * BLOCK + 37


def test_sharded_normal_is_the_same_for_any_split() -> None:
    full = sharded_normal(6, 0, VOCAB, VOCAB, seed=3, stream="x")
    assert full.shape == (6, VOCAB)
    for cuts in ([0, 500, VOCAB], [0, 0, 1024, 1025, VOCAB], [0, 2000, 2001, VOCAB]):
        parts = [sharded_normal(6, lo, hi, VOCAB, seed=3, stream="x") for lo, hi in zip(cuts, cuts[1:], strict=False)]
        assert torch.equal(torch.cat(parts, -1), full)
    assert not torch.equal(sharded_normal(6, 0, VOCAB, VOCAB, seed=4, stream="x"), full)
    assert not torch.equal(sharded_normal(6, 0, VOCAB, VOCAB, seed=3, stream="y"), full)
    assert abs(full.mean().item()) < 0.05 and abs(full.std().item() - 1) < 0.05
