"""Cross-rank mismatches raise the same clear error on every rank; dead or silent ranks raise, never hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import shardkl
from tests._distributed import run_ranks

VOCAB = 101


def _cuts(world: int) -> list[int]:
    return [0, 40, VOCAB] if world == 2 else [0, 30, 30, VOCAB]


def _slice(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    cuts = _cuts(world)
    return x[..., cuts[rank] : cuts[rank + 1]]


def _layout(rank: int, world: int, **kwargs) -> shardkl.VocabLayout:
    cuts = _cuts(world)
    return shardkl.VocabLayout(cuts[rank], cuts[rank + 1], group=dist.group.WORLD, **kwargs)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 6, VOCAB, generator=g)
    return a, a + 0.1 * torch.randn(2, 6, VOCAB, generator=g), torch.randint(0, VOCAB, (2, 6), generator=g)


def _expect_same_error(message: str, call) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def _mismatches(rank: int, world: int) -> None:
    group = dist.group.WORLD
    a, b, tokens = _inputs()
    x, y = _slice(a, rank, world), _slice(b, rank, world)

    # same number of tokens, different leading shape
    shaped = x if rank == 0 else x.reshape(3, 4, -1)
    _expect_same_error("different leading shapes", lambda: shardkl.exact_kl(shaped, shaped, group=group))
    # different dtypes
    typed = x if rank == 0 else x.to(torch.bfloat16)
    _expect_same_error("ranks passed logits of different dtypes", lambda: shardkl.entropy(typed, group=group))
    # a declared vocabulary size that the shards do not add up to
    _expect_same_error(
        rf"hold {VOCAB} ids, but the layout declares vocab_size={VOCAB + 1}",
        lambda: shardkl.exact_kl(x, y, layout=_layout(rank, world, vocab_size=VOCAB + 1)),
    )
    # a layout whose slices leave a gap
    gap = shardkl.VocabLayout(_cuts(world)[rank] + rank, _cuts(world)[rank + 1] + rank, group=group)
    _expect_same_error("do not tile the vocabulary", lambda: shardkl.exact_kl(x, y, layout=gap))
    # a layout on some ranks only
    mixed = {"layout": _layout(rank, world)} if rank == 0 else {"group": group}
    _expect_same_error("some ranks passed layout=", lambda: shardkl.exact_kl(x, y, **mixed))
    # a token id out of range on one rank only
    bad_tokens = tokens if rank == 0 else tokens.clone().fill_(VOCAB)
    _expect_same_error(
        rf"\[0, {VOCAB}\)", lambda: shardkl.sampled_kl(x, y, bad_tokens, layout=_layout(rank, world))
    )
    # the same ids in another order on one rank: log-probs would mix tokens (-inf, NaN k3), caught in the gather
    shuffled = tokens if rank == 0 else tokens.flip(-1)
    _expect_same_error(
        "ranks passed different tokens", lambda: shardkl.kl_stats(x, y, shuffled, layout=_layout(rank, world))
    )
    # a mask with a 2 on one rank only
    mask = torch.ones(tokens.shape) if rank == 0 else torch.full(tokens.shape, 2.0)
    _expect_same_error("mask must be bool or hold only 0 and 1", lambda: shardkl.exact_kl(x, y, group=group, mask=mask))
    # NaN in one rank's slice
    poisoned = y.clone()
    if rank == world - 1:
        poisoned[1, 2, 0] = float("nan")
    _expect_same_error(
        rf"q_logits holds NaN in 1 token row\(s\) of rank {world - 1}'s vocabulary slice \(first at flat token "
        "index 8\\)",
        lambda: shardkl.exact_kl(x, poisoned, group=group),
    )
    # different temperatures
    _expect_same_error(
        "different temperatures", lambda: shardkl.exact_kl(x, y, group=group, temperature=1.0 + rank)
    )
    # every check above completed its collective: the group still works and gives the right answer
    got = shardkl.exact_kl(x, y, layout=_layout(rank, world, vocab_size=VOCAB))
    torch.testing.assert_close(got, shardkl.exact_kl(a, b))
    # validate=False skips the cross-rank checks (the caller vouches for them), but not token or NaN checks
    unchecked = shardkl.Options(validate=False)
    torch.testing.assert_close(shardkl.exact_kl(x, y, group=group, options=unchecked), got)
    _expect_same_error("NaN", lambda: shardkl.exact_kl(x, poisoned, group=group, options=unchecked))


@pytest.mark.parametrize("world", [2, 3])
def test_mismatches_raise_the_same_error_on_every_rank(world: int) -> None:
    run_ranks(_mismatches, world)


def _token_count_mismatch(rank: int, world: int) -> None:
    a, b, _ = _inputs()
    x = _slice(a, rank, world)[: 1 + rank]  # a different number of sequences on each rank
    with pytest.raises(shardkl.CollectiveError, match="Detected mismatch between collectives") as info:
        shardkl.exact_kl(x, x, group=dist.group.WORLD)
    assert f"rank {rank} of {world}" in str(info.value)


def test_token_count_mismatch_is_a_clear_error_with_torch_debug_detail() -> None:
    # Ranks passing different numbers of tokens cannot be told apart inside one collective (its size differs);
    # TORCH_DISTRIBUTED_DEBUG=DETAIL makes torch check collective shapes first, and shardkl names the op.
    run_ranks(_token_count_mismatch, 2, env={"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}, barrier=False)


def _silent_peer(rank: int, world: int) -> None:
    a, b, _ = _inputs()
    if rank == 1:
        time.sleep(6)  # never calls shardkl
        return
    shardkl.set_collective_timeout(2)
    started = time.monotonic()
    with pytest.raises(shardkl.CollectiveError) as info:
        shardkl.exact_kl(_slice(a, rank, world), _slice(b, rank, world), group=dist.group.WORLD)
    elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    message = str(info.value)
    assert "all-gather of per-token statistics failed on rank 0 of 2" in message and "timeout 2 s" in message


def test_a_rank_that_never_calls_gives_a_timeout_error() -> None:
    run_ranks(_silent_peer, 2, barrier=False)


def _dead_peer(rank: int, world: int) -> None:
    a, b, _ = _inputs()
    if rank == 1:
        os._exit(0)  # dies without a word
    shardkl.set_collective_timeout(30)
    started = time.monotonic()
    with pytest.raises(shardkl.CollectiveError, match="failed on rank 0 of 2"):
        shardkl.exact_kl(_slice(a, rank, world), _slice(b, rank, world), group=dist.group.WORLD)
    assert time.monotonic() - started < 30


def test_a_dead_rank_gives_an_error_not_a_hang() -> None:
    run_ranks(_dead_peer, 2, barrier=False)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out += children.get(pid, [])
        todo += children.get(pid, [])
    return out


def _rank_pid(root: int, rank: int) -> int | None:
    for pid in _descendants(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


@pytest.mark.slow  # a launcher under torchrun
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the rank's process")
def test_killing_one_rank_of_a_torchrun_job_ends_the_job() -> None:
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "launch/exact_kl.py", "--vocab-size", "32000", "--seq-len", "256", "--batch-size", "2",
           "--samples", "8", "--timeout-s", "30"]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        victim = _rank_pid(proc.pid, 1)
        time.sleep(0.2)
    assert victim is not None, "rank 1 never started"
    time.sleep(2)  # let it get into the job
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 30 + 10, "the surviving rank outlived the collective timeout"
    assert "rank      : 1" in output and "Signal 9" in output, output[-2000:]
