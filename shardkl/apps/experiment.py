"""The seed blog's experiment at any scale, on one rank of a vocabulary-sharded job.

Reference logits ``~ N(0, 1)`` of shape ``[batch, seq, vocab]``, new logits ``= reference + delta * N(0, 1)``,
tokens sampled from the reference, then the exact KL(reference‖new) next to Schulman's k1, k2, k3. Each rank
generates only its vocabulary slice (``shardkl.apps.synthetic``) and samples with :func:`shardkl.sample_tokens`, so
the logits and the tokens are the same for every world size (bit for bit); what follows from them is computed in
float32 from per-shard partial sums whose merge order depends on the split, so it agrees to float32 rounding (see
:func:`format_table`). :func:`run_rank` is the per-worker function of every launcher (torchrun, Ray).
"""

from __future__ import annotations

import math
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

import shardkl
from shardkl.apps.synthetic import sharded_normal
from shardkl.distributed import ProcessGroup, all_gather_flat, rank_and_size
from shardkl.functional import KLStats
from shardkl.layout import VocabLayout
from shardkl.sampling import sample_tokens

Dtype = Literal["float32", "bfloat16", "float16", "float64"]
Backend = Literal["auto", "gloo", "nccl"]

STAGES = ("generating", "sampling", "computing", "done")
"""The stages :func:`run_rank` reports, in order."""


@dataclass(frozen=True)
class ExperimentConfig:
    """experiment (the same keys in every launcher: exact_kl.py, ray_kl.py)"""

    vocab_size: int = 1000
    """global vocabulary size V, split over the ranks"""
    seq_len: int = 50
    """positions per sequence"""
    batch_size: int = 1
    """sequences"""
    delta: float = 0.1
    """scale of the perturbation of the new policy's logits (exact KL per token is about delta**2 / 2)"""
    samples: int = 1
    """tokens drawn from the reference per position, for the estimator statistics"""
    seed: int = 0
    """seed of the logits and of the sampled tokens (the same for any number of ranks)"""
    dtype: Dtype = "float32"
    """dtype of the logits handed to shardkl"""
    temperature: float = 1.0
    """softmax temperature of both policies"""
    backend: Backend = "auto"
    """torch.distributed backend: auto is nccl when every rank has a GPU, else gloo"""
    timeout_s: float = 120.0
    """seconds a collective may wait for the other ranks before the job fails with one line"""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "batch_size", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        for name, kind in (("dtype", Dtype), ("backend", Backend)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"{name} must be one of {', '.join(get_args(kind))}, got {getattr(self, name)!r}")


Progress = Callable[[str, str], None]
"""``progress(stage, message)``: called by :func:`run_rank` as each of :data:`STAGES` begins."""

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def make_logits(config: ExperimentConfig, layout: VocabLayout, device: torch.device) -> tuple[Tensor, Tensor]:
    """This rank's columns of the reference and new logits, ``[batch * seq, V_local]`` each."""
    rows = config.batch_size * config.seq_len
    ref = sharded_normal(rows, layout.start, layout.stop, config.vocab_size, seed=config.seed, stream="reference")
    # in place: no third [rows, V_local] temporary
    new = sharded_normal(rows, layout.start, layout.stop, config.vocab_size, seed=config.seed, stream="delta")
    new.mul_(config.delta).add_(ref)
    dtype = _DTYPES[config.dtype]
    return ref.to(device=device, dtype=dtype), new.to(device=device, dtype=dtype)


def sample(config: ExperimentConfig, layout: VocabLayout, ref_logits: Tensor) -> Tensor:
    """``[samples, batch * seq]`` token ids drawn from the reference, the same on every rank and world size."""
    return sample_tokens(
        ref_logits, seed=config.seed, layout=layout, num_samples=config.samples, temperature=config.temperature
    )


