"""Multi-rank tests: gloo ranks on CPU, uneven vocabulary splits (with an empty shard), float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import shardkl
from shardkl._validation import NUM_META
from shardkl.kernels import eager
from shardkl.testing import count_collectives
from tests._distributed import local_layout, local_slice, run_ranks, split_sizes
from tests.reference import reference

VOCAB = 1003
NAMES = ("exact_kl", "entropy", "p_logprobs", "q_logprobs")
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def _global_inputs(vocab: int = VOCAB, shape: tuple[int, ...] = (2, 5)):
    g = torch.Generator().manual_seed(123)
    a = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2
    b = a + 0.4 * torch.randn(*shape, vocab, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, vocab, shape, generator=g)
    weights = torch.randn(len(NAMES), *shape, generator=g, dtype=torch.float64)
    return a, b, tokens, weights


def _weighted_loss(stats: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    return sum((weights[i] * stats[name].double()).sum() for i, name in enumerate(NAMES))


def _check_values_and_gradients(rank: int, world: int, pattern: str) -> None:
    eager.CHUNK_ELEMENTS, eager.MAX_VOCAB_CHUNK = 512, 128  # several chunks per shard
    sizes = split_sizes(VOCAB, world, pattern)
    a, b, tokens, weights = _global_inputs()
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for temperature in (1.0, 0.8):
            ag, bg = a.to(dtype), b.to(dtype)
            ref_in = (ag.double().clone().requires_grad_(), bg.double().clone().requires_grad_())
            ref = reference(*ref_in, tokens, temperature)
            _weighted_loss(ref, weights).backward()
            x = local_slice(ag, sizes, rank).detach().clone().requires_grad_()
            y = local_slice(bg, sizes, rank).detach().clone().requires_grad_()
            layout = local_layout(sizes, rank)
            got = shardkl.kl_stats(x, y, tokens, layout=layout, temperature=temperature)._asdict()
            tol = TOL[dtype]
            for name in NAMES:
                torch.testing.assert_close(got[name].double(), ref[name].detach(), rtol=tol, atol=tol, msg=name)
            _weighted_loss(got, weights).backward()
            gtol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
            for mine, full in ((x.grad, ref_in[0].grad), (y.grad, ref_in[1].grad)):
                assert mine.dtype == dtype
                torch.testing.assert_close(
                    mine.double(), local_slice(full, sizes, rank), rtol=gtol, atol=gtol * 1e-2
                )
            lp = shardkl.token_logprobs(local_slice(ag, sizes, rank), tokens, layout=layout, temperature=temperature)
            torch.testing.assert_close(lp.double(), ref["p_logprobs"].detach(), rtol=tol, atol=tol)
            # without tokens the offsets do not matter: any split works with a plain group
            group = dist.group.WORLD if world > 1 else None
            ent = shardkl.entropy(local_slice(ag, sizes, rank), group=group, temperature=temperature)
            torch.testing.assert_close(ent.double(), ref["entropy"].detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_values_and_gradients_match_reference_uneven(world: int) -> None:
    run_ranks(_check_values_and_gradients, world, "uneven")


def test_values_and_gradients_match_reference_even() -> None:
    run_ranks(_check_values_and_gradients, 2, "even")


def _check_collectives_and_padding(rank: int, world: int) -> None:
    group = dist.group.WORLD
    sizes = split_sizes(VOCAB, world, "uneven")
    a, b, tokens, _ = _global_inputs()
    x = local_slice(a, sizes, rank).float().requires_grad_()
    y = local_slice(b, sizes, rank).float().requires_grad_()
    layout = local_layout(sizes, rank)
    # the very first call of this process: one collective, no warm-up, nothing learned or cached
    with count_collectives() as fwd:
        stats = shardkl.kl_stats(x, y, tokens, layout=layout)
    with count_collectives() as bwd:
        (stats.exact_kl.sum() + stats.k3.sum() + stats.entropy.sum()).backward()
    assert fwd.total == 1, fwd.calls
    assert bwd.total == 0, bwd.calls
    # bytes per token per rank do not depend on the vocabulary
    tokens_count = tokens.numel()
    wide = local_layout([2 * s for s in sizes], rank)
    with count_collectives() as wide2:
        shardkl.kl_stats(torch.cat([x, x], -1).detach(), torch.cat([y, y], -1).detach(), tokens, layout=wide)
    assert wide2.total == 1 and wide2.bytes_sent == fwd.bytes_sent
    # 4 stats + 2 sampled-token logits per token in float64, plus the per-rank metadata
    assert fwd.bytes_sent == (4 + 2) * 8 * tokens_count + 8 * NUM_META

    # a vocabulary padded with -inf columns at the end of the last rank changes nothing
    pad = 5
    xp, yp = local_slice(a, sizes, rank), local_slice(b, sizes, rank)
    if rank == world - 1:
        minus_inf = torch.full((*a.shape[:-1], pad), float("-inf"), dtype=a.dtype)
        xp, yp = torch.cat([xp, minus_inf], -1), torch.cat([yp, minus_inf], -1)
    xp, yp = xp.requires_grad_(), yp.requires_grad_()
    got = shardkl.kl_stats(xp, yp, tokens, layout=local_layout([*sizes[:-1], sizes[-1] + pad], rank))
    ref = reference(a, b, tokens)
    for name in NAMES:
        torch.testing.assert_close(getattr(got, name), ref[name], msg=name)
    (got.exact_kl + got.entropy + got.p_logprobs + got.q_logprobs).sum().backward()
    assert torch.isfinite(xp.grad).all() and torch.isfinite(yp.grad).all()
    if rank == world - 1:
        assert (xp.grad[..., -pad:] == 0).all() and (yp.grad[..., -pad:] == 0).all()

    # token ids beyond the global vocabulary raise on every rank
    with pytest.raises(ValueError, match=rf"\[0, {VOCAB}\)"):
        shardkl.token_logprobs(x.detach(), torch.full_like(tokens, VOCAB), layout=layout)
    # with tokens, an uneven split without a layout raises the same error on every rank (no silent offsets)
    with pytest.raises(ValueError, match="do not tile the vocabulary.*equal split"):
        shardkl.kl_stats(x, y, tokens, group=group)
    # without tokens the offsets do not matter: a plain group gives the exact KL for any split
    torch.testing.assert_close(shardkl.exact_kl(x, y, group=group), ref["exact_kl"].float())


@pytest.mark.parametrize("world", [2, 3])
def test_one_collective_forward_none_backward_and_padding(world: int) -> None:
    run_ranks(_check_collectives_and_padding, world)


def _check_compare_stats(rank: int, world: int) -> None:
    sizes = split_sizes(VOCAB, world, "uneven")
    a, b, tokens, _ = _global_inputs()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (*tokens.shape, 3), generator=g)
    # a tie for P's top-1 between the first and the last rank's columns: the lower id wins, as in one argmax
    a[0, 0, 0] = a[0, 0, -1] = a[0, 0].max() + 1
    layout = local_layout(sizes, rank)
    x, y = local_slice(a, sizes, rank).float(), local_slice(b, sizes, rank).float()
    with count_collectives() as calls:
        got = shardkl.compare_stats(x, y, ids, layout=layout, temperature=0.9)
    assert calls.total == 1, calls.calls
    forward, reverse = reference(a, b, None, 0.9), reference(b, a, None, 0.9)
    logp, logq = torch.log_softmax(a / 0.9, -1), torch.log_softmax(b / 0.9, -1)
    want = {
        "kl_pq": forward["exact_kl"], "kl_qp": reverse["exact_kl"], "entropy_p": forward["entropy"],
        "entropy_q": reverse["entropy"], "p_logprobs": logp.gather(-1, ids), "q_logprobs": logq.gather(-1, ids),
    }
    for name, value in want.items():
        torch.testing.assert_close(getattr(got, name).double(), value, rtol=3e-5, atol=3e-5, msg=name)
    assert got.top1_p[0, 0] == 0
    assert torch.equal(got.top1_p, a.argmax(-1)) and torch.equal(got.top1_q, b.argmax(-1))
    # the same from each rank's rows of two output layers (the logits never exist)
    hidden = torch.randn(2, 5, 8, generator=g)
    w_p, w_q = torch.randn(VOCAB, 8, generator=g), torch.randn(VOCAB, 8, generator=g)
    p = shardkl.LinearLogits(hidden, local_slice(w_p.T, sizes, rank).T)
    q = shardkl.LinearLogits(hidden * 0.5, local_slice(w_q.T, sizes, rank).T)
    got = shardkl.compare_stats(p, q, ids[..., 0], layout=layout)
    a, b = hidden.double() @ w_p.double().T, (hidden * 0.5).double() @ w_q.double().T
    torch.testing.assert_close(got.kl_qp.double(), reference(b, a)["exact_kl"], rtol=3e-5, atol=3e-5)
    torch.testing.assert_close(got.p_logprobs.double(), reference(a, b, ids[..., 0])["p_logprobs"], rtol=3e-5,
                               atol=3e-5)
    assert torch.equal(got.top1_q, b.argmax(-1))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_compare_stats_matches_reference_in_one_collective(world: int) -> None:
    run_ranks(_check_compare_stats, world)
