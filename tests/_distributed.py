"""Spawn gloo process groups on CPU for tests: free loopback port, TCPStore, one process per rank.

Ranks start from a fork server that has imported torch and shardkl once: a few hundredths of a second per rank
instead of seconds for a fresh interpreter, which is most of what a distributed test costs. Each rank gets the
caller's environment as it is at the call. A test whose ``env`` holds settings that torch reads when it is imported
(``TORCH_DISTRIBUTED_DEBUG``) gets freshly spawned interpreters instead.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardkl.layout import VocabLayout, shard_bounds

_FORK_SERVER = "forkserver" in multiprocessing.get_all_start_methods()
if _FORK_SERVER:
    # imported once by the fork server, before it forks any rank
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "shardkl", "tests._distributed"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int,
    world: int,
    port: int,
    fn: Callable[..., None],
    args: tuple[Any, ...],
    env: dict[str, str],
    barrier: bool,
    caller_env: dict[str, str] | None = None,
) -> None:
    if caller_env is not None:
        # a forked rank has the fork server's environment: make it the caller's, as a spawned rank's would be
        os.environ.clear()
        os.environ.update(caller_env)
    os.environ.update(env)
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
        if barrier:
            # leave together: gloo can abort ("terminate called without an active exception") a rank that tears
            # down while a peer still talks to it
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # The rank's work and checks are done and its group is gone. Skip the interpreter's teardown: CI saw it abort
    # now and then in spawned ranks ("terminate called without an active exception", SIGABRT) after everything
    # had passed, inside torch's own shutdown. An exception above still reaches the parent as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(
    fn: Callable[..., None], world: int, *args: Any, env: dict[str, str] | None = None, barrier: bool = True
) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; an exception on any rank fails the caller.

    ``fn`` must be a module-level function (it is pickled by reference into the spawned processes); ``env`` is
    set in each rank before its process group is created. ``barrier=False`` for tests that break the group.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})  # some settings (TORCH_DISTRIBUTED_DEBUG) are read when torch is imported
    try:
        if _FORK_SERVER and not env:
            mp.start_processes(_entry, args=(world, free_port(), fn, args, {}, barrier, dict(os.environ)),
                               nprocs=world, join=True, start_method="forkserver")
        else:
            mp.spawn(_entry, args=(world, free_port(), fn, args, env or {}, barrier), nprocs=world, join=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def split_sizes(vocab: int, world: int, pattern: str = "uneven") -> list[int]:
    """Per-rank vocabulary sizes: ``"even"`` (balanced) or ``"uneven"`` (unequal, with an empty shard for
    world sizes >= 3)."""
    if pattern == "even" or world == 1:
        return [hi - lo for lo, hi in (shard_bounds(vocab, world, r, "balanced") for r in range(world))]
    weights = {2: [3, 2], 3: [0, 1, 1], 4: [2, 0, 3, 3]}[world]
    sizes = [vocab * w // sum(weights) for w in weights]
    sizes[-1] += vocab - sum(sizes)
    return sizes


def local_slice(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[..., start : start + sizes[rank]]


def local_layout(sizes: list[int], rank: int, group: Any = None, **kwargs: Any) -> VocabLayout:
    """This rank's :class:`shardkl.VocabLayout` for per-rank ``sizes`` (the group defaults to WORLD if initialised)."""
    if group is None and dist.is_initialized() and len(sizes) > 1:
        group = dist.group.WORLD
    start = sum(sizes[:rank])
    return VocabLayout(start, start + sizes[rank], group=group, **kwargs)