def compute_stats(
    config: ExperimentConfig, layout: VocabLayout, ref_logits: Tensor, new_logits: Tensor, tokens: Tensor
) -> KLStats:
    """One :func:`shardkl.kl_stats` call: per-token statistics ``[samples, batch, seq]`` (one collective)."""
    shape = (config.samples, config.batch_size, config.seq_len, layout.local_size)
    # samples share the logits: an expanded view, read once per sample, never copied
    ref_view = ref_logits.view(1, config.batch_size, config.seq_len, -1).expand(shape)
    new_view = new_logits.view(1, config.batch_size, config.seq_len, -1).expand(shape)
    return shardkl.kl_stats(ref_view, new_view, tokens.view(shape[:-1]), layout=layout, temperature=config.temperature)


def run_rank(
    config: ExperimentConfig,
    *,
    group: ProcessGroup | None = None,
    device: torch.device | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the experiment on this rank; every rank returns the same result dictionary.

    Args:
        config: experiment configuration.
        group: process group the vocabulary is split over (``None``: one rank holds it all).
        device: device of the logits (default CPU).
        progress: called with ``(stage, message)`` as each stage begins (the launchers pass it on rank 0, the Ray
            job on every rank); ``"done"`` comes last, with the stages' times.

    Returns:
        JSON-ready dictionary: world size, sizes, exact KL, per-estimator statistics, timings, memory.
    """
    device = device or torch.device("cpu")
    _, world = rank_and_size(group)
    layout = VocabLayout.split(config.vocab_size, group, "balanced")
    rows = config.batch_size * config.seq_len
    wall0 = time.perf_counter()

    say = progress or (lambda stage, message: None)
    say("generating", f"generating logits: {rows} tokens x {config.vocab_size} vocab over {world} rank(s)")
    ref_logits, new_logits = make_logits(config, layout, device)
    generate_s = time.perf_counter() - wall0

    say("sampling", f"sampling {config.samples} token(s) per position from the reference (Gumbel-max)")
    t0 = time.perf_counter()
    tokens = sample(config, layout, ref_logits)
    sample_s = time.perf_counter() - t0

    say("computing", "computing exact KL and estimators")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    stats = compute_stats(config, layout, ref_logits, new_logits, tokens)
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
        torch.tensor([compute_s, float(_peak_memory_bytes(device)), float(layout.local_size)], dtype=torch.float64,
                     device=device),
        group,
    ).cpu()
    total_s = time.perf_counter() - wall0
    parts = f"generating {generate_s:.2f} s, sampling {sample_s:.2f} s, KL {compute_s:.2f} s"
    say("done", f"done in {total_s:.2f} s ({parts})")
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
    """The result of :func:`run_rank` for people: the exact KL, the estimators' table, and what its columns hold."""
    draws = result["tokens"] * result["samples"]
    lines = [
        f"shardkl exact KL  world_size={result['world_size']}  vocab={result['vocab_size']}  "
        f"tokens={result['tokens']} x {result['samples']} sample(s)  dtype={result['dtype']}  "
        f"delta={result['delta']}",
        f"exact KL(reference||new) per token, mean: {result['exact_kl']:.6e}",
        "",
        f"{'estimator':<10}{'mean':>13}{'bias':>13}{'std':>13}{'std error':>13}{'|bias|/KL':>11}",
    ]
    for name, s in result["estimators"].items():
        lines.append(
            f"{name:<10}{s['mean']:>13.4e}{s['bias']:>13.3e}{s['std']:>13.3e}{s['std_error']:>13.3e}"
            f"{s['rel_error']:>11.4f}"
        )
    lines += [
        "",
        f"mean, std: of the estimator's {draws} per-token values; bias: mean - exact KL; "
        f"std error: std / sqrt({draws});",
        "|bias|/KL: the bias relative to the exact KL. A bias within about two standard errors is sampling noise.",
        "",
        f"time (KL call, slowest rank): {result['time_s']:.4f} s   "
        f"peak memory (max over ranks): {result['peak_mem_bytes'] / 2**20:.1f} MiB",
    ]
    return "\n".join(lines)
