"""The Ray job's driver side without starting Ray: progress from the board, the one-line failure, bad arguments.

The end-to-end runs (the seed job, a killed and a stalled worker) are in ``tests/launch/test_ray_kl.py``.
"""

from __future__ import annotations

import io
import time

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.train.torch")

from shardkl.apps.experiment import ExperimentConfig  # noqa: E402
from shardkl.apps.progress import StageLog, Timeline  # noqa: E402
from shardkl.apps.ray_job import (  # noqa: E402
    STAGES,
    ProgressBoard,
    _describe_failure,
    _Watcher,
    run_on_ray,
    start_failure,
)


def _board(marks: list[tuple[int, str, float]]) -> dict:
    board = ProgressBoard()
    for rank, stage, at in marks:
        board.mark(rank, stage, f"{stage} message", 100 + rank, "host", at)
    return board.snapshot()


def test_watcher_prints_each_stage_once_in_order_with_the_workers_own_times() -> None:
    out = io.StringIO()
    log = StageLog(interval_s=0, stream=out, heartbeat=False)
    timeline = Timeline(start=time.perf_counter() - 100)  # the run started 100 s ago
    watcher = _Watcher(2, log, timeline)
    wall0 = timeline.start + watcher._offset  # the timeline's start on the workers' wall clock
    assert not watcher.update(_board([]))
    assert watcher.update(_board([(0, "ready", wall0 + 5.0)]))
    assert out.getvalue() == ""  # rank 1 is not ready yet
    # everything else arrives in one poll: each stage still prints once, in order, at the time it happened
    marks = [(0, "ready", wall0 + 5.0), (1, "ready", wall0 + 6.0)]
    marks += [(rank, stage, wall0 + 6.5 + i / 10) for i, stage in enumerate(STAGES[1:]) for rank in (0, 1)]
    assert watcher.update(_board(marks))
    assert not watcher.update(_board(marks))
    assert out.getvalue().splitlines() == [
        "[shardkl] workers ready (2/2) after 6.0 s",
        "[shardkl] generating message",
        "[shardkl] sampling message",
        "[shardkl] computing message",
        "[shardkl] done message",
        "[shardkl] workers finished (2/2) after 6.8 s",
    ]
    assert [name for name, _ in timeline.parts] == ["worker start", "experiment"]
    assert [round(s, 6) for _, s in timeline.parts] == [6.0, 0.8]


def test_board_keeps_every_rank_history() -> None:
    snapshot = _board([(1, "ready", 1.0), (1, "computing", 2.0)])
    assert snapshot[1]["stage"] == "computing" and snapshot[1]["pid"] == 101
    assert [stage for stage, _, _ in snapshot[1]["history"]] == ["ready", "computing"]
    assert STAGES == ("ready", "generating", "sampling", "computing", "done")


def test_failure_line_puts_the_dead_rank_first_and_names_silent_ranks() -> None:
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    died = WorkerHealthCheckFailedError(
        "A worker health check failed.",
        failure=RuntimeError("The actor died.\nWorker exit type: SYSTEM_ERROR Worker exit detail: Killed by signal. "
                             "Some common causes include: OOM"),
    )
    peer = RuntimeError("[gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:8618.\nmore")
    line = _describe_failure(WorkerGroupError("...", {0: peer, 2: died}), {}, 4)
    assert line == (
        "rank 2 died: worker process exited unexpectedly (Killed by signal); then rank 0 raised RuntimeError: "
        "[gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:8618.; then no error from rank(s) 1, 3 "
        "(hung, or stopped by Ray)"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_workers": -1}, "num_workers must be >= 0"),
     ({"num_workers": 2, "config": ExperimentConfig(backend="nccl")}, "backend nccl needs GPU workers")],
)
def test_bad_arguments_raise_before_anything_starts(kwargs: dict, message: str) -> None:
    config = kwargs.pop("config", ExperimentConfig())
    with pytest.raises(ValueError, match=message):
        run_on_ray(config, **kwargs)


def test_a_failed_ray_start_is_one_line_naming_where() -> None:
    error = ConnectionError("Could not connect to 10.0.0.1:6379\nafter 3 attempts")
    assert start_failure("10.0.0.1:6379", error) == (
        "could not join Ray at 10.0.0.1:6379: ConnectionError: Could not connect to 10.0.0.1:6379"
    )
    assert start_failure("", RuntimeError("")) == "could not start Ray: RuntimeError: "
