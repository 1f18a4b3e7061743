"""The audit's step side by side: from hidden states (``LinearLogits``) and from materialised logits, one process.

    python launch/audit_bench.py [--vocab 32000 --hidden 512 --layers 2 --windows 4 --context 512 --reps 5 ...]

Two random Llamas (Q = P perturbed) built in memory, one batch of windows; for each way of computing the audit's
per-token values (both KL directions, log-probs, entropies, top-1 ids, optionally the estimators):

- **tokens/s** of the whole step (both trunks, then the audit's values), median of ``--reps`` rounds in which the
  two ways alternate (so a burst of load from another process slows both alike);
- **extra memory** of the audit's part (everything after the hidden states), the peak of the bytes held by tensors
  that PyTorch operators create during it (``shardkl.bench.measure.PeakTensorMemory``), next to one model's full
  float32 logits of the batch; and the trunks' own peak for scale.

Prints a table and writes JSON (default ``results/audit_bench.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _models(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=max(args.context, 128),
        tie_word_embeddings=False, initializer_range=0.05,
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    p = LlamaForCausalLM(config).eval()
    q = LlamaForCausalLM(config).eval()
    q.load_state_dict(p.state_dict())
    with torch.no_grad():
        for parameter in q.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05 * parameter.std().clamp_min(1e-3))
    return p.to(dtype), q.to(dtype)


def _load() -> float | None:
    """The 1-minute load average (other work on the machine), where the OS has one."""
    try:
        import os

        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="audit_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--windows", type=int, default=4, help="windows in the batch (default 4)")
    parser.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--estimators", type=int, default=0, help="draws from P per position (default 0)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--output", default="results/audit_bench.json", help="JSON file; empty for none")
    args = parser.parse_args(argv)

    import torch

    from shardkl.apps.audit.compute import run_trunks, score_positions
    from shardkl.apps.audit.models import ModelSide
    from shardkl.bench.measure import PeakTensorMemory
    from shardkl.layout import VocabLayout

    torch.set_num_threads(args.threads)
    p_model, q_model = _models(args)
    sides = [ModelSide(m, m.lm_head.weight.detach(), None) for m in (p_model, q_model)]
    layout = VocabLayout.full(args.vocab)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.windows, args.context), generator=generator)
    lengths = torch.full((args.windows,), args.context)
    modes = {"from hidden states": False, "materialised logits": True}

    def step(materialise: bool) -> None:
        positions = run_trunks(*sides, ids, lengths)
        score_positions(*sides, positions, layout=layout, estimators=args.estimators, materialise=materialise)

    with torch.no_grad():
        for materialise in modes.values():  # warm-up
            step(materialise)
        with PeakTensorMemory() as trunk_memory:
            positions = run_trunks(*sides, ids, lengths)
        tokens = int(positions.token.numel())
        memory = {}
        for name, materialise in modes.items():
            with PeakTensorMemory() as tracker:
                score_positions(*sides, positions, layout=layout, estimators=args.estimators, materialise=materialise)
            memory[name] = tracker.peak
        # (wall, CPU) seconds of each sample; on a machine shared with other work the process's CPU time (one
        # thread) is the steadier measure of the work, the wall time what a user waits
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
        parts: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
        trunk_times: list[tuple[float, float]] = []

        def timed(fn: Any) -> tuple[float, float]:
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            return time.perf_counter() - wall, time.process_time() - cpu

        holder: dict[str, Any] = {}
        for _ in range(args.reps):
            trunk_times.append(timed(lambda: holder.update(positions=run_trunks(*sides, ids, lengths))))
            for name, materialise in modes.items():
                times[name].append(timed(lambda materialise=materialise: step(materialise)))
                parts[name].append(timed(lambda materialise=materialise: score_positions(
                    *sides, holder["positions"], layout=layout, estimators=args.estimators, materialise=materialise)))
    logits_bytes = tokens * args.vocab * 4

    def median(samples: list[tuple[float, float]], which: int) -> float:
        return statistics.median(sample[which] for sample in samples)

    rows = []
    for name in modes:
        step_s, step_cpu = median(times[name], 0), median(times[name], 1)
        rows.append({"mode": name, "tokens_per_s": tokens / step_s, "tokens_per_cpu_s": tokens / step_cpu,
                     "step_s": step_s, "step_cpu_s": step_cpu, "audit_part_s": median(parts[name], 0),
                     "audit_part_cpu_s": median(parts[name], 1), "audit_part_extra_bytes": memory[name],
                     "audit_part_extra_pct_of_logits": 100 * memory[name] / logits_bytes})
    result = {
        "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "windows": args.windows,
        "context": args.context, "tokens": tokens, "estimators": args.estimators, "dtype": args.dtype,
        "threads": args.threads, "reps": args.reps, "one_model_logits_bytes": logits_bytes,
        "trunks_s": median(trunk_times, 0), "trunks_cpu_s": median(trunk_times, 1),
        "trunks_peak_bytes": trunk_memory.peak, "rows": rows, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "load_average": _load(),
    }
    mib = 2**20
    print(f"audit step: {args.windows} windows x {args.context} tokens ({tokens:,} scored), V = {args.vocab:,}, "
          f"H = {args.hidden}, {args.layers} layers, {args.dtype}, {args.threads} thread(s), estimators "
          f"{args.estimators}; median of {args.reps}")
    print(f"{'':<22}{'tokens/s':>10}{'tokens/CPU s':>14}{'step CPU s':>12}{'audit part CPU s':>18}"
          f"{'audit part extra':>18}{'% of logits':>13}")
    for row in rows:
        print(f"{row['mode']:<22}{row['tokens_per_s']:>10,.0f}{row['tokens_per_cpu_s']:>14,.0f}"
              f"{row['step_cpu_s']:>12.3f}{row['audit_part_cpu_s']:>18.3f}"
              f"{row['audit_part_extra_bytes'] / mib:>14.1f} MiB{row['audit_part_extra_pct_of_logits']:>12.1f}%")
    print(f"both trunks: {result['trunks_cpu_s']:.3f} CPU s, peak {trunk_memory.peak / mib:.1f} MiB "
          f"({100 * trunk_memory.peak / logits_bytes:.1f}% of logits); one model's float32 logits of the batch: "
          f"{logits_bytes / mib:.1f} MiB; load average {result['load_average']}")
    print("step: both trunks and the audit's values; audit part: everything after the hidden states (one "
          "compare_stats call); extra: peak bytes of the tensors it creates; tokens/s: wall clock, tokens/CPU s: "
          "this process's CPU time")
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[shardkl] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
