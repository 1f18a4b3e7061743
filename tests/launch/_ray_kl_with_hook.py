"""launch/ray_kl.py with a worker that dies or stalls on purpose, for the failure tests (the hook lives here).

    python tests/launch/_ray_kl_with_hook.py RANK STAGE kill|hang [launcher arguments ...]

Worker RANK SIGKILLs itself (``kill``) or sleeps forever (``hang``) on reaching STAGE. The hook is defined in this
script, which runs as ``__main__``, so Ray's cloudpickle ships it to the workers by value: nothing about it is in
the package.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

LAUNCHER = Path(__file__).resolve().parents[2] / "launch" / "ray_kl.py"


def make_hook(rank: int, stage: str, action: str):  # type: ignore[no-untyped-def]
    if action not in ("kill", "hang"):
        raise ValueError(f"action must be kill or hang, got {action!r}")

    def on_stage(worker_rank: int, worker_stage: str) -> None:
        if (worker_rank, worker_stage) == (rank, stage):
            if action == "hang":
                time.sleep(10**6)
            os.kill(os.getpid(), signal.SIGKILL)

    return on_stage


if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("ray_kl", LAUNCHER)
    assert spec is not None and spec.loader is not None
    launcher = importlib.util.module_from_spec(spec)
    sys.modules["ray_kl"] = launcher  # dataclasses look their module up
    spec.loader.exec_module(launcher)
    rank, stage, action, *argv = sys.argv[1:]
    sys.exit(launcher.main(argv, on_stage=make_hook(int(rank), stage, action)))
