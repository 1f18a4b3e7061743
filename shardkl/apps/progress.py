"""Progress lines for people, on stderr: what the launchers print while they work.

:class:`StageLog` prints ``[shardkl] MESSAGE`` once when a stage starts and, while a stage runs longer than
``interval_s``, ``[shardkl]   still STAGE after N s`` every ``interval_s`` (a daemon thread keeps time), so a long
step shows a sign of life without a bar that would litter log files with carriage returns. Only rank 0 (or the Ray
driver) makes one. :class:`Timeline` records consecutive moments of a run so that its parts add up to its total.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

PREFIX = "[shardkl]"


class StageLog:
    """One line per stage on stderr, and a periodic line while a stage runs long.

    Args:
        interval_s: seconds between the lines of a long stage; 0 for none.
        stream: where to print (default: ``sys.stderr`` at the time of each line).
        clock: a monotonic clock in seconds (tests pass their own).
        heartbeat: start the thread that prints the periodic lines (tests call :meth:`beat` themselves).
    """

    def __init__(
        self,
        *,
        interval_s: float = 5.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        heartbeat: bool = True,
    ) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.interval_s = interval_s
        self._stream = stream
        self._clock = clock
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._stage_start = self._last_line = 0.0
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if heartbeat and interval_s > 0:
            self._thread = threading.Thread(target=self._run, name="shardkl-progress", daemon=True)
            self._thread.start()

    def say(self, message: str) -> None:
        """Print one line: ``[shardkl] message``."""
        print(f"{PREFIX} {message}", file=self._stream or sys.stderr, flush=True)

    def stage(self, name: str, message: str) -> None:
        """A stage begins: print ``message`` and time the stage as ``name`` for the periodic lines."""
        with self._lock:
            self.say(message)
            self._stage = name
            self._stage_start = self._last_line = self._clock()

    def end_stage(self, message: str | None = None) -> None:
        """The current stage is over (no more periodic lines); print ``message`` if given."""
        with self._lock:
            self._stage = None
            if message is not None:
                self.say(message)

    def beat(self) -> None:
        """Print ``still STAGE after N s`` if the current stage has gone ``interval_s`` without a line."""
        with self._lock:
            now = self._clock()
            if self._stage is None or self.interval_s <= 0 or now - self._last_line < self.interval_s:
                return
            self._last_line = now
            self.say(f"  still {self._stage} after {now - self._stage_start:.0f} s")

    def _run(self) -> None:
        tick = min(1.0, self.interval_s / 4)
        while not self._closed.wait(tick):
            self.beat()

    def close(self) -> None:
        """Stop the periodic lines."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._stage = None

    def __enter__(self) -> StageLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Timeline:
    """Consecutive moments of a run; each part is the time from the previous moment, so the parts add up.

    Args:
        start: the run's first moment on the ``time.perf_counter`` clock (a launcher takes it before its imports).
    """

    def __init__(self, start: float | None = None) -> None:
        self.start = time.perf_counter() if start is None else start
        self.parts: list[tuple[str, float]] = []
        self._last = self.start

    def mark(self, part: str, at: float | None = None) -> float:
        """End the part named ``part`` now (or at ``at``, clamped to be no earlier than the previous moment).

        Returns:
            Seconds since :attr:`start`.
        """
        moment = max(self._last, time.perf_counter() if at is None else at)
        self.parts.append((part, moment - self._last))
        self._last = moment
        return moment - self.start

    def elapsed(self) -> float:
        """Seconds since :attr:`start`."""
        return time.perf_counter() - self.start

    def total(self) -> float:
        """Seconds from :attr:`start` to the last moment marked: the sum of the parts."""
        return self._last - self.start

    def summary(self) -> str:
        """``total 20.6 s: a 2.1 s, b 2.7 s, ...``."""
        return f"total {self.total():.1f} s: " + ", ".join(f"{name} {s:.1f} s" for name, s in self.parts)

    def as_dict(self) -> dict[str, float]:
        """``{part: seconds, ..., "total": seconds}`` for JSON."""
        return {**dict(self.parts), "total": self.total()}


__all__ = ["PREFIX", "StageLog", "Timeline"]
