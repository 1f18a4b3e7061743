"""Timing, memory accounting, and the per-rank loop of the benchmark, which streams its rows to JSONL.

Timing: after one warm-up call per method (which also counts its collectives), the methods of a point run in
interleaved rounds (floor, baselines, shardkl, floor, ...), so a burst of load from another process slows every
method of a round alike instead of one method's whole sample; each method's median, 20th and 80th percentiles are
kept. A method faster than ``MIN_SAMPLE_S`` is repeated inside a sample, one slower than ``SLOW_CALL_S`` gets 3
rounds (the same counts on every rank), and the sample after one of its samples starts with an untimed call
(:func:`timed_rounds`). On several ranks a sample starts after a barrier (a one-float all-gather
through ``shardkl.distributed``).

Memory, measured in one more call after the timing: on CUDA the allocator's peak above what was held before the
call; on CPU the peak of the bytes held by tensors that PyTorch operators create during the call (a
``TorchDispatchMode`` sees every new storage and a finalizer sees it freed), which counts every tensor shardkl
allocates but not buffers that compiled code allocates outside PyTorch's operators.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import shardkl
import shardkl.testing
from shardkl.bench import methods as methods_
from shardkl.distributed import all_gather_flat, rank_and_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# a sample shorter than this repeats the call inside it
MIN_SAMPLE_S = 0.005
MAX_INNER = 100
# a method whose first call takes longer than this gets 3 timed rounds, not --reps (the slow baselines)
SLOW_CALL_S = 0.3

# peak memory bandwidth by device name (substring, bytes/s), most specific first
HBM_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),
    ("H200", 4.8e12),
    ("GH200", 4.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("B200", 8.0e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
)


def hbm_bandwidth(device_name: str) -> float | None:
    """The device's peak memory bandwidth in bytes/s, or ``None`` for a device not in :data:`HBM_BANDWIDTH`."""
    for key, bandwidth in HBM_BANDWIDTH:
        if key in device_name:
            return bandwidth
    return None


@dataclass(frozen=True)
class Point:
    """One shape of the sweep; ``full``: time forward+backward too (else forward only); ``divergences``: add the
    ``jsd`` and ``topk_kl`` rows (:mod:`shardkl.bench.methods`)."""

    tokens: int
    vocab: int
    dtype: str
    full: bool = True
    divergences: bool = False  # also time shardkl.jsd and shardkl.topk_kl (one rank)


@dataclass(frozen=True)
class Config:
    """What one run measures; picklable, handed to every rank."""

    points: tuple[Point, ...]
    impls: tuple[str, ...]
    reps: int
    device: str
    out_file: str
    huge_pages: bool
    label: str = ""
    fused_points: tuple[Any, ...] = ()  # shardkl.bench.fused.FusedPoint
    run: str = ""  # the run's id, written into every row
    divergence_impls: tuple[str, ...] = ("auto",)  # the jsd and topk_kl rows of the headline point


@dataclass
class Row:
    """One measured (point, method, pass)."""

    method: str
    passes: str  # "forward" or "forward+backward"
    world_size: int
    dtype: str
    tokens: int
    vocab: int
    device: str
    median_s: float
    p20_s: float
    p80_s: float
    min_s: float
    max_s: float
    reps: int
    inner: int
    floor_s: float  # the median time of the method named by floor, at the same point
    peak_extra_bytes: int | None
    input_bytes: int  # what the memory share refers to: both inputs, or the student's logits (reads="student")
    collectives: int
    bytes_sent_per_rank: int
    load_avg: float
    huge_pages: bool
    error: str = ""
    hidden: int = 0  # the hidden size, for the fused-linear rows (shardkl.bench.fused)
    floor: str = "floor"  # the method whose time the ratio refers to (student_floor for topk_kl)
    run: str = ""  # the id of the run that measured it (its folder's name)
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Median time over the floor's median at the same point (the headline number)."""
        return self.median_s / self.floor_s if self.floor_s > 0 else math.nan


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _huge_pages_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    # the active mode is the bracketed one: "always [madvise] never"
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()


def machine(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "processor": _cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "shardkl": shardkl.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "transparent_hugepage": _huge_pages_mode(),
    }
    if device == "cuda":
        name = torch.cuda.get_device_name()
        info["cuda"] = name
        info["hbm_bytes_per_s"] = hbm_bandwidth(name)
    return info


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages that PyTorch operators create while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # outputs that alias an input (views, in-place and out= ops) hold no new memory
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                if storage in self._seen:
                    continue
                self._seen.add(storage)
                nbytes = storage.nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, nbytes)
        return out


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes that ``fn()`` allocates beyond what was held before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with PeakTensorMemory() as tracker:
        fn()
    return tracker.peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(group: Any) -> None:
    if group is not None:
        all_gather_flat(torch.zeros(1), group, what="benchmark barrier")


