"""Exact KL of vocabulary-sharded logits next to Schulman's k1/k2/k3, as a Ray job (Ray Train workers).

    python launch/ray_kl.py --config configs/seed.toml --num-workers 2      # embedded local Ray instance
    python launch/ray_kl.py --address auto --num-workers 8 --use-gpu        # an existing cluster (or RAY_ADDRESS)
    ray job submit --working-dir . -- python launch/ray_kl.py --num-workers 2
    torchrun --standalone --nproc-per-node 2 launch/ray_kl.py --num-workers 0 # Ray Train local mode, no cluster

Same configs, table and JSON as ``launch/exact_kl.py`` (plus ``"launcher": "ray"``); progress goes to stderr.
A bad configuration exits with status 2 and one line; a failed worker exits with status 1 and one final line
naming the rank and the cause.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardkl.apps.config import ExperimentConfig

USAGE = (
    "usage: launch/ray_kl.py [--config FILE.toml] [--num-workers N] [--address auto|HOST:PORT] "
    "[--use-gpu] [--timeout-s S] [--vocab-size N] [--seq-len N] [--batch-size N] [--delta X] "
    "[--samples K] [--seed N] [--dtype float32|bfloat16|float16|float64] [--temperature T] "
    "[--backend auto|gloo|nccl] [--output PATH]"
)
PROG = "ray_kl.py"


def _say(message: str) -> None:
    print(f"[shardkl] {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    from shardkl.apps.config import ConfigError, ExperimentConfig, load_config, parse_args

    # --use-gpu is a flag; --use-gpu true|false is accepted too
    argv = [
        "--use-gpu=true" if a == "--use-gpu" and (i + 1 == len(argv) or argv[i + 1].startswith("--")) else a
        for i, a in enumerate(argv)
    ]
    try:
        path, overrides, extra = parse_args(ExperimentConfig, argv)
        num_workers = extra.pop("num_workers", "2")
        address = extra.pop("address", os.environ.get("RAY_ADDRESS", ""))
        use_gpu = extra.pop("use_gpu", "false").lower()
        if extra:
            key = next(iter(extra))
            raise ConfigError(f"unknown option --{key.replace('_', '-')}")
        if not num_workers.isdigit():
            raise ConfigError(f"command line: num_workers must be an int >= 0, got {num_workers!r}")
        if use_gpu not in ("true", "false", "1", "0"):
            raise ConfigError(f"command line: use_gpu must be true or false, got {use_gpu!r}")
        gpu = use_gpu in ("true", "1")
        config = load_config(ExperimentConfig, path, overrides)
        if config.backend == "nccl" and not gpu:
            raise ConfigError("backend nccl needs --use-gpu true")
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from shardkl.apps.ray_job import RayJobError, run_on_ray

    if int(num_workers) == 0:
        # Ray Train's local mode: no cluster; under torchrun every rank runs the same worker function
        result = run_on_ray(config, num_workers=0, use_gpu=gpu)
        return _finish(config, {"launcher": "ray-local", **result}, int(os.environ.get("RANK", "0")) == 0)
    t0 = time.perf_counter()
    _say(f"starting cluster: {'joining ' + address if address else 'embedded local Ray instance'}")
    try:
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", include_dashboard=False)
    except Exception as exc:  # connection, authentication, resources: one line, not Ray's traceback
        print(f"{PROG}: error: could not {'join Ray at ' + address if address else 'start Ray'}: "
              f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
              file=sys.stderr)
        return 1
    _say(f"Ray ready in {time.perf_counter() - t0:.1f} s")
    try:
        result = run_on_ray(config, num_workers=int(num_workers), use_gpu=gpu, log=_say)
    except RayJobError as exc:
        # after the shutdown, so that Ray's forwarded worker logs cannot bury the one line that matters
        ray.shutdown()
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        ray.shutdown()
    return _finish(config, {"launcher": "ray", **result}, True)


def _finish(config: ExperimentConfig, result: dict[str, Any], rank0: bool) -> int:
    """Print the table and write the JSON (rank 0 only)."""
    from shardkl.apps.experiment import format_table

    if rank0:
        print(format_table(result), flush=True)
        if config.output:
            out = Path(config.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            _say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
