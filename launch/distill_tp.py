"""On-policy distillation at tensor parallelism with shardkl: ``torchrun --standalone --nproc-per-node 2
launch/distill_tp.py --config configs/distill.toml``.

A tiny teacher and a smaller student Llama (built from configs, no download; different hidden sizes, one
vocabulary), each with its ``lm_head`` split column-wise over the ranks. Every step the student samples responses,
and its per-token divergence from the frozen teacher (``--divergence forward_kl | reverse_kl | jsd``, ``--beta``;
``--top-k K`` for a teacher known only by its top-K log-probs) comes from ``shardkl.distillation_loss`` on hidden
states; then backward and an SGD step. Configuration: defaults < ``--config file.toml`` < command line. Rank 0
prints the first step's per-token divergences next to a float64 reference, one line per step, and writes
``--json``. ``--verify`` re-runs the same steps on each process alone and reports the largest differences.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shardkl.apps.config import ConfigError, load_config
from shardkl.apps.config import parse_args as config_args
from shardkl.apps.distill import DistillConfig, StepResult, parity_report, train


@dataclass(frozen=True)
class LaunchArgs:
    """Flags of this launcher that are not DistillConfig fields."""

    json: Path | None
    verify: bool


def parse_args(argv: list[str]) -> tuple[DistillConfig, LaunchArgs]:
    """DistillConfig from defaults < ``--config FILE.toml`` < ``--key value``, plus ``--json`` and ``--verify``.
    Raises :class:`shardkl.apps.config.ConfigError` with one line for any problem."""
    verify = "--verify" in argv
    path, overrides, extra = config_args(DistillConfig, [a for a in argv if a != "--verify"])
    json_path = extra.pop("json", None)
    if extra:
        raise ConfigError(f"unknown option --{next(iter(extra)).replace('_', '-')}")
    config = load_config(DistillConfig, path, overrides)
    return config, LaunchArgs(json=None if json_path is None else Path(json_path), verify=verify)


def init_distributed() -> Any:
    """The process group from torchrun's environment (gloo: the models run on the CPU); ``None`` without it."""
    if "RANK" not in os.environ:
        return None
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    return dist.group.WORLD


def print_tokens(result: StepResult) -> None:
    """One line per response token that counts: its sequence, position, id, divergence and the float64 one."""
    print(f"{'seq':>4} {'pos':>4} {'token':>6} {'divergence':>14} {'float64':>14} {'rel diff':>9}")
    for b, (tokens, mask, values, reference) in enumerate(
        zip(result.tokens, result.mask, result.per_token, result.reference, strict=True)
    ):
        for t, (token, keep, value, ref) in enumerate(zip(tokens, mask, values, reference, strict=True)):
            if keep:
                rel = abs(value - ref) / max(abs(ref), 1e-12)
                print(f"{b:>4} {t:>4} {token:>6} {value:>14.8g} {ref:>14.8g} {rel:>9.1e}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("options: --config FILE.toml, --json PATH, --verify, and --<key> <value> for every key of:")
        for f in dataclasses.fields(DistillConfig):
            print(f"  --{f.name.replace('_', '-')} (default {f.default!r})")
        return 0
    try:
        config, args = parse_args(argv)
    except ConfigError as exc:
        print(f"distill_tp.py: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    group = init_distributed()
    rank = dist.get_rank() if group is not None else 0
    world = dist.get_world_size() if group is not None else 1
    start = time.perf_counter()
    results, student = train(config, group)
    seconds = time.perf_counter() - start
    verify = None
    if args.verify:
        report = parity_report(config, results, student)
        values = torch.tensor(list(report.values()), dtype=torch.float64)
        if group is not None:
            # the worst rank's differences
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        verify = dict(zip(report, values.tolist(), strict=True))
    if rank == 0:
        what = config.divergence + (f" beta={config.beta}" if config.divergence == "jsd" else "")
        what += f" top-{config.top_k} teacher" if config.top_k else " full teacher"
        if results:
            print(f"step 0: per-token {what} of the student's responses (TP={world}) and a float64 reference")
            print_tokens(results[0])
        for r in results:
            s = r.summary()
            print(f"step {r.step}: loss {s['loss']:.6g} -> {s['loss_after']:.6g} after the step, "
                  f"max rel diff vs float64 {s['max_rel_diff_float64']:.1e}")
        print(f"world_size={world} vocab={config.vocab_size} hidden teacher/student="
              f"{config.teacher_hidden_size}/{config.student_hidden_size} time={seconds:.2f}s")
        if verify is not None:
            print("verify (vs one process): " + ", ".join(f"{k}={v:.3g}" for k, v in verify.items()))
        if args.json is not None:
            payload = {
                "config": dataclasses.asdict(config),
                "world_size": world,
                "seconds": seconds,
                "steps": [r.summary() for r in results],
                "first_step": dataclasses.asdict(results[0]) if results else None,
                "verify": verify,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "machine": platform.machine(),
            }
            args.json.write_text(json.dumps(payload, indent=2))
    if group is not None:
        # leave together: a rank that tears gloo down while its peer still prints can abort at exit
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