def _agree_max(value: float, group: Any) -> float:
    """The largest ``value`` over the ranks (so that every rank repeats a call as often)."""
    if group is None:
        return value
    return float(all_gather_flat(torch.tensor([value], dtype=torch.float64), group, what="benchmark timing").max())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, (oom, MemoryError))


Key = tuple[str, str]


def timed_rounds(
    calls: dict[Key, Callable[[], Any]],
    keys: list[Key],
    rounds: int,
    reps: dict[Key, int],
    inner: dict[Key, int],
    slow: set[Key],
    *,
    ready: Callable[[], None],
    sync: Callable[[], None],
) -> dict[Key, list[float]]:
    """Seconds per call of each key's samples: ``rounds`` rounds in which the keys take turns (a key stops after its
    ``reps``), ``inner[key]`` calls per sample, ``ready()`` before each sample (a barrier on several ranks).

    A sample that follows a sample of a ``slow`` key (the baselines that allocate and free gigabytes) starts with one
    untimed call of its own: the operating system takes freed memory back for a while after such a call, and the
    next call paid for it (measured: the default call right after naive PyTorch took 70-83 ms against 47 ms).
    """
    samples: dict[Key, list[float]] = {key: [] for key in keys}
    for round_ in range(rounds):
        previous: Key | None = None
        for key in keys:
            if round_ >= reps[key]:
                continue
            if previous in slow:
                calls[key]()
            ready()
            start = time.perf_counter()
            for _ in range(inner[key]):
                calls[key]()
            sync()
            samples[key].append((time.perf_counter() - start) / inner[key])
            previous = key
    return samples


def measure_point(point: Point, config: Config, group: Any, info: dict[str, Any]) -> list[Row]:
    """Every method of ``point`` on this rank (all ranks call it together)."""
    rank, world = rank_and_size(group)
    device = torch.device(config.device)
    a, b = methods_.inputs(point.tokens, point.vocab, rank, world, DTYPES[point.dtype], device)
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    size = {"both": a.numel() * a.element_size() + b.numel() * b.element_size(),
            "student": a.numel() * a.element_size()}
    teacher = methods_.topk_teacher(b) if point.divergences and world == 1 and config.divergence_impls else None
    table = methods_.methods(list(config.impls), world, group, teacher=teacher,
                             divergence_impls=config.divergence_impls)
    floors = {m.floor for m in table.values()}
    if not point.full:
        table = {k: m for k, m in table.items() if k in floors or "[" in k}

    calls: dict[Key, Callable[[], Any]] = {}
    for name, method in table.items():

        def forward(fn: methods_.Fn = method.fn) -> Any:
            with torch.no_grad():
                return fn(a, b)

        def both(fn: methods_.Fn = method.fn) -> None:
            x.grad = y.grad = None
            fn(x, y).sum().backward()

        calls[(name, "forward")] = forward
        if point.full and not method.forward_only:
            calls[(name, "forward+backward")] = both

    counted: dict[Key, tuple[int, int]] = {}
    inner: dict[Key, int] = {}
    reps: dict[Key, int] = {}
    errors: dict[Key, str] = {}
    slow: set[Key] = set()
    for key, fn in calls.items():
        _barrier(group)
        start = time.perf_counter()
        try:
            with shardkl.testing.count_collectives() as counter:
                fn()  # the warm-up (and any first-use build)
            _sync(device)
        except Exception as exc:
            if world > 1 or not _is_out_of_memory(exc):
                raise
            errors[key] = "out of memory"
            continue
        first = _agree_max(time.perf_counter() - start, group)
        counted[key] = (counter.total, counter.bytes_sent)
        inner[key] = min(MAX_INNER, max(1, math.ceil(MIN_SAMPLE_S / max(first, 1e-9))))
        reps[key] = min(config.reps, 3) if first > SLOW_CALL_S else config.reps
        if first > SLOW_CALL_S:
            slow.add(key)
    live = [key for key in calls if key not in errors]

    def ready() -> None:
        _barrier(group)
        _sync(device)

    samples = timed_rounds(calls, live, config.reps, reps, inner, slow, ready=ready, sync=lambda: _sync(device))

    floor_s = {name: statistics.median(samples[(name, "forward")]) for name in floors}
    rows = []
    load = os.getloadavg()[0]
    for key in calls:
        name, passes = key
        method = table[name]
        input_bytes = size[method.reads]
        peak: int | None = None
        if key in errors:
            times = [math.nan]
        else:
            times = samples[key]
            _barrier(group)
            try:
                peak = peak_extra_bytes(calls[key], device)
            except Exception as exc:  # a compiler that refuses to run under the dispatch mode: no figure
                if world > 1:
                    raise
                warnings.warn(f"no memory figure for {name} {passes}: {type(exc).__name__}", RuntimeWarning,
                              stacklevel=2)
            if peak is not None and passes == "forward+backward":
                # the gradients themselves (of each input read: the same bytes) are outputs, not overhead
                peak = max(0, peak - input_bytes)
        collectives, sent = counted.get(key, (0, 0))
        rows.append(Row(
            method=name, passes=passes, world_size=world, dtype=point.dtype, tokens=point.tokens, vocab=point.vocab,
            device=config.device, median_s=statistics.median(times), p20_s=_percentile(times, 0.2),
            p80_s=_percentile(times, 0.8), min_s=min(times), max_s=max(times), reps=len(times),
            inner=inner.get(key, 0), floor_s=floor_s[method.floor], peak_extra_bytes=peak, input_bytes=input_bytes,
            collectives=collectives, bytes_sent_per_rank=sent, load_avg=load, huge_pages=config.huge_pages,
            error=errors.get(key, ""), floor=method.floor, run=config.run, machine=info,
        ))
    return rows


