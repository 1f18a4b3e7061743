"""Sharded synthetic logits and Gumbel-max sampling: identical for every world size, correct distribution."""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardkl.simulate import BLOCK, gumbel_max_sample, sharded_normal, vocab_range
from tests._distributed import run_ranks

VOCAB = 2 * BLOCK + 37


def test_vocab_range_partitions_the_vocabulary() -> None:
    for vocab in (1, 5, 1000, 1003):
        for world in (1, 2, 3, 4, 7):
            ranges = [vocab_range(vocab, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == vocab
            assert all(ranges[r][1] == ranges[r + 1][0] for r in range(world - 1))
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_sharded_normal_is_the_same_for_any_split() -> None:
    full = sharded_normal(6, 0, VOCAB, VOCAB, seed=3, stream="x")
    assert full.shape == (6, VOCAB)
    for cuts in ([0, 500, VOCAB], [0, 0, 1024, 1025, VOCAB], [0, 2000, 2001, VOCAB]):
        parts = [sharded_normal(6, lo, hi, VOCAB, seed=3, stream="x") for lo, hi in zip(cuts, cuts[1:], strict=False)]
        assert torch.equal(torch.cat(parts, -1), full)
    assert not torch.equal(sharded_normal(6, 0, VOCAB, VOCAB, seed=4, stream="x"), full)
    assert not torch.equal(sharded_normal(6, 0, VOCAB, VOCAB, seed=3, stream="y"), full)
    assert abs(full.mean().item()) < 0.05 and abs(full.std().item() - 1) < 0.05


def test_gumbel_max_follows_softmax() -> None:
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0, float("-inf")]]).repeat(4000, 1)
    tokens = gumbel_max_sample(logits, 0, 5, seed=0, samples=2, temperature=1.5)
    assert tokens.shape == (2, 4000)
    freq = torch.bincount(tokens.reshape(-1), minlength=5).double() / tokens.numel()
    want = torch.softmax(logits[0].double() / 1.5, -1)
    se = (want * (1 - want) / tokens.numel()).sqrt()
    assert ((freq - want).abs() <= 4 * se + 1e-12).all(), (freq, want)
    assert freq[4] == 0


def _sample_on_ranks(rank: int, world: int, expected: torch.Tensor) -> None:
    lo, hi = vocab_range(VOCAB, rank, world)
    logits = sharded_normal(40, lo, hi, VOCAB, seed=1, stream="ref")
    tokens = gumbel_max_sample(logits, lo, VOCAB, seed=1, samples=3, temperature=0.9, group=dist.group.WORLD)
    assert torch.equal(tokens, expected)


def test_gumbel_max_is_identical_across_world_sizes() -> None:
    logits = sharded_normal(40, 0, VOCAB, VOCAB, seed=1, stream="ref")
    expected = gumbel_max_sample(logits, 0, VOCAB, seed=1, samples=3, temperature=0.9)
    for world in (2, 3):
        run_ranks(_sample_on_ranks, world, expected)
