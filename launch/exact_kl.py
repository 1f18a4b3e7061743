"""Exact KL of vocabulary-sharded logits next to Schulman's k1/k2/k3, at any scale.

    torchrun --standalone --nproc-per-node N launch/exact_kl.py [--config configs/seed.toml] [--key value ...]
    python launch/exact_kl.py [...]            # one rank

Rank 0 prints a table to stdout (progress goes to stderr) and, with ``--output PATH``, writes JSON.
A bad configuration exits with status 2 and one line naming the problem, on every rank.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

USAGE = (
    "usage: launch/exact_kl.py [--config FILE.toml] [--vocab-size N] [--seq-len N] [--batch-size N] "
    "[--delta X] [--samples K] [--seed N] [--dtype float32|bfloat16|float16|float64] [--temperature T] "
    "[--backend auto|gloo|nccl] [--timeout-s S] [--output PATH]"
)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    from shardkl.apps.config import ConfigError, ExperimentConfig, load_config, parse_args

    prog = "exact_kl.py"
    try:
        path, overrides, extra = parse_args(ExperimentConfig, argv)
        if extra:
            key = next(iter(extra))
            raise ConfigError(f"unknown option --{key.replace('_', '-')}")
        config = load_config(ExperimentConfig, path, overrides)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

    import torch
    import torch.distributed as dist

    from shardkl import CollectiveError, set_collective_timeout
    from shardkl.apps.experiment import format_table, run_rank

    world = int(os.environ.get("WORLD_SIZE", "1"))
    group = None
    device = torch.device("cpu")
    if world > 1:
        backend = config.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s))
        group = dist.group.WORLD
    elif torch.cuda.is_available() and config.backend != "gloo":
        device = torch.device("cuda")
    set_collective_timeout(config.timeout_s)
    try:
        result = run_rank(config, group=group, device=device)
        if group is not None:
            # every rank leaves together: gloo can abort a process that tears down while a peer still sends
            dist.barrier(group)
    except CollectiveError as exc:
        # a peer died or stalled: one line, non-zero exit, no traceback wall
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if group is not None:
            dist.destroy_process_group()
    result = {"launcher": "torchrun" if world > 1 else "python", **result}
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_table(result), flush=True)
        if config.output:
            out = Path(config.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"[shardkl] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
