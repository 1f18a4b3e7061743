"""Distributed plumbing: every collective shardkl issues lives in this file.

The engine needs one collective per forward call: an all-gather of a few floats per token per rank (the
stats of ``shardkl._stats``) plus a few metadata floats per rank (local vocabulary size, the vocabulary
offset the rank assumed, token-id range). Each rank then merges the gathered stats in rank order, so every
rank computes bit-identical results.

``CollectiveCounter`` counts the collectives (and bytes) issued through ``torch.distributed`` while it is
active; tests and the benchmark use it to show one collective per forward and none per backward.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = Any  # torch.distributed.ProcessGroup; typed loosely so the module imports without a backend


def rank_and_size(group: ProcessGroup | None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group``; ``(0, 1)`` for ``group=None``."""
    if group is None:
        return 0, 1
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "group was given but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first, or pass group=None for full-vocabulary tensors"
        )
    return dist.get_rank(group), dist.get_world_size(group)


class CollectiveError(RuntimeError):
    """A collective of shardkl failed or did not complete within the timeout."""


_timeout_s = float(os.environ.get("SHARDKL_TIMEOUT_S", "120"))


def set_collective_timeout(seconds: float) -> None:
    """Set how long a shardkl collective may wait for the other ranks (default 120 s, or ``SHARDKL_TIMEOUT_S``).

    Past it the waiting ranks raise :class:`CollectiveError` instead of hanging.
    """
    global _timeout_s
    if not seconds > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {seconds}")
    _timeout_s = float(seconds)


def collective_timeout() -> float:
    """The current collective timeout in seconds."""
    return _timeout_s


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def all_gather_flat(local: Tensor, group: ProcessGroup | None, *, what: str = "tensor") -> Tensor:
    """All-gather a 1-D tensor of the same length from every rank; returns ``[world_size, length]``.

    Raises:
        CollectiveError: the collective failed (a peer died) or did not finish within
            :func:`collective_timeout`; the message names this rank and the operation.
    """
    rank, world = rank_and_size(group)
    if world == 1:
        return local.unsqueeze(0)
    out = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    started = time.monotonic()
    try:
        # The one collective of a forward call: per-token stats and per-rank metadata of every shard.
        work = gather(out, local.contiguous(), group=group, async_op=True)
        work.wait(timeout=timedelta(seconds=_timeout_s))
    except Exception as exc:  # backends raise RuntimeError subclasses (DistBackendError, DistNetworkError, ...)
        raise CollectiveError(
            f"shardkl: all-gather of {what} failed on rank {rank} of {world} after "
            f"{time.monotonic() - started:.1f} s (timeout {_timeout_s:g} s): {_first_line(exc)}. Another rank of "
            "the group died, stopped calling shardkl, or passed a different number of tokens"
        ) from exc
    return out.view(world, local.numel())


def argmax_over_ranks(best: Tensor, best_id: Tensor, group: ProcessGroup | None) -> Tensor:
    """Global argmax from each rank's local ``(max value, global id)``: the first maximum in rank order.

    Args:
        best: float64 local maxima, any shape, the same on every rank.
        best_id: float64 global ids of the local maxima (exact below 2**53), shaped like ``best``.
        group: process group the vocabulary is split over.

    Returns:
        int64 ids shaped like ``best``, identical on every rank (a tie goes to the lowest rank, so to the lowest
        id, as in one full-vocabulary ``argmax``).
    """
    n = best.numel()
    # One all-gather of (local max, its global id); every rank then picks the same winner.
    gathered = all_gather_flat(torch.cat([best.reshape(-1), best_id.reshape(-1)]), group, what="sampled tokens")
    winner = gathered[:, :n].argmax(dim=0, keepdim=True)
    return gathered[:, n:].gather(0, winner).reshape(best.shape).long()


# Vocabulary offsets learned from earlier calls, keyed by group. Only a hint: every call re-checks the
# offsets against the gathered local sizes and repeats the token part with the right ones on a miss.
_SIZES_BY_GROUP: dict[int, tuple[int, ...]] = {}
_SIZES_LOCK = threading.Lock()


def vocab_start_hint(group: ProcessGroup | None, local_size: int) -> int:
    """The first global vocabulary id this rank is assumed to hold.

    Uses the split seen on an earlier call with the same group, else assumes equal shards
    (``rank * local_size``, the Megatron layout). The guess is verified after the all-gather.
    """
    rank, world = rank_and_size(group)
    if world == 1:
        return 0
    with _SIZES_LOCK:
        sizes = _SIZES_BY_GROUP.get(id(group))
    if sizes is not None and len(sizes) == world and sizes[rank] == local_size:
        return sum(sizes[:rank])
    return rank * local_size


def remember_vocab_sizes(group: ProcessGroup | None, sizes: tuple[int, ...]) -> None:
    """Record the per-rank vocabulary sizes seen in a gather, for the next call's offset hint."""
    if group is not None:
        with _SIZES_LOCK:
            _SIZES_BY_GROUP[id(group)] = sizes


_COUNTED = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "all_reduce",
    "reduce_scatter_tensor",
    "broadcast",
    "all_to_all_single",
    "reduce",
    "gather",
    "scatter",
    "barrier",
)


@dataclass
class CollectiveCounter:
    """Counts calls of ``torch.distributed`` collectives and the bytes each rank sends through them."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def reset(self) -> None:
        self.calls.clear()
        self.bytes_sent = 0


def _tensor_bytes(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> int:
    tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, Tensor)]
    if not tensors:
        return 0
    # the input is the last positional tensor for gathers (output first), the first otherwise
    t = tensors[-1] if name.startswith("all_gather") else tensors[0]
    return t.numel() * t.element_size()


@contextmanager
def count_collectives() -> Iterator[CollectiveCounter]:
    """Context manager that counts ``torch.distributed`` collectives issued inside it (this process only).

    Example:
        >>> with count_collectives() as c:
        ...     shardkl.exact_kl(p, q, group=g)
        >>> c.total, c.bytes_sent
    """
    counter = CollectiveCounter()
    originals: dict[str, Any] = {}
    depth = threading.local()

    def wrap(name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            # one user-level call counts once, even where torch implements it through another collective
            outer = getattr(depth, "value", 0) == 0
            if outer:
                counter.calls[name] = counter.calls.get(name, 0) + 1
                counter.bytes_sent += _tensor_bytes(args, kwargs, name)
            depth.value = getattr(depth, "value", 0) + 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth.value -= 1

        return counted

    for name in _COUNTED:
        fn = getattr(dist, name, None)
        if fn is not None:
            originals[name] = fn
            setattr(dist, name, wrap(name, fn))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
