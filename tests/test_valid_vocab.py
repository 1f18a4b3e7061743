"""``valid_vocab_size=``: a padded vocabulary tail (Megatron/vLLM layout) is dropped exactly, with zero gradient."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import shardkl
from shardkl.testing import count_collectives
from tests._distributed import local_layout, local_slice, run_ranks
from tests.reference import reference

NAMES = ("exact_kl", "entropy", "p_logprobs", "q_logprobs")


def _padded_inputs(valid: int, padded: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 3, padded, generator=g, dtype=torch.float64) * 2
    b = a + 0.5 * torch.randn(2, 3, padded, generator=g, dtype=torch.float64)
    # padded columns hold large finite garbage (an untrained padded lm_head row): it must not count
    a[..., valid:], b[..., valid:] = 30.0, -7.0
    return a, b, torch.randint(0, valid, (2, 3), generator=g)


def _check_padded(rank: int, world: int, valid: int, padded: int) -> None:
    group = dist.group.WORLD if world > 1 else None
    a, b, tokens = _padded_inputs(valid, padded)
    ref_in = (a[..., :valid].clone().requires_grad_(), b[..., :valid].clone().requires_grad_())
    ref = reference(*ref_in, tokens)
    sum(ref[n].sum() * (i + 1) for i, n in enumerate(NAMES)).backward()
    local = padded // world
    cols = slice(rank * local, (rank + 1) * local)
    x = a[..., cols].clone().requires_grad_()
    y = b[..., cols].clone().requires_grad_()
    for _ in range(2):  # nothing is learned or cached between calls
        x.grad = y.grad = None
        got = shardkl.kl_stats(x, y, tokens, group=group, valid_vocab_size=valid)
        for name in NAMES:
            torch.testing.assert_close(getattr(got, name), ref[name].detach(), rtol=1e-12, atol=1e-12, msg=name)
        sum(getattr(got, n).sum() * (i + 1) for i, n in enumerate(NAMES)).backward()
        for mine, full in ((x.grad, ref_in[0].grad), (y.grad, ref_in[1].grad)):
            start, stop = rank * local, min((rank + 1) * local, valid)
            kept = max(stop - start, 0)
            torch.testing.assert_close(mine[..., :kept], full[..., start : start + kept], rtol=1e-10, atol=1e-13)
            assert (mine[..., kept:] == 0).all(), "padded columns get exactly zero gradient"
    torch.testing.assert_close(
        shardkl.exact_kl(x, y, group=group, valid_vocab_size=valid, reduction="token_mean"),
        ref["exact_kl"].detach().mean(),
    )
    torch.testing.assert_close(
        shardkl.sampled_kl(x, y, tokens, group=group, valid_vocab_size=valid, estimator="k1"),
        (ref["p_logprobs"] - ref["q_logprobs"]).detach(),
    )
    torch.testing.assert_close(shardkl.entropy(x, group=group, valid_vocab_size=valid), ref["entropy"].detach())
    torch.testing.assert_close(
        shardkl.token_logprobs(x, tokens, group=group, valid_vocab_size=valid), ref["p_logprobs"].detach()
    )
    # a token id in the padding is out of the (valid) vocabulary on every rank
    with pytest.raises(ValueError, match=rf"\[0, {valid}\)"):
        shardkl.token_logprobs(x, torch.full_like(tokens, valid), group=group, valid_vocab_size=valid)
    with pytest.raises(ValueError, match=rf"<= the padded vocabulary size {padded}.*got {padded + 1}"):
        shardkl.entropy(x, group=group, valid_vocab_size=padded + 1)
    with pytest.raises(TypeError, match="valid_vocab_size must be an int"):
        shardkl.entropy(x, group=group, valid_vocab_size=3.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("world", "valid", "padded"),
    [(1, 1001, 1008), (2, 1001, 1004), (3, 7, 12), (4, 1000, 1000)],
)
def test_valid_vocab_size_drops_padding_exactly(world: int, valid: int, padded: int) -> None:
    # (3, 7, 12): shards of 4; rank 1 keeps 3 columns, rank 2 keeps none
    if world == 1:
        _check_padded(0, 1, valid, padded)
    else:
        run_ranks(_check_padded, world, valid, padded)


def _check_uneven_padded(rank: int, world: int, sizes: list[int], valid: int) -> None:
    """Uneven shards of a padded vocabulary: the exact answer with a layout, one clear error on every rank
    without one (the equal split it then assumes is wrong), never a number that counts padding."""
    padded = sum(sizes)
    a, b, tokens = _padded_inputs(valid, padded)
    ref = reference(a[..., :valid], b[..., :valid], tokens)
    x, y = local_slice(a, sizes, rank), local_slice(b, sizes, rank)
    layout = local_layout(sizes, rank)
    with count_collectives() as counter:
        got = shardkl.kl_stats(x, y, tokens, layout=layout, valid_vocab_size=valid)
    assert counter.total == 1
    for name in NAMES:
        torch.testing.assert_close(getattr(got, name), ref[name], rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(shardkl.exact_kl(x, y, layout=layout, valid_vocab_size=valid), ref["exact_kl"])
    with pytest.raises(ValueError, match="do not tile the vocabulary.*equal split"):
        shardkl.exact_kl(x, y, group=dist.group.WORLD, valid_vocab_size=valid)
    # a valid size beyond some ranks' guessed padded size but not others': the same error everywhere, no wait
    with pytest.raises(ValueError, match="do not tile the vocabulary"):
        shardkl.exact_kl(x, y, group=dist.group.WORLD, valid_vocab_size=padded - 1)
    with pytest.raises(ValueError, match=rf"<= the padded vocabulary size {padded}"):
        shardkl.exact_kl(x, y, layout=layout, valid_vocab_size=padded + 1)


@pytest.mark.parametrize(("sizes", "valid"), [([502, 501], 1001), ([400, 0, 603], 1001), ([340, 340, 323], 700)])
def test_uneven_shards_with_valid_vocab_size_are_exact_or_raise_everywhere(sizes: list[int], valid: int) -> None:
    run_ranks(_check_uneven_padded, len(sizes), sizes, valid)
