"""launch/kl_audit.py with a rank that stops on purpose after writing some shards, for the resume and Ray failure tests.

    python tests/launch/_kl_audit_with_hook.py RANK SHARDS exit|kill MARKER [launcher arguments ...]

Rank RANK, once it has written SHARDS shards, ends its process: ``exit`` with status 3 (a job stopped halfway), or
``kill`` with SIGKILL (a Ray worker that dies). It does so once: it first creates the file MARKER, and does nothing
while MARKER exists (so the workers Ray Train starts again run to the end). The hook is defined in this script, which
runs as ``__main__``, so Ray's cloudpickle ships it to the workers by value: nothing about it is in the package.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

LAUNCHER = Path(__file__).resolve().parents[2] / "launch" / "kl_audit.py"


def make_hook(rank: int, shards: int, action: str, marker: str):  # type: ignore[no-untyped-def]
    if action not in ("exit", "kill"):
        raise ValueError(f"action must be exit or kill, got {action!r}")
    written: list[int] = []

    def on_shard(worker_rank: int, shard: int) -> None:
        if worker_rank != rank:
            return
        written.append(shard)
        if len(written) < shards or os.path.exists(marker):
            return
        Path(marker).touch()
        sys.stdout.flush()
        sys.stderr.flush()
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)

    return on_shard


if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("kl_audit", LAUNCHER)
    assert spec is not None and spec.loader is not None
    launcher = importlib.util.module_from_spec(spec)
    sys.modules["kl_audit"] = launcher
    spec.loader.exec_module(launcher)
    rank, shards, action, marker, *argv = sys.argv[1:]
    sys.exit(launcher.main(argv, on_shard=make_hook(int(rank), int(shards), action, marker)))
