"""Tensor-parallel GRPO steps with shardkl on a tiny Llama whose ``lm_head`` is split over the ranks.

    torchrun --standalone --nproc-per-node 2 launch/train_tp.py [--config configs/tp/train_tp.toml] [--verify]
    python launch/train_tp.py [...]            # one process, the full vocabulary

The model is built from a config (no download); the loss ``-advantage · log π(x) + kl_coef · KL(π‖π_ref)`` comes
from shardkl on the vocabulary slices. Rank 0 prints a table of the steps with a legend of its columns to stdout,
progress to stderr, and writes JSON (default ``results/train_tp.json``). ``--verify`` re-runs the same steps on
each process alone and reports the largest differences. A bad configuration exits with status 2 and one line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

PROG = "train_tp.py"
DESCRIPTION = (
    "GRPO steps on a tiny Llama (built from a config, no download) whose lm_head is split column-wise over the "
    "ranks; the loss comes from shardkl on the vocabulary slices. Run it with torchrun, or with python (one process)."
)
EPILOG = (
    "Keys are the same in a --config TOML file and on the command line (--response_len or --response-len); the "
    "command line wins over the file, the file over the defaults."
)


@dataclass(frozen=True)
class LaunchOptions:
    """launcher"""

    verify: bool = False
    """re-run the same steps on each process alone (full vocabulary) and report the largest differences"""
    output: str = "results/train_tp.json"
    """JSON result written by rank 0 (its folder is created); empty for none"""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: auto is nccl when every rank has a GPU, else gloo"""
    threads: int = 0
    """torch CPU threads per rank; 0: the CPUs this process may use divided by the ranks on this machine"""
    timeout_s: float = 120.0
    """seconds a collective may wait for the other ranks"""

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


def main(argv: list[str] | None = None) -> int:
    from shardkl.apps import runtime
    from shardkl.apps.cli import parse_or_exit, refuse, require
    from shardkl.apps.grpo import TPConfig

    argv = sys.argv[1:] if argv is None else argv
    config, options = parse_or_exit(
        [TPConfig, LaunchOptions], argv, prog=PROG, description=DESCRIPTION, epilog=EPILOG
    )
    problem = runtime.backend_problem(options.backend)
    if problem:
        refuse(PROG, problem)

    require(PROG, "transformers", "the model needs transformers: pip install transformers")
    import dataclasses
    import platform
    import time

    import torch
    import torch.distributed as dist

    from shardkl import set_collective_timeout
    from shardkl.apps.grpo import format_steps, parity_report, train
    from shardkl.apps.progress import StageLog

    run = runtime.start(options.backend, timeout_s=options.timeout_s, threads=options.threads)
    set_collective_timeout(options.timeout_s)
    log = StageLog(interval_s=5.0) if run.rank == 0 else None
    say = log.stage if log is not None else (lambda stage, message: None)
    start = time.perf_counter()
    say("training", f"training: {config.steps} GRPO step(s) over {run.world_size} rank(s), backend {run.backend}")
    results, policy = train(config, run.group, run.device)
    seconds = time.perf_counter() - start
    verify = None
    if options.verify:
        say("verifying", "verifying: the same steps on each process alone")
        report = parity_report(config, results, policy)
        values = torch.tensor(list(report.values()), dtype=torch.float64, device=run.device)
        if run.group is not None:
            # the worst rank's differences
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        verify = dict(zip(report, values.tolist(), strict=True))
    if log is not None:
        log.end_stage(f"done in {time.perf_counter() - start:.2f} s (training {seconds:.2f} s)")
        log.close()
    runtime.finish(run)
    if run.rank == 0:
        print(format_steps(results, config))
        print(f"\nworld_size={run.world_size}  backend={run.backend}  vocab={config.vocab_size}  "
              f"training time={seconds:.2f} s")
        if verify is not None:
            diffs = ", ".join(f"{k}={v:.3g}" for k, v in verify.items())
            print(f"verify, largest differences from one process: {diffs}")
        sys.stdout.flush()
        if options.output:
            payload = {
                "config": dataclasses.asdict(config),
                "world_size": run.world_size,
                "backend": run.backend,
                "threads": run.threads,
                "seconds": seconds,
                "steps": [r.as_dict() for r in results],
                "verify": verify,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "machine": platform.machine(),
            }
            print(f"[shardkl] wrote {runtime.write_json(options.output, payload)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