def _quiet() -> None:
    """Silence the known warnings of the measured code, so that stderr keeps only the progress bar."""
    # gloo's all_gather_into_tensor deprecation, repeated by every rank
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    # the baselines' differentiable collectives (torch.distributed.nn.functional, deprecated in recent torch)
    warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")


def run_rank(rank: int, world: int, port: int, config: Config) -> None:
    """One rank of a run: set up the group, measure every point, append rank 0's rows to the JSONL file.

    Runs in a process of its own (:func:`run_world`); with several ranks it ends that process (``os._exit``).
    """
    import torch.distributed as dist

    _quiet()
    if config.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    group = None
    if world > 1:
        store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=300))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=600))
        group = dist.group.WORLD
    try:
        info = machine(config.device)
        points: list[Any] = [*config.points, *config.fused_points]
        bar = None
        if rank == 0:
            import threading

            from tqdm import tqdm

            tqdm.set_lock(threading.RLock())  # one writer: no multiprocessing lock to release at exit (os._exit)
            bar = tqdm(total=len(points), desc=f"{config.label}world size {world}", unit="point", file=sys.stderr,
                       dynamic_ncols=True, leave=True)
        for point in points:
            linear = not isinstance(point, Point)
            if bar is not None:
                shape = f"{point.tokens}x{point.hidden}x{point.vocab} from hidden states" if linear else (
                    f"{point.tokens}x{point.vocab}")
                bar.set_postfix_str(f"{point.dtype} {shape}")
            if linear:
                from shardkl.bench.fused import measure_fused_point

                rows = measure_fused_point(point, config.reps, group, torch.device(config.device), info,
                                           config.huge_pages, config.run)
            else:
                rows = measure_point(point, config, group, info)
            if rank == 0:
                with open(config.out_file, "a") as f:
                    for row in rows:
                        f.write(json.dumps(asdict(row)) + "\n")
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        _barrier(group)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if world > 1:
        # Every row is on disk and the group is gone: skip the interpreter's teardown, which CI saw abort now and
        # then in spawned gloo ranks ("terminate called without an active exception") inside torch's own shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_world(world: int, config: Config) -> None:
    """Measure ``config`` on ``world`` ranks, each a fresh process (gloo on CPU); rows go to the JSONL file."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.spawn(run_rank, args=(world, port, config), nprocs=world, join=True)


def read_rows(path: str | Path) -> list[Row]:
    """The rows of a JSONL file written by :func:`run_rank`."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(Row(**json.loads(line)))
    return rows


__all__ = [
    "DTYPES", "HBM_BANDWIDTH", "Config", "PeakTensorMemory", "Point", "Row", "hbm_bandwidth", "machine",
    "measure_point", "peak_extra_bytes", "read_rows", "run_rank", "run_world",
]
