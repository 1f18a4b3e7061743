"""KL audit of two Hugging Face causal LMs over a corpus: exact KL both ways per token, statistics, report, plots.

    python launch/kl_audit.py --p_model DIR --q_model DIR --data FILE --out DIR                  # one process
    torchrun --standalone --nproc-per-node N launch/kl_audit.py --p_model DIR ... --out DIR --tp T
    python launch/kl_audit.py --p_model DIR ... --out DIR --ray --num_workers N --tp T [--ray_address ADDR]

Rank 0 (the driver with ``--ray``) prints the report to stdout and progress to stderr, and writes
``OUT/summary.json``, ``OUT/report.txt`` and the plots; every scored token is in ``OUT/tokens/*.parquet``. Bad input
(a missing path, an unreadable model, different vocabularies, a missing text key, an empty corpus, ...) exits with
status 2 and one line, on every rank, before anything is written. The job lives in ``shardkl/apps/audit/``;
``docs/audit.md`` explains every statistic and plot.
"""

from __future__ import annotations

import os
import sys
from typing import Any

PROG = "kl_audit.py"
DESCRIPTION = (
    "Audit a model Q against a reference P over a corpus: per token, KL(P||Q) and KL(Q||P) over the full "
    "vocabulary, both models' log-prob of the next token, entropy and top-1 id; then exact statistics, a report and "
    "plots. The vocabulary is split over --tp ranks, the corpus over the groups of ranks; logits are never "
    "materialised. Run it with python (one process), torchrun, or --ray."
)
EPILOG = (
    "Keys are the same in a --config TOML file and on the command line (--p_model or --p-model); the command line "
    "wins over the file, the file over the defaults. See docs/audit.md."
)
AUDIT_EXTRA = "needs the audit extra: pip install -e '.[audit]'"


def _say(message: str) -> None:
    print(f"[shardkl] {message}", file=sys.stderr, flush=True)


def _error(message: str) -> None:
    """``kl_audit.py: error: MESSAGE`` in one write: under torchrun every rank prints its line at the same moment,
    and ``print`` (the text, then the newline) would let two ranks' lines run together."""
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()


def main(argv: list[str], *, on_shard: Any = None) -> int:
    """Run the launcher; ``on_shard`` is handed to every rank (the failure tests stop a worker with it)."""
    from shardkl.apps.audit.config import AuditConfig
    from shardkl.apps.cli import parse_or_exit, require

    (config,) = parse_or_exit([AuditConfig], argv, prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    for module in ("transformers", "pyarrow", "safetensors", "matplotlib", "tqdm"):
        require(PROG, module, f"{module} is missing: {AUDIT_EXTRA}")
    if config.ray:
        require(PROG, "ray", f"--ray needs Ray: {AUDIT_EXTRA.replace('audit', 'audit,ray')}")
        return _main_ray(config, on_shard)

    from shardkl import CollectiveError, set_collective_timeout
    from shardkl.apps import runtime
    from shardkl.apps.audit.corpus import AuditInputError
    from shardkl.apps.audit.job import run_rank
    from shardkl.apps.audit.models import quiet_transformers
    from shardkl.apps.audit.plan import plan_audit, world_size_from_env

    quiet_transformers()
    error: str | None = None
    try:
        # every rank checks the same files the same way, before anything is written
        plan = plan_audit(config, world_size=world_size_from_env())
    except AuditInputError as exc:
        error = str(exc)
    if error is not None and world_size_from_env() == 1:
        _error(error)
        return 2
    run = runtime.start("auto", timeout_s=config.timeout_s, threads=config.threads)
    set_collective_timeout(config.timeout_s)
    if run.group is not None and _any_rank(error is not None, run):
        # torchrun stops the other ranks as soon as one exits: every rank prints its line, then they leave together
        _error(error or "another rank refused its input (see its line)")
        runtime.finish(run)
        return 2
    launcher = "torchrun" if run.world_size > 1 else "python"
    try:
        result = run_rank(plan, group=run.group, device=run.device, launcher=launcher, threads=run.threads,
                          on_shard=on_shard, say=_say)
    except AuditInputError as exc:  # weights that do not load: the same on every rank
        _error(str(exc))
        runtime.finish(run, together=False)
        return 2
    except CollectiveError as exc:  # a peer died or stalled
        _error(str(exc))
        runtime.finish(run, together=False)
        return 1
    runtime.finish(run)
    if result is not None:
        _print_result(config, result)
    return 0


def _any_rank(flag: bool, run: Any) -> bool:
    """Whether ``flag`` is set on any rank of the job."""
    import torch

    from shardkl.distributed import all_reduce_sum

    # One all-reduce of a flag: the ranks agree on whether any input was refused.
    flags = all_reduce_sum(torch.tensor([float(flag)], device=run.device), run.group, what="input checks")
    return bool(flags.item() > 0)


def _print_result(config: Any, result: Any) -> None:
    """The report on stdout; on stderr the job's throughput and what was written."""
    print(result.report, end="", flush=True)
    run = result.summary["run"]
    if run["tokens_this_run"]:
        found = run["shards_found_on_disk"]
        _say(f"scored {run['tokens_this_run']:,} tokens in {run['seconds']:.1f} s, {run['tokens_per_s']:,.0f} "
             f"tokens/s on {run['world_size']} rank(s) (models loaded)"
             + (f"; {found} shard(s) were already on disk" if found else ""))
    else:
        _say(f"all {result.summary['shards']} shard(s) were already on disk: nothing left to score")
    files = ["summary.json", "report.txt"]
    if config.plots:
        files += ["kl_histogram.png", "kl_by_position.png"] + (["estimators.png"] if config.estimators else [])
    _say(f"wrote {os.path.join(config.out, '')}{{{','.join(files)}}} and {result.summary['shards']} shard file(s) "
         f"in {os.path.join(config.out, 'tokens', '')}")


def _main_ray(config: Any, on_shard: Any) -> int:
    from shardkl.apps.audit.corpus import AuditInputError
    from shardkl.apps.audit.models import quiet_transformers
    from shardkl.apps.audit.plan import plan_audit
    from shardkl.apps.audit.ray_run import prepare_out, ray_driver_output, ray_env, run_audit_on_ray

    ray_env()
    quiet_transformers()
    try:
        plan = plan_audit(config, world_size=config.num_workers)
    except AuditInputError as exc:
        _error(str(exc))
        return 2
    import ray

    from shardkl.apps.ray_job import RayJobError, start_failure, start_ray

    address = config.ray_address or os.environ.get("RAY_ADDRESS", "")
    _say(f"starting Ray: {'joining ' + address if address else 'embedded local instance'}")
    try:
        logs = start_ray(address, verbose=config.verbose)
    except Exception as exc:  # connection, authentication, resources: one line, not Ray's traceback
        print(f"{PROG}: error: {start_failure(address, exc)}", file=sys.stderr)
        return 1
    if not config.verbose:
        _say(f"Ray's own logs: {logs}")
    error: RayJobError | None = None
    try:
        prepare_out(plan)
        # stdout is the report's: what Ray prints there meanwhile (a dead worker) becomes one line on stderr
        with ray_driver_output(config.verbose, _say):
            result = run_audit_on_ray(plan, on_shard=on_shard, say=_say)
    except RayJobError as exc:
        error = exc
    finally:
        with ray_driver_output(config.verbose, _say):
            ray.shutdown()
    if error is not None:
        _error(str(error))
        return 1
    _print_result(config, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
