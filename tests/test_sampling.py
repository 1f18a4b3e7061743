"""shardkl.sample_tokens: follows the softmax, identical for every world size and split, never draws padding."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import shardkl
from shardkl.sampling import BLOCK, sharded_random
from tests._distributed import run_ranks, split_sizes

VOCAB = 2 * BLOCK + 37


def test_sharded_random_is_the_same_for_any_split() -> None:
    full = sharded_random(5, 0, VOCAB, seed=2, stream="u")
    for cuts in ([0, 500, VOCAB], [0, 0, 1024, 1025, VOCAB]):
        parts = [sharded_random(5, lo, hi, seed=2, stream="u") for lo, hi in zip(cuts, cuts[1:], strict=False)]
        assert torch.equal(torch.cat(parts, -1), full)
    assert ((full >= 0) & (full < 1)).all()
    assert not torch.equal(sharded_random(5, 0, VOCAB, seed=2, stream="v"), full)


def test_samples_follow_the_softmax() -> None:
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0, float("-inf")]]).repeat(4000, 1)
    tokens = shardkl.sample_tokens(logits, seed=0, num_samples=2, temperature=1.5)
    assert tokens.shape == (2, 4000) and tokens.dtype == torch.int64
    freq = torch.bincount(tokens.reshape(-1), minlength=5).double() / tokens.numel()
    want = torch.softmax(logits[0].double() / 1.5, -1)
    se = (want * (1 - want) / tokens.numel()).sqrt()
    assert ((freq - want).abs() <= 4 * se + 1e-12).all(), (freq, want)
    assert freq[4] == 0
    one = shardkl.sample_tokens(logits.view(2, 2000, 5), seed=0)
    assert one.shape == (2, 2000)


def test_padding_is_never_drawn() -> None:
    logits = torch.zeros(3000, 6)
    logits[:, 4:] = 50.0  # padded columns with large garbage
    tokens = shardkl.sample_tokens(logits, seed=1, valid_vocab_size=4)
    assert tokens.max() < 4 and len(tokens.unique()) == 4


def _sample_on_ranks(rank: int, world: int, logits: torch.Tensor, expected: torch.Tensor) -> None:
    sizes = split_sizes(logits.shape[-1], world)
    start = sum(sizes[:rank])
    layout = shardkl.VocabLayout(start, start + sizes[rank], group=dist.group.WORLD)
    local = logits[:, start : start + sizes[rank]]
    tokens = shardkl.sample_tokens(local, seed=1, layout=layout, num_samples=3, temperature=0.9)
    assert torch.equal(tokens, expected)
    if world == 2:
        # without a layout the equal split is assumed; an uneven split raises the same error on every rank
        with pytest.raises(ValueError, match="do not tile the vocabulary"):
            shardkl.sample_tokens(local, seed=1, group=dist.group.WORLD)


@pytest.mark.parametrize("world", [2, 3])
def test_identical_across_world_sizes_and_uneven_splits(world: int) -> None:
    logits = torch.randn(40, VOCAB, generator=torch.Generator().manual_seed(1))
    expected = shardkl.sample_tokens(logits, seed=1, num_samples=3, temperature=0.9)
    run_ranks(_sample_on_ranks, world, logits, expected)
