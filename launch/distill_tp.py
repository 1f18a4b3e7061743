"""On-policy distillation at tensor parallelism with shardkl: ``torchrun --standalone --nproc-per-node 2
launch/distill_tp.py --config configs/distill.toml``.

A tiny teacher and a smaller student Llama (built from configs, no download; different hidden sizes, one
vocabulary), each with its ``lm_head`` split column-wise over the ranks. Every step the student samples responses,
and its per-token divergence from the frozen teacher (``--divergence forward_kl | reverse_kl | jsd``, ``--beta``;
``--top-k K`` for a teacher known only by its top-K log-probs) comes from ``shardkl.distillation_loss`` on hidden
states; then backward and an SGD step. Configuration: defaults < ``--config file.toml`` < command line. Rank 0
prints the first step's per-token divergences next to a float64 reference and one line per step to stdout, progress
to stderr, and writes JSON (default ``results/distill_tp.json``). ``--verify`` re-runs the same steps on each
process alone and reports the largest differences.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardkl.apps.distill import StepResult

PROG = "distill_tp.py"
DESCRIPTION = (
    "On-policy distillation of a tiny teacher Llama into a smaller student (built from configs, no download), each "
    "with its lm_head split column-wise over the ranks; the per-token divergence comes from shardkl on hidden "
    "states. Run it with torchrun, or with python (one process)."
)
EPILOG = (
    "Keys are the same in a --config TOML file and on the command line (--top_k or --top-k); the command line wins "
    "over the file, the file over the defaults. A boolean key may stand alone (--verify)."
)


@dataclass(frozen=True)
class LaunchOptions:
    """launcher"""

    verify: bool = False
    """re-run the same steps on each process alone (full vocabulary) and report the largest differences"""
    output: str = "results/distill_tp.json"
    """JSON result written by rank 0 (its folder is created); empty for none"""
    threads: int = 0
    """torch CPU threads per rank; 0: the CPUs this process may use divided by the ranks on this machine"""
    timeout_s: float = 120.0
    """seconds a collective may wait for the other ranks"""

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


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
    from shardkl.apps.cli import parse_or_exit, require
    from shardkl.apps.distill import DistillConfig

    argv = sys.argv[1:] if argv is None else argv
    config, options = parse_or_exit(
        [DistillConfig, LaunchOptions], argv, prog=PROG, description=DESCRIPTION, epilog=EPILOG
    )

    require(PROG, "transformers", "the models need transformers: pip install transformers")
    import dataclasses
    import platform
    import time

    import torch
    import torch.distributed as dist

    from shardkl import set_collective_timeout
    from shardkl.apps import runtime
    from shardkl.apps.distill import parity_report, train
    from shardkl.apps.progress import StageLog

    # gloo: the models run on the CPU
    run = runtime.start("gloo", timeout_s=options.timeout_s, threads=options.threads)
    set_collective_timeout(options.timeout_s)
    log = StageLog(interval_s=5.0) if run.rank == 0 else None
    say = log.stage if log is not None else (lambda stage, message: None)
    start = time.perf_counter()
    say("training", f"training: {config.steps} distillation step(s) over {run.world_size} rank(s)")
    results, student = train(config, run.group)
    seconds = time.perf_counter() - start
    verify = None
    if options.verify:
        say("verifying", "verifying: the same steps on each process alone")
        report = parity_report(config, results, student)
        values = torch.tensor(list(report.values()), dtype=torch.float64)
        if run.group is not None:
            # the worst rank's differences
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        verify = dict(zip(report, values.tolist(), strict=True))
    if log is not None:
        log.end_stage(f"done in {time.perf_counter() - start:.2f} s (training {seconds:.2f} s)")
        log.close()
    runtime.finish(run)
    if run.rank == 0:
        what = config.divergence + (f" beta={config.beta}" if config.divergence == "jsd" else "")
        what += f" top-{config.top_k} teacher" if config.top_k else " full teacher"
        if results:
            print(f"step 0: per-token {what} of the student's responses (TP={run.world_size}) and a float64 reference")
            print_tokens(results[0])
        for r in results:
            s = r.summary()
            print(f"step {r.step}: loss {s['loss']:.6g} -> {s['loss_after']:.6g} after the step, "
                  f"max rel diff vs float64 {s['max_rel_diff_float64']:.1e}")
        print(f"world_size={run.world_size} vocab={config.vocab_size} hidden teacher/student="
              f"{config.teacher_hidden_size}/{config.student_hidden_size} time={seconds:.2f}s")
        if verify is not None:
            print("verify (vs one process): " + ", ".join(f"{k}={v:.3g}" for k, v in verify.items()))
        sys.stdout.flush()
        if options.output:
            payload = {
                "config": dataclasses.asdict(config),
                "world_size": run.world_size,
                "threads": run.threads,
                "seconds": seconds,
                "steps": [r.summary() for r in results],
                "first_step": dataclasses.asdict(results[0]) if results else None,
                "verify": verify,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "machine": platform.machine(),
            }
            print(f"[shardkl] wrote {runtime.write_json(options.output, payload)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
