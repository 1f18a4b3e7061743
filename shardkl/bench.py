"""Benchmark suite: shardkl against the baselines, side by side in one run.

    python -m shardkl.bench                  # default sweep, a few minutes on 2 CPU cores
    python -m shardkl.bench --quick          # a tiny sweep (seconds), for smoke tests

Methods, each timed for the forward and for forward+backward, with peak extra memory:

- ``floor``: read both inputs once (``a.sum() + b.sum()``), the memory-bandwidth floor.
- ``eager_reference``: ``log_softmax`` x2 + ``kl_div``, today's practice (one rank; the full vocabulary).
- ``shardkl[<impl>]``: this library, each kernel implementation.
- ``allgather_baseline`` (world size > 1): all-gather the logits, then the eager reference.
- ``megatron_baseline`` (world size > 1): separate all-reduces for the max, the sums of exponentials and the
  weighted sum, then the textbook one-pass KL (Megatron-core's cross-entropy pattern).

Results: a table on stdout, JSON lines (median, min and max of ``--reps`` repetitions, machine and versions)
and a PNG plot (time and memory against vocabulary size, log-log) next to them. Collectives and bytes per
forward are counted with :func:`shardkl.count_collectives`. Memory on CPU is the peak of the torch allocations
made during the call (the profiler's allocation events, summed in time order); on CUDA it is
``max_memory_allocated`` above the memory held before the call.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import shardkl

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Row:
    """One measured point."""

    method: str
    world_size: int
    dtype: str
    tokens: int
    vocab: int
    passes: str  # "forward" or "forward+backward"
    median_s: float
    min_s: float
    max_s: float
    reps: int
    peak_extra_bytes: int
    input_bytes: int
    collectives: int
    bytes_sent_per_rank: int


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "host": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "shardkl": shardkl.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by torch during ``fn()`` beyond what was held before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _timed(fn: Callable[[], Any], reps: int, device: torch.device, group: Any) -> list[float]:
    times = []
    fn()  # warm-up (and compilation)
    for _ in range(reps):
        if group is not None:
            dist.barrier(group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


# ---- methods: each returns (forward, forward+backward) callables on this rank's shards ----


def _eager_reference(a: Tensor, b: Tensor) -> Tensor:
    logp = F.log_softmax(a.float(), dim=-1)
    logq = F.log_softmax(b.float(), dim=-1)
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


def _allgather_baseline(a: Tensor, b: Tensor, group: Any) -> Tensor:
    import torch.distributed.nn.functional as dnn

    # All-gather the full logits (differentiable), then compute as on one rank: V-sized traffic and memory.
    full_a = torch.cat(dnn.all_gather(a.contiguous(), group=group), dim=-1)
    full_b = torch.cat(dnn.all_gather(b.contiguous(), group=group), dim=-1)
    return _eager_reference(full_a, full_b)


def _megatron_baseline(a: Tensor, b: Tensor, group: Any) -> Tensor:
    import torch.distributed.nn.functional as dnn

    a, b = a.float(), b.float()
    # All-reduce the max, for a stable log-sum-exp (detached, as in Megatron-core).
    m = torch.stack([a.detach().amax(-1), b.detach().amax(-1)])
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    ea, eb = torch.exp(a - m[0].unsqueeze(-1)), torch.exp(b - m[1].unsqueeze(-1))
    # All-reduce the sums of exponentials.
    sums = dnn.all_reduce(torch.stack([ea.sum(-1), eb.sum(-1)]), group=group)
    # All-reduce the P-weighted sum of a - b; the textbook one-pass KL = E_P[a - b] - (lse_a - lse_b).
    weighted = dnn.all_reduce((ea * (a - b)).sum(-1), group=group)
    lse_a, lse_b = m[0] + torch.log(sums[0]), m[1] + torch.log(sums[1])
    return weighted / sums[0] - (lse_a - lse_b)


def _methods(
    impls: list[str], world: int, group: Any
) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    out: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"floor": lambda a, b: a.sum() + b.sum()}
    if world == 1:
        out["eager_reference"] = _eager_reference
    else:
        out["allgather_baseline"] = lambda a, b: _allgather_baseline(a, b, group)
        out["megatron_baseline"] = lambda a, b: _megatron_baseline(a, b, group)
    for impl in impls:
        out[f"shardkl[{impl}]"] = functools.partial(_shardkl, group=group, impl=impl)
    return out


def _shardkl(a: Tensor, b: Tensor, *, group: Any, impl: Any) -> Tensor:
    return shardkl.exact_kl(a, b, group=group, options=shardkl.Options(impl=impl))


def _inputs(tokens: int, vocab: int, rank: int, world: int, dtype: torch.dtype, device: torch.device):
    base, extra = divmod(vocab, world)
    start = rank * base + min(rank, extra)
    local = base + (rank < extra)
    g = torch.Generator().manual_seed(1234 + start)
    a = torch.randn(tokens, local, generator=g)
    b = torch.randn(tokens, local, generator=g).mul_(0.1).add_(a)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def _measure_point(
    a: Tensor,
    b: Tensor,
    methods: dict[str, Callable[[Tensor, Tensor], Tensor]],
    *,
    reps: int,
    backward: bool,
    group: Any,
    device: torch.device,
    label: dict[str, Any],
) -> list[Row]:
    rows: list[Row] = []
    input_bytes = 2 * a.numel() * a.element_size()
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    for name, method in methods.items():

        def forward(method: Callable[[Tensor, Tensor], Tensor] = method) -> Tensor:
            with torch.no_grad():
                return method(a, b)

        def both(method: Callable[[Tensor, Tensor], Tensor] = method) -> None:
            x.grad = y.grad = None
            method(x, y).sum().backward()

        for passes, fn in (("forward", forward), ("forward+backward", both)):
            if passes == "forward+backward" and (not backward or name == "floor"):
                continue
            with shardkl.count_collectives() as counter:
                fn()  # also the warm-up (and compilation) before the timing
            times = _timed(fn, reps, device, group)
            peak = peak_extra_bytes(fn, device)
            if passes == "forward+backward":
                # the gradients themselves (two input-sized tensors) are outputs, not overhead
                peak = max(0, peak - input_bytes)
            rows.append(Row(method=name, passes=passes, median_s=statistics.median(times), min_s=min(times),
                            max_s=max(times), reps=reps, peak_extra_bytes=peak, input_bytes=input_bytes,
                            collectives=counter.total, bytes_sent_per_rank=counter.bytes_sent, **label))
    return rows


def measure(
    *,
    vocabs: list[int],
    tokens_list: list[int],
    dtypes: list[str],
    impls: list[str],
    reps: int,
    backward: bool,
    group: Any = None,
    device: torch.device | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Row]:
    """Measure every method on every (tokens, vocab, dtype) point on this rank; all ranks must call it."""
    device = device or torch.device("cpu")
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    rows: list[Row] = []
    points = [(t, v, d) for d in dtypes for t in tokens_list for v in vocabs]
    for i, (tokens, vocab, dtype_name) in enumerate(points, 1):
        if log is not None:
            log(f"[{i}/{len(points)}] world={world} {dtype_name} tokens={tokens} vocab={vocab}")
        a, b = _inputs(tokens, vocab, rank, world, _DTYPES[dtype_name], device)
        label = {"world_size": world, "dtype": dtype_name, "tokens": tokens, "vocab": vocab}
        rows += _measure_point(a, b, _methods(impls, world, group), reps=reps, backward=backward, group=group,
                               device=device, label=label)
    return rows


def _log(message: str) -> None:
    print(f"[shardkl.bench] {message}", file=sys.stderr, flush=True)


def _rank_main(rank: int, world: int, port: int, kwargs: dict[str, Any], out_file: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=300))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=600))
    try:
        rows = measure(group=dist.group.WORLD, log=_log if rank == 0 else None, **kwargs)
        if rank == 0:
            Path(out_file).write_text(json.dumps([asdict(r) for r in rows]))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(world: int, **kwargs: Any) -> list[Row]:
    """Measure on ``world`` gloo ranks spawned on this machine (rank 0's numbers are returned)."""
    if world == 1:
        return measure(log=_log, **kwargs)
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "rows.json")
        mp.spawn(_rank_main, args=(world, port, kwargs, out_file), nprocs=world, join=True)
        return [Row(**r) for r in json.loads(Path(out_file).read_text())]


