"""jsd and topk_kl on 1-3 gloo ranks with uneven vocabulary splits (and an empty shard) against float64 references;
collective counts and bytes; bad inputs raise the same error on every rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import shardkl
from shardkl import _sources
from shardkl._teacher_checks import NUM_TEACHER_META
from shardkl._validation import NUM_META
from shardkl.testing import count_collectives
from tests._distill_reference import bucket_reference, jsd_reference, teacher_topk
from tests._distributed import local_layout, local_slice, run_ranks, split_sizes

VOCAB = 37
SHAPE = (2, 3)
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*SHAPE, VOCAB, generator=g, dtype=torch.float64) * 2
    teacher = student + 0.8 * torch.randn(*SHAPE, VOCAB, generator=g, dtype=torch.float64)
    weights = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
    return student, teacher, weights


def _ids_in(lo: int, hi: int, k: int, seed: int) -> torch.Tensor:
    """Distinct ids per token, all in ``[lo, hi)``."""
    scores = torch.rand(*SHAPE, hi - lo, generator=torch.Generator().manual_seed(seed))
    return scores.argsort(-1)[..., :k] + lo


def _check_jsd(rank: int, world: int, sizes: list[int]) -> None:
    student, teacher, w = _inputs()
    layout = local_layout(sizes, rank)
    # float32: gradients up to 0.25 here, rounded at ~1e-7 relative to them
    for dtype, tol, gtol in ((torch.float64, 1e-12, 1e-10), (torch.float32, 2e-5, 1e-4)):
        for beta in BETAS:
            for temperature in (1.0, 0.8):
                p, q = teacher.to(dtype), student.to(dtype)
                pr, qr = p.double().clone().requires_grad_(), q.double().clone().requires_grad_()
                want = jsd_reference(pr, qr, beta, temperature)
                (want * w).sum().backward()
                x = local_slice(p, sizes, rank).clone().requires_grad_()
                y = local_slice(q, sizes, rank).clone().requires_grad_()
                got = shardkl.jsd(x, y, beta=beta, layout=layout, temperature=temperature)
                msg = f"beta={beta} T={temperature} {dtype}"
                torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol, msg=msg)
                (got.double() * w).sum().backward()
                for mine, full in ((x.grad, pr.grad), (y.grad, qr.grad)):
                    torch.testing.assert_close(
                        mine.double(), local_slice(full, sizes, rank), rtol=gtol, atol=gtol * 1e-2, msg=msg
                    )
    # the log-sum-exps and sums need no offsets: a plain group works for any split
    if world > 1:
        got = shardkl.jsd(local_slice(teacher, sizes, rank), local_slice(student, sizes, rank), group=dist.group.WORLD)
        torch.testing.assert_close(got, jsd_reference(teacher, student, 0.5))


def _check_topk(rank: int, world: int, sizes: list[int]) -> None:
    student, teacher, w = _inputs(seed=1)
    layout = local_layout(sizes, rank)
    starts = [sum(sizes[:r]) for r in range(world)]
    holding = [r for r in range(world) if sizes[r] > 0]
    cases = {f"top-{k}": teacher_topk(teacher, k) for k in (1, 2, 5, VOCAB - 1)}
    lt = torch.log_softmax(teacher, -1)
    # ids that all live on one rank: the first and the last rank that holds any
    for r in (holding[0], holding[-1]):
        ids = _ids_in(starts[r], starts[r] + sizes[r], min(3, sizes[r]), seed=r)
        cases[f"ids on rank {r}"] = (ids, lt.gather(-1, ids))
    for name, (ids, logprobs) in cases.items():
        for direction in ("forward", "reverse"):
            for temperature in (1.0, 0.7):
                sr = student.clone().requires_grad_()
                want = bucket_reference(sr, ids, logprobs, direction, temperature)
                (want * w).sum().backward()
                x = local_slice(student, sizes, rank).clone().requires_grad_()
                got = shardkl.topk_kl(
                    x, ids, logprobs, direction=direction, layout=layout, temperature=temperature
                )
                msg = f"{name} {direction} T={temperature}"
                torch.testing.assert_close(got, want.detach(), rtol=1e-11, atol=1e-14, msg=msg)
                assert (got >= 0).all(), msg
                (got * w).sum().backward()
                torch.testing.assert_close(
                    x.grad, local_slice(sr.grad, sizes, rank), rtol=1e-9, atol=1e-13, msg=msg
                )
    # K = V: the exact KL, values and gradients
    ids, logprobs = teacher_topk(teacher, VOCAB)
    for direction in ("forward", "reverse"):
        x = local_slice(student, sizes, rank).clone().requires_grad_()
        got = shardkl.topk_kl(x, ids, logprobs, direction=direction, layout=layout)
        y = local_slice(student, sizes, rank).clone().requires_grad_()
        t = local_slice(teacher, sizes, rank)
        pair = (t, y) if direction == "forward" else (y, t)
        want = shardkl.exact_kl(*pair, layout=layout)
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-14)
        (got * w).sum().backward()
        (want * w).sum().backward()
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-13)


def _check_values_and_gradients(rank: int, world: int) -> None:
    _sources.TILE_ELEMENTS, _sources.MAX_TILE_COLS = 24, 5  # several tiles per shard
    sizes = split_sizes(VOCAB, world, "uneven")
    if world == 3:
        assert sizes[0] == 0  # an empty shard
    _check_jsd(rank, world, sizes)
    _check_topk(rank, world, sizes)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_values_and_gradients_match_float64_references(world: int) -> None:
    run_ranks(_check_values_and_gradients, world)


def _check_collectives(rank: int, world: int) -> None:
    sizes = split_sizes(VOCAB, world, "uneven")
    student, teacher, _ = _inputs(seed=2)
    layout = local_layout(sizes, rank)
    rows = student[..., 0].numel()
    x = local_slice(student, sizes, rank).float().requires_grad_()
    y = local_slice(teacher, sizes, rank).float().requires_grad_()
    for beta in BETAS:
        with count_collectives() as fwd:
            value = shardkl.jsd(y, x, beta=beta, layout=layout)
        with count_collectives() as bwd:
            value.sum().backward()
        ends = beta in (0.0, 1.0)
        assert fwd.total == (1 if ends else 2), (beta, fwd.calls)
        assert bwd.total == 0, (beta, bwd.calls)
        if not ends:
            assert fwd.calls == {"all_gather_into_tensor": 1, "all_reduce": 1} or fwd.calls == {
                "all_gather_single": 1, "all_reduce": 1
            }, fwd.calls
            # round 1: two log-sum-exps per token and the metadata; round 2: two partial sums per token; float64
            assert fwd.bytes_sent == 8 * (2 * rows + NUM_META) + 8 * 2 * rows
    for k in (1, 4, VOCAB):
        ids, logprobs = teacher_topk(teacher, k)
        with count_collectives() as fwd:
            value = shardkl.topk_kl(x, ids, logprobs.float(), layout=layout, direction="reverse")
        with count_collectives() as bwd:
            value.sum().backward()
        assert fwd.total == 1 and bwd.total == 0, (fwd.calls, bwd.calls)
        # K + 2 floats per token (independent of V): the lse, the tail's lse, the K logits; then the metadata
        assert fwd.bytes_sent == 8 * ((k + 2) * rows + NUM_TEACHER_META + NUM_META), k
    # the bytes do not depend on the vocabulary
    ids, logprobs = teacher_topk(teacher, 4)
    wide = local_layout([2 * s for s in sizes], rank)
    with count_collectives() as narrow_count:
        shardkl.topk_kl(x.detach(), ids, logprobs, layout=layout)
    with count_collectives() as wide_count:
        shardkl.topk_kl(torch.cat([x, x], -1).detach(), ids, logprobs, layout=wide)
    assert wide_count.bytes_sent == narrow_count.bytes_sent


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_per_call(world: int) -> None:
    run_ranks(_check_collectives, world)


def _check_bad_inputs(rank: int, world: int) -> None:
    sizes = split_sizes(VOCAB, world, "uneven")
    student, teacher, _ = _inputs(seed=3)
    layout = local_layout(sizes, rank)
    x = local_slice(student, sizes, rank)
    ids, logprobs = teacher_topk(teacher, 4)

    def raises(match: str, ids_: torch.Tensor, logprobs_: torch.Tensor, **kwargs) -> None:
        with pytest.raises(ValueError, match=match):
            shardkl.topk_kl(x, ids_, logprobs_, **{"layout": layout, **kwargs})

    # V is known only after the gather: every rank raises
    beyond = ids.clone()
    beyond[1, 0, 3] = VOCAB
    raises(rf"teacher_ids must be ids in \[0, {VOCAB}\).*got min \d+ and max {VOCAB}", beyond, logprobs)
    # a bad value in one rank's copy only: the same error on every rank, naming that rank
    bad_ids = ids.clone()
    if rank == world - 1:
        bad_ids[0, 1, 2] = bad_ids[0, 1, 0]
    raises(rf"distinct.*1 token row\(s\) on rank {world - 1}", bad_ids, logprobs)
    bad_logprobs = logprobs.clone()
    if rank == 0:
        bad_logprobs[1, 2, 0] = 0.5
    raises(r"log-probabilities \(<= 0\).* on rank 0", ids, bad_logprobs)
    over = logprobs.clone()
    if rank == world - 1:
        over[0, 0] = torch.log(torch.full((4,), 0.3, dtype=torch.float64))
    raises(rf"sum to at most 1.* on rank {world - 1}", ids, over)
    # the ranks disagree on the ids (each copy valid on its own)
    other = ids.clone()
    if rank == 0:
        other[0, 0, 0] = (set(range(VOCAB)) - set(ids[0, 0].tolist())).pop()
    raises("ranks passed different teacher_ids", other, logprobs)
    # a plain group assumes Megatron's equal split, which this uneven split is not: the ids' offsets would be wrong
    raises("do not tile the vocabulary.*equal split", ids, logprobs, layout=None, group=dist.group.WORLD)
    # mask values are checked in the same gather
    with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
        shardkl.jsd(x, local_slice(teacher, sizes, rank), layout=layout, mask=torch.full(SHAPE, 0.5))
    # after all these errors the group is still in step: a good call works
    got = shardkl.topk_kl(x, ids, logprobs, layout=layout)
    torch.testing.assert_close(got, bucket_reference(student, ids, logprobs, "forward"))


@pytest.mark.parametrize("world", [2, 3])
def test_bad_inputs_raise_the_same_error_on_every_rank(world: int) -> None:
    run_ranks(_check_bad_inputs, world)
