"""The seed blog's experiment at any scale, on one rank of a vocabulary-sharded job.

Reference logits ``~ N(0, 1)`` of shape ``[batch, seq, vocab]``, new logits ``= reference + delta * N(0, 1)``,
tokens sampled from the reference, then the exact KL(reference‖new) next to Schulman's k1, k2, k3. Each rank
generates only its vocabulary slice (``shardkl.apps.synthetic``), so the numbers do not depend on the world size.
:func:`run_rank` is the per-worker function of every launcher (torchrun, Ray).
"""

from __future__ import annotations

import math
import platform
import resource
import sys
import time
from typing import Any

import torch

import shardkl
from shardkl.apps.config import ExperimentConfig
from shardkl.apps.synthetic import sharded_normal
from shardkl.distributed import ProcessGroup, all_gather_flat, rank_and_size
from shardkl.layout import VocabLayout
from shardkl.sampling import sample_tokens

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[shardkl] {message}", file=sys.stderr, flush=True)


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def run_rank(
    config: ExperimentConfig, *, group: ProcessGroup | None = None, device: torch.device | None = None
) -> dict[str, Any]:
    """Run the experiment on this rank; every rank returns the same result dictionary.

    Args:
        config: experiment configuration.
        group: process group the vocabulary is split over (``None``: one rank holds it all).
        device: device of the logits (default CPU).

    Returns:
        JSON-ready dictionary: world size, sizes, exact KL, per-estimator statistics, timings, memory.
    """
    device = device or torch.device("cpu")
    rank, world = rank_and_size(group)
    layout = VocabLayout.split(config.vocab_size, group, "balanced")
    start, stop = layout.start, layout.stop
    rows = config.batch_size * config.seq_len
    dtype = _DTYPES[config.dtype]
    wall0 = time.perf_counter()

    _log(rank, f"generating logits: {rows} tokens x {config.vocab_size} vocab over {world} rank(s)")
    ref = sharded_normal(rows, start, stop, config.vocab_size, seed=config.seed, stream="reference")
    # in place: no third [rows, V_local] temporary
    new = sharded_normal(rows, start, stop, config.vocab_size, seed=config.seed, stream="delta").mul_(config.delta)
    new.add_(ref)
    ref_logits = ref.to(device=device, dtype=dtype)
    new_logits = new.to(device=device, dtype=dtype)
    del ref, new
    generate_s = time.perf_counter() - wall0

    _log(rank, f"sampling {config.samples} token(s) per position from the reference (Gumbel-max)")
    t0 = time.perf_counter()
    tokens = sample_tokens(
        ref_logits, seed=config.seed, layout=layout, num_samples=config.samples, temperature=config.temperature
    )
    sample_s = time.perf_counter() - t0

    _log(rank, "computing exact KL and estimators")
    shape = (config.samples, config.batch_size, config.seq_len, stop - start)
    # samples share the logits: an expanded view, read once per sample, never copied
    ref_view = ref_logits.view(1, config.batch_size, config.seq_len, -1).expand(shape)
    new_view = new_logits.view(1, config.batch_size, config.seq_len, -1).expand(shape)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    stats = shardkl.kl_stats(ref_view, new_view, tokens.view(shape[:-1]), layout=layout, temperature=config.temperature)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compute_s = time.perf_counter() - t0

    exact = stats.exact_kl[0].double()
    exact_mean = exact.mean().item()
    estimators: dict[str, dict[str, float]] = {}
    for name in ("k1", "k2", "k3"):
        values = getattr(stats, name).double().reshape(-1)
        mean = values.mean().item()
        std = values.std().item() if values.numel() > 1 else 0.0
        estimators[name] = {
            "mean": mean,
            "bias": mean - exact_mean,
            "std": std,
            "std_error": std / math.sqrt(values.numel()),
            "rel_error": abs(mean - exact_mean) / exact_mean if exact_mean > 0 else float("nan"),
            "std_over_kl": std / exact_mean if exact_mean > 0 else float("nan"),
        }

    # One small all-gather so rank 0 can report every rank's time and peak memory.
    per_rank = all_gather_flat(
        torch.tensor([compute_s, float(_peak_memory_bytes(device)), float(stop - start)], dtype=torch.float64,
                     device=device),
        group,
    ).cpu()
    _log(rank, f"done in {time.perf_counter() - wall0:.2f} s")
    return {
        "world_size": world,
        "vocab_size": config.vocab_size,
        "vocab_per_rank": [int(v) for v in per_rank[:, 2].tolist()],
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "tokens": rows,
        "samples": config.samples,
        "delta": config.delta,
        "dtype": config.dtype,
        "temperature": config.temperature,
        "seed": config.seed,
        "exact_kl": exact_mean,
        "exact_kl_per_token_max": exact.max().item(),
        "estimators": estimators,
        "time_s": float(per_rank[:, 0].max()),
        "time_s_per_rank": [float(v) for v in per_rank[:, 0].tolist()],
        "generate_s": generate_s,
        "sample_s": sample_s,
        "peak_mem_bytes": int(per_rank[:, 1].max()),
        "peak_mem_bytes_per_rank": [int(v) for v in per_rank[:, 1].tolist()],
        "device": str(device.type),
        "torch": torch.__version__,
        "shardkl": shardkl.__version__,
        "host": platform.node(),
    }


def format_table(result: dict[str, Any]) -> str:
    """A readable summary of :func:`run_rank`'s result for people."""
    lines = [
        f"shardkl exact KL  world_size={result['world_size']}  vocab={result['vocab_size']}  "
        f"tokens={result['tokens']} x {result['samples']} sample(s)  dtype={result['dtype']}  "
        f"delta={result['delta']}",
        f"exact KL(reference||new) per token, mean: {result['exact_kl']:.6e}",
        "",
        f"{'estimator':<10}{'mean':>14}{'bias':>14}{'std':>14}{'std error':>14}{'rel error':>12}",
    ]
    for name, s in result["estimators"].items():
        lines.append(
            f"{name:<10}{s['mean']:>14.6e}{s['bias']:>14.3e}{s['std']:>14.3e}{s['std_error']:>14.3e}"
            f"{s['rel_error']:>12.4f}"
        )
    lines += [
        "",
        f"time (KL call, slowest rank): {result['time_s']:.4f} s   "
        f"peak memory (max over ranks): {result['peak_mem_bytes'] / 2**20:.1f} MiB",
    ]
    return "\n".join(lines)