def format_table(rows: list[Row]) -> str:
    """A readable table of the rows."""
    head = (f"{'method':<20}{'ws':>3}{'dtype':>10}{'tokens':>8}{'vocab':>8}{'pass':>18}{'median ms':>11}"
            f"{'min ms':>9}{'max ms':>9}{'extra MiB':>11}{'% input':>9}{'coll':>6}{'B/tok/rank':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.method:<20}{r.world_size:>3}{r.dtype:>10}{r.tokens:>8}{r.vocab:>8}{r.passes:>18}"
            f"{r.median_s * 1e3:>11.2f}{r.min_s * 1e3:>9.2f}{r.max_s * 1e3:>9.2f}"
            f"{r.peak_extra_bytes / 2**20:>11.2f}{100 * r.peak_extra_bytes / r.input_bytes:>8.1f}%"
            f"{r.collectives:>6}{r.bytes_sent_per_rank / r.tokens:>11.1f}"
        )
    return "\n".join(lines)


def summary(rows: list[Row], tokens: int, vocab: int) -> list[str]:
    """The issue's target ratios at (tokens, vocab), fp32, from rows measured in this run."""
    def get(method: str, passes: str, world: int = 1) -> Row | None:
        for r in rows:
            if (r.method, r.passes, r.world_size, r.tokens, r.vocab, r.dtype) == (
                method, passes, world, tokens, vocab, "float32"
            ):
                return r
        return None

    out = []
    floor, ref = get("floor", "forward"), get("eager_reference", "forward")
    ref_both = get("eager_reference", "forward+backward")
    for impl in sorted({r.method for r in rows if r.method.startswith("shardkl[")}):
        fwd, both = get(impl, "forward"), get(impl, "forward+backward")
        if fwd and ref and floor:
            out.append(f"{impl} forward, N={tokens} V={vocab} fp32: {ref.median_s / fwd.median_s:.1f}x faster than "
                       f"eager (target >= 10x), {fwd.median_s / floor.median_s:.1f}x the read-once floor (target "
                       f"<= 2.0x); extra memory {100 * fwd.peak_extra_bytes / fwd.input_bytes:.2f}% of the inputs "
                       f"(target <= 2%) vs {100 * ref.peak_extra_bytes / ref.input_bytes:.0f}% for eager")
        if both and ref_both:
            out.append(f"{impl} forward+backward: {ref_both.median_s / both.median_s:.1f}x faster than eager "
                       f"(target >= 5x); extra memory beyond the gradients "
                       f"{100 * both.peak_extra_bytes / both.input_bytes:.2f}% vs "
                       f"{100 * ref_both.peak_extra_bytes / ref_both.input_bytes:.0f}%")
    for r in rows:
        if r.world_size > 1 and r.method.startswith("shardkl[") and r.vocab == max(x.vocab for x in rows):
            out.append(f"{r.method} world size {r.world_size}, {r.passes}: {r.collectives} collective(s), "
                       f"{r.bytes_sent_per_rank / r.tokens:.1f} bytes per token per rank")
    return out


