"""What every launcher does around the library: threads per rank, the process group, its device, the JSON output.

Under torchrun, ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` come from the environment; without them
the launcher is one process and no process group is created. The thread count is set here, per rank, because
torchrun's default (``OMP_NUM_THREADS=1`` whenever it starts more than one rank and the variable is unset) leaves
all but one core of a rank idle on a machine with more cores than ranks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from shardkl.distributed import ProcessGroup

Backend = Literal["auto", "gloo", "nccl"]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_rank(requested: int = 0) -> int:
    """``requested`` if > 0, else the usable CPUs divided by the ranks on this machine (``LOCAL_WORLD_SIZE``),
    at least 1."""
    if requested > 0:
        return requested
    return max(1, usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


@dataclass(frozen=True)
class Runtime:
    """This process's place in the job.

    Attributes:
        rank: global rank (0 without a process group).
        world_size: number of ranks (1 without a process group).
        group: the process group the vocabulary is split over, or ``None`` for one process.
        device: where the logits live: CPU with gloo, this rank's GPU with nccl.
        backend: ``"gloo"``, ``"nccl"`` or ``"none"``.
        threads: torch's intra-op threads on this rank.
    """

    rank: int
    world_size: int
    group: ProcessGroup | None
    device: torch.device
    backend: str
    threads: int


def backend_problem(backend: str) -> str | None:
    """Why ``backend`` cannot run this process here, in one line, or ``None``: nccl needs one GPU per rank on this
    machine (one, for a single process). Launchers check it before any process group exists."""
    if backend != "nccl":
        return None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < local_world:
        return (f"backend nccl needs one GPU per rank on this machine: {local_world} rank(s), {gpus} CUDA device(s); "
                "use gloo (or auto)")
    return None


def start(backend: Backend = "auto", *, timeout_s: float = 120.0, threads: int = 0) -> Runtime:
    """Set the thread count and, under torchrun with more than one rank, create the process group.

    Args:
        backend: ``"auto"`` is nccl when every local rank has a GPU, else gloo (nccl needs one GPU per local
            rank). A single process runs on the GPU if there is one, unless ``backend`` is ``"gloo"``.
        timeout_s: timeout of the process group's collectives.
        threads: see :func:`threads_per_rank`.
    """
    count = threads_per_rank(threads)
    torch.set_num_threads(count)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        gpu = torch.cuda.is_available() and backend != "gloo"
        return Runtime(0, 1, None, torch.device("cuda" if gpu else "cpu"), "none", count)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Runtime(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, device, backend, count)


def finish(runtime: Runtime, *, together: bool = True) -> None:
    """Destroy the process group (no-op for one process), after a barrier unless ``together=False`` (a peer failed).
    """
    if runtime.group is None:
        return
    if together:
        # Leave together: a rank that tears down gloo while a peer still talks to it can abort at exit ("terminate
        # called without an active exception").
        dist.barrier()
    dist.destroy_process_group()


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating the folder; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out


__all__ = ["Backend", "Runtime", "backend_problem", "finish", "start", "threads_per_rank", "usable_cpus", "write_json"]
