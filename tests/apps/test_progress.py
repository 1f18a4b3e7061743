"""Progress lines: one per stage, a periodic line only while a stage runs long; timelines whose parts add up."""

from __future__ import annotations

import io

import pytest

from shardkl.apps.progress import StageLog, Timeline


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _log(interval_s: float = 10.0) -> tuple[StageLog, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    return StageLog(interval_s=interval_s, stream=out, clock=clock, heartbeat=False), out, clock


def test_one_line_per_stage_and_a_periodic_line_only_for_a_long_stage() -> None:
    log, out, clock = _log()
    log.stage("generating", "generating logits")
    clock.now += 9.9
    log.beat()  # under the interval: nothing
    clock.now += 0.2
    log.beat()
    log.beat()  # the interval restarts at each line: no second line at the same moment
    clock.now += 10
    log.beat()
    log.stage("computing", "computing exact KL")
    clock.now += 3
    log.beat()
    log.end_stage("done")
    clock.now += 60
    log.beat()  # no stage: no line
    assert out.getvalue().splitlines() == [
        "[shardkl] generating logits",
        "[shardkl]   still generating after 10 s",
        "[shardkl]   still generating after 20 s",
        "[shardkl] computing exact KL",
        "[shardkl] done",
    ]


def test_interval_zero_prints_only_the_stage_lines() -> None:
    log, out, clock = _log(interval_s=0)
    log.stage("sampling", "sampling")
    clock.now += 1000
    log.beat()
    assert out.getvalue() == "[shardkl] sampling\n"
    with pytest.raises(ValueError, match="interval_s must be >= 0"):
        StageLog(interval_s=-1)


def test_the_heartbeat_thread_stops_on_close() -> None:
    out = io.StringIO()
    with StageLog(interval_s=0.01, stream=out) as log:
        log.stage("x", "x")
    assert log._thread is not None and not log._thread.is_alive()
    lines = out.getvalue().count("\n")
    log.beat()
    assert out.getvalue().count("\n") == lines  # closed: the stage is over


def test_timeline_parts_add_up_to_the_total() -> None:
    timeline = Timeline(start=10.0)
    timeline.mark("a", at=12.5)
    timeline.mark("b", at=12.0)  # earlier than the previous moment: clamped, a part is never negative
    timeline.mark("c", at=20.0)
    assert timeline.parts == [("a", 2.5), ("b", 0.0), ("c", 7.5)]
    assert timeline.total() == 10.0 == sum(s for _, s in timeline.parts)
    assert timeline.summary() == "total 10.0 s: a 2.5 s, b 0.0 s, c 7.5 s"
    assert timeline.as_dict() == {"a": 2.5, "b": 0.0, "c": 7.5, "total": 10.0}