def plot(rows: list[Row], path: Path) -> None:
    """Time and memory against vocabulary size (log-log), forward, one line per method and world size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    tokens = max({r.tokens for r in rows}, key=lambda t: sum(1 for r in rows if r.tokens == t))
    keys = sorted({(r.method, r.world_size, r.dtype) for r in rows})
    for method, world, dtype in keys:
        pts = sorted((r.vocab, r.median_s, r.peak_extra_bytes) for r in rows
                     if (r.method, r.world_size, r.dtype, r.tokens, r.passes) == (method, world, dtype, tokens,
                                                                                   "forward"))
        if len(pts) < 2:
            continue
        label = f"{method} ws={world} {dtype}"
        ax_t.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=label)
        ax_m.plot([p[0] for p in pts], [max(p[2], 1) / 2**20 for p in pts], marker="o", label=label)
    for ax, ylabel in ((ax_t, "forward time (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"vocabulary size ({tokens} tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(f"shardkl benchmark, {machine()['processor']}, torch {torch.__version__}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardkl.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabs", type=_ints, default=[1000, 8000, 32000, 128000, 256000],
                        help="vocabulary sweep (comma-separated)")
    parser.add_argument("--tokens", type=_ints, default=[256], help="tokens of the vocabulary sweep")
    parser.add_argument("--target-tokens", type=int, default=2048, help="tokens of the target point")
    parser.add_argument("--target-vocab", type=int, default=32000, help="vocabulary of the target point")
    parser.add_argument("--token-sweep", type=_ints, default=[512, 2048, 8192], help="tokens sweep at the target vocab")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    parser.add_argument("--world-sizes", type=_ints, default=[1, 2])
    parser.add_argument("--impls", default="eager,compiled", help="shardkl implementations (comma-separated)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--out", default="bench-results", help="folder of results.jsonl and plot.png")
    parser.add_argument("--quick", action="store_true", help="a tiny sweep for smoke tests")
    args = parser.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in _DTYPES]
    if bad:
        parser.error(f"unknown dtype {bad[0]!r}; choose from {', '.join(_DTYPES)}")
    impls = [i for i in args.impls.split(",") if i]
    for impl in impls:
        if impl not in ("eager", "compiled", "triton"):
            parser.error(f"unknown impl {impl!r}")
    if args.reps < 5 and not args.quick:
        parser.error("--reps must be >= 5 (median and spread need them)")
    if args.quick:
        args.vocabs, args.tokens, args.token_sweep = [500, 3000], [64], []
        args.target_tokens, args.target_vocab, args.reps = 64, 3000, 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"impls": impls, "reps": args.reps, "backward": not args.no_backward}
    rows: list[Row] = []
    for world in args.world_sizes:
        print(f"[shardkl.bench] world size {world}: vocabulary sweep", file=sys.stderr, flush=True)
        rows += run_world(world, vocabs=args.vocabs, tokens_list=args.tokens, dtypes=dtypes, **common)
        extra_tokens = sorted({args.target_tokens, *args.token_sweep} - set(args.tokens))
        if extra_tokens:
            print(f"[shardkl.bench] world size {world}: tokens sweep at V={args.target_vocab}", file=sys.stderr)
            rows += run_world(world, vocabs=[args.target_vocab], tokens_list=extra_tokens, dtypes=["float32"],
                              **common)
    info = machine()
    with open(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({**asdict(r), "machine": info}) + "\n")
    plot(rows, out / "plot.png")
    print(format_table(rows))
    print()
    for line in summary(rows, args.target_tokens, args.target_vocab):
        print(line)
    print(f"\nwrote {out / 'results.jsonl'} and {out / 'plot.png'} ({info['processor']}, torch {info['torch']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
