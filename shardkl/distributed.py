"""Distributed plumbing: every collective shardkl issues lives in this file.

The engine needs one collective per forward call: an all-gather of a few floats per token per rank (the
stats of ``shardkl._stats``) plus a few metadata floats per rank (its vocabulary slice, token-id range, what it
was asked). Each rank then merges the gathered stats in rank order, so every rank computes bit-identical
results. Every collective waits at most a timeout and raises :class:`CollectiveError` naming the rank.

:mod:`shardkl.testing` counts the collectives (and bytes) issued through ``torch.distributed``; tests and the
benchmark use it to show one collective per forward and none per backward.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from shardkl.options import default_timeout_s

ProcessGroup = Any  # torch.distributed.ProcessGroup; typed loosely so the module imports without a backend


def is_initialized() -> bool:
    """Whether ``torch.distributed`` is available and its default process group exists."""
    return dist.is_available() and dist.is_initialized()


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _wait(start: Any, rank: int, world: int, what: str, operation: str, timeout_s: float | None) -> None:
    """Start a collective (``start()`` returns its work handle) and wait for it within the timeout."""
    timeout = default_timeout_s() if timeout_s is None else timeout_s
    started = time.monotonic()
    try:
        start().wait(timeout=timedelta(seconds=timeout))
    except Exception as exc:  # backends raise RuntimeError subclasses (DistBackendError, DistNetworkError, ...)
        raise CollectiveError(
            f"shardkl: {operation} of {what} failed on rank {rank} of {world} after "
            f"{time.monotonic() - started:.1f} s (timeout {timeout:g} s): {_first_line(exc)}. Another rank of "
            "the group died, stopped calling shardkl, or passed a different number of tokens"
        ) from exc


def all_gather_flat(
    local: Tensor, group: ProcessGroup | None, *, what: str = "tensor", timeout_s: float | None = None
) -> Tensor:
    """All-gather a 1-D tensor of the same length from every rank; returns ``[world_size, length]``.

    Raises:
        CollectiveError: the collective failed (a peer died) or did not finish within ``timeout_s`` (default:
            :func:`shardkl.options.default_timeout_s`); the message names this rank and the operation.
    """
    rank, world = rank_and_size(group)
    if world == 1:
        return local.unsqueeze(0)
    out = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    local = local.contiguous()
    _wait(lambda: gather(out, local, group=group, async_op=True), rank, world, what, "all-gather", timeout_s)
    return out.view(world, local.numel())


def all_reduce_sum(
    x: Tensor, group: ProcessGroup | None, *, what: str = "tensor", timeout_s: float | None = None
) -> Tensor:
    """Sum ``x`` over the ranks of ``group``; returns a new tensor (``x`` itself for one rank).

    Raises:
        CollectiveError: as :func:`all_gather_flat`.
    """
    rank, world = rank_and_size(group)
    if world == 1:
        return x
    out = x.contiguous().clone()
    _wait(lambda: dist.all_reduce(out, group=group, async_op=True), rank, world, what, "all-reduce", timeout_s)
    return out


def argmax_over_ranks(
    best: Tensor,
    best_id: Tensor,
    group: ProcessGroup | None,
    *,
    bounds: tuple[int, int] | None = None,
    timeout_s: float | None = None,
) -> Tensor:
    """Global argmax from each rank's local ``(max value, global id)``: the first maximum in rank order.

    Args:
        best: float64 local maxima, any shape, the same on every rank.
        best_id: float64 global ids of the local maxima (exact below 2**53), shaped like ``best``.
        group: process group the vocabulary is split over.
        bounds: this rank's vocabulary slice ``(start, stop)``; if given, every rank checks that the slices tile
            the vocabulary in rank order and raises the same ``ValueError`` if not.
        timeout_s: how long the collective may wait (default: :func:`shardkl.options.default_timeout_s`).

    Returns:
        int64 ids shaped like ``best``, identical on every rank (a tie goes to the lowest rank, so to the lowest
        id, as in one full-vocabulary ``argmax``).
    """
    n = best.numel()
    meta = torch.tensor([-1.0, -1.0] if bounds is None else [float(bounds[0]), float(bounds[1])], dtype=torch.float64)
    # One all-gather of (local max, its global id) and the slice bounds; every rank then picks the same winner. It
    # travels on the device the group's backend needs (NCCL: this process's GPU), whatever the inputs' device.
    local = torch.cat([best.reshape(-1).double().cpu(), best_id.reshape(-1).double().cpu(), meta])
    gathered = all_gather_flat(local.to(_collective_device(group)), group, what="sampled tokens", timeout_s=timeout_s)
    gathered = gathered.cpu()
    if bounds is not None:
        check_tiling([(int(row[-2]), int(row[-1])) for row in gathered[:, -2:].tolist()])
    winner = gathered[:, :n].argmax(dim=0, keepdim=True)
    return gathered[:, n : 2 * n].gather(0, winner).reshape(best.shape).long()


def _collective_device(group: ProcessGroup | None) -> torch.device:
    """The device a collective of ``group`` runs on: this process's GPU for NCCL, else the CPU."""
    if group is not None and is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_tiling(slices: list[tuple[int, int]], hint: str = "") -> None:
    """Raise ``ValueError`` unless the ranks' ``[start, stop)`` slices tile ``[0, V)`` in rank order.

    Every rank calls it on the same gathered numbers, so every rank raises the same error (or none does).
    """
    expected = 0
    for rank, (start, stop) in enumerate(slices):
        if start != expected:
            described = ", ".join(f"rank {r}: [{a}, {b})" for r, (a, b) in enumerate(slices))
            raise ValueError(
                f"the ranks' vocabulary slices do not tile the vocabulary in rank order: rank {rank} starts at "
                f"{start}, expected {expected} ({described}){hint}"
            )
        expected = stop
