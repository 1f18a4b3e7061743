"""Exact KL of vocabulary-sharded logits next to Schulman's k1/k2/k3, as a Ray job (Ray Train workers).

    python launch/ray_kl.py --config configs/seed.toml --num-workers 2      # embedded local Ray instance
    python launch/ray_kl.py --address auto --num-workers 8 --use-gpu        # an existing cluster (or RAY_ADDRESS)
    ray job submit --working-dir . -- python launch/ray_kl.py --num-workers 2
    torchrun --standalone --nproc-per-node 2 launch/ray_kl.py --num-workers 0 # Ray Train local mode, no cluster

Same configs, table and JSON as ``launch/exact_kl.py`` (plus ``"launcher": "ray"`` and the run's timings); the
driver prints progress to stderr, and Ray's own logs stay in Ray's log files unless ``--verbose``. A bad
configuration exits with status 2 and one line; a failed worker exits with status 1 and one final line naming the
rank and the cause.
"""

from __future__ import annotations

import time

# the zero of every "after N s" and of the final total: before the imports, which take seconds
T0 = time.perf_counter()

import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

PROG = "ray_kl.py"
DESCRIPTION = (
    "The seed experiment of exact_kl.py as a Ray job: each Ray Train worker holds one vocabulary shard. Same keys, "
    "table and JSON as exact_kl.py."
)
EPILOG = (
    "Keys are the same in a --config TOML file and on the command line (--num_workers or --num-workers); the "
    "command line wins over the file, the file over the defaults."
)


@dataclass(frozen=True)
class RayOptions:
    """Ray launcher"""

    num_workers: int = 2
    """Ray Train workers, one vocabulary shard each; 0: Ray Train's local mode (no cluster; under torchrun every rank
    is a worker)"""
    address: str = ""
    """Ray cluster to join (auto, HOST:PORT, ray://...); empty: $RAY_ADDRESS if set, else an embedded local
    instance"""
    use_gpu: bool = False
    """one GPU per worker, NCCL"""
    verbose: bool = False
    """also forward Ray's own log lines and the workers' output to stderr (else they stay in Ray's log files)"""
    output: str = "results/ray_kl.json"
    """JSON result written by the driver (its folder is created); empty for none"""
    progress_s: float = 5.0
    """seconds between the progress lines of a long stage (stderr); 0 for none"""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.progress_s < 0:
            raise ValueError(f"progress_s must be >= 0, got {self.progress_s}")


def main(argv: list[str], *, on_stage: Any = None) -> int:
    """Run the launcher; ``on_stage`` is handed to :func:`shardkl.apps.ray_job.run_on_ray` (the failure tests use
    it to kill or stall a worker)."""
    from shardkl.apps.cli import ConfigError, parse_config, require
    from shardkl.apps.experiment import ExperimentConfig

    try:
        config, options = parse_config(
            [ExperimentConfig, RayOptions], argv, prog=PROG, description=DESCRIPTION, epilog=EPILOG
        )
        if config.backend == "nccl" and not options.use_gpu:
            raise ConfigError("backend nccl needs --use-gpu")
        if options.use_gpu:
            _check_local_gpus(options)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    require(PROG, "ray", "needs Ray: pip install -e '.[ray]'")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from shardkl.apps import runtime
    from shardkl.apps.progress import StageLog, Timeline
    from shardkl.apps.ray_job import RayJobError, quiet_ray_logging, run_on_ray, start_failure, start_ray

    if options.num_workers == 0:
        # Ray Train's local mode: no cluster; under torchrun every rank runs the same worker function
        quiet_ray_logging(options.verbose)
        import torch

        torch.set_num_threads(runtime.threads_per_rank())
        result = run_on_ray(config, num_workers=0, use_gpu=options.use_gpu, on_stage=on_stage,
                            progress_s=options.progress_s)
        if int(os.environ.get("RANK", "0")) == 0:
            _finish(options, {"launcher": "ray-local", **result}, None)
        return 0

    import ray

    timeline = Timeline(T0)
    address = options.address or os.environ.get("RAY_ADDRESS", "")
    with StageLog(interval_s=options.progress_s) as log:
        timeline.mark("start-up and imports")
        log.stage("starting Ray", f"starting Ray: {'joining ' + address if address else 'embedded local instance'}")
        try:
            logs = start_ray(address, verbose=options.verbose)
        except Exception as exc:  # connection, authentication, resources: one line, not Ray's traceback
            print(f"{PROG}: error: {start_failure(address, exc)}", file=sys.stderr)
            return 1
        after = timeline.mark("Ray start")
        log.end_stage(f"Ray ready after {after:.1f} s" + ("" if options.verbose else f"; its logs: {logs}"))
        error: RayJobError | None = None
        try:
            result = run_on_ray(config, num_workers=options.num_workers, use_gpu=options.use_gpu, log=log,
                                timeline=timeline, on_stage=on_stage)
        except RayJobError as exc:
            error = exc
        finally:
            log.stage("shutting down Ray", "shutting down Ray")
            ray.shutdown()
            log.end_stage()
        if error is not None:
            # after the shutdown, so that nothing Ray prints while stopping can bury the one line that matters
            print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
            return 1
        timeline.mark("Ray shutdown")
        _finish(options, {"launcher": "ray", **result}, timeline)
        timeline.mark("output")
        log.say(timeline.summary())
    return 0


def _check_local_gpus(options: RayOptions) -> None:
    """``use_gpu`` on this machine's own GPUs (local mode, or the embedded local instance): refuse it now if they are
    too few, rather than wait for workers that cannot start. A cluster (``--address`` or ``RAY_ADDRESS``) is not
    checked: its GPUs are elsewhere."""
    from shardkl.apps.cli import ConfigError

    local_mode = options.num_workers == 0
    if not local_mode and (options.address or os.environ.get("RAY_ADDRESS")):
        return
    import torch

    needed = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_mode else options.num_workers
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < needed:
        where, fix = ("local mode", "drop --use-gpu") if local_mode else (
            "the embedded local Ray instance", "drop --use-gpu, or join a cluster with GPUs with --address")
        raise ConfigError(f"use_gpu needs one GPU per worker: {needed} worker(s) in {where}, {gpus} CUDA device(s) "
                          f"here; {fix}")


def _finish(options: RayOptions, result: dict[str, Any], timeline: Any) -> None:
    """Print the table and write the JSON (with the run's timings when there is a timeline)."""
    from shardkl.apps import runtime
    from shardkl.apps.experiment import format_table

    if timeline is not None:
        result = {**result, "timings_s": timeline.as_dict()}
    print(format_table(result), flush=True)
    if options.output:
        print(f"[shardkl] wrote {runtime.write_json(options.output, result)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
