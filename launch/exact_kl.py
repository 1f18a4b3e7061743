"""Exact KL of vocabulary-sharded logits next to Schulman's k1/k2/k3, at any scale.

    torchrun --standalone --nproc-per-node N launch/exact_kl.py [--config configs/seed.toml] [--key value ...]
    python launch/exact_kl.py [...]            # one rank

Rank 0 prints a table to stdout, progress to stderr, and writes JSON (default ``results/exact_kl.json``). A bad
configuration exits with status 2 and one line naming the problem, on every rank, before any process group exists.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

PROG = "exact_kl.py"
DESCRIPTION = (
    "The seed experiment at any scale: reference logits ~ N(0, 1), new = reference + delta * N(0, 1), tokens "
    "sampled from the reference; prints the exact KL(reference||new) next to the k1/k2/k3 estimators. Run it with "
    "torchrun (one vocabulary shard per rank) or with python (one rank)."
)
EPILOG = (
    "Keys are the same in a --config TOML file and on the command line (--vocab_size or --vocab-size); the command "
    "line wins over the file, the file over the defaults."
)


@dataclass(frozen=True)
class LaunchOptions:
    """launcher"""

    output: str = "results/exact_kl.json"
    """JSON result written by rank 0 (its folder is created); empty for none"""
    threads: int = 0
    """torch CPU threads per rank; 0: the CPUs this process may use divided by the ranks on this machine"""
    progress_s: float = 5.0
    """seconds between the progress lines of a long stage (rank 0, stderr); 0 for none"""

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.progress_s < 0:
            raise ValueError(f"progress_s must be >= 0, got {self.progress_s}")


def main(argv: list[str]) -> int:
    from shardkl.apps.cli import parse_or_exit
    from shardkl.apps.experiment import ExperimentConfig

    config, options = parse_or_exit(
        [ExperimentConfig, LaunchOptions], argv, prog=PROG, description=DESCRIPTION, epilog=EPILOG
    )

    from shardkl import CollectiveError, set_collective_timeout
    from shardkl.apps import runtime
    from shardkl.apps.cli import refuse
    from shardkl.apps.experiment import format_table, run_rank
    from shardkl.apps.progress import StageLog

    problem = runtime.backend_problem(config.backend)
    if problem:
        refuse(PROG, problem)
    run = runtime.start(config.backend, timeout_s=config.timeout_s, threads=options.threads)
    set_collective_timeout(config.timeout_s)
    log = StageLog(interval_s=options.progress_s) if run.rank == 0 else None
    try:
        result = run_rank(config, group=run.group, device=run.device, progress=log.stage if log else None)
        runtime.finish(run)
    except CollectiveError as exc:
        # a peer died or stalled: one line, non-zero exit, no traceback wall
        runtime.finish(run, together=False)
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if log is not None:
            log.close()
    if run.rank == 0:
        result = {"launcher": "torchrun" if run.world_size > 1 else "python", "threads": run.threads, **result}
        print(format_table(result), flush=True)
        if options.output:
            print(f"[shardkl] wrote {runtime.write_json(options.output, result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
