"""Progress of an audit for people, on stderr: tokens scored, tokens per second, time left.

One process shows it (global rank 0, or the Ray driver). It counts this rank's own batches as they finish and the
shards the other data-parallel groups finish as their files appear in ``OUT/tokens/`` (the disk is the only thing
the groups share), so the count covers the whole job without any collective. On a terminal it is a tqdm bar; into a
file or a pipe it is a plain line every ``interval_s`` seconds once tokens are counted, so a log holds no carriage
returns (the launcher ends with one line of the job's own throughput). The Ray driver, which sees only whole shards,
starts its clock at the first shard it sees, so the time the workers take to start is not counted as scoring time.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from shardkl.apps.audit import store
from shardkl.apps.progress import PREFIX

_POLL_S = 1.0


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class AuditProgress:
    """Tokens scored out of those left to score in this run.

    Args:
        out: the audit's output folder (its ``tokens/`` is polled).
        todo: ``{shard: scored tokens}`` for the shards this run computes (all ranks together).
        interval_s: seconds between plain lines (not on a terminal); 0 for none but the last.
        stream: where to write (default ``sys.stderr``).
        terminal: draw a tqdm bar (default: whether ``stream`` is a terminal).
        clock: a monotonic clock (tests pass their own).
        start_at_first: start the rate's clock when the first tokens are counted (and count the rate from there)
            instead of now.
    """

    def __init__(
        self,
        out: str | Path,
        todo: Mapping[int, int],
        *,
        interval_s: float = 10.0,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        start_at_first: bool = False,
    ) -> None:
        self.out = Path(out)
        self.todo = dict(todo)
        self.total = sum(self.todo.values())
        self.counted = dict.fromkeys(self.todo, 0)
        self.interval_s = interval_s
        self._stream = stream
        self._clock = clock
        self._last_line = self._last_poll = clock()
        self._start: float | None = None if start_at_first else self._last_line
        self._done_at_start = 0
        self._lock = threading.Lock()
        self._bar: Any = None
        stream_now = stream or sys.stderr
        if terminal is None:
            terminal = bool(getattr(stream_now, "isatty", lambda: False)())
        if terminal and self.total:
            from tqdm import tqdm

            tqdm.set_lock(threading.RLock())  # one writer: no multiprocessing lock to release at exit
            self._bar = tqdm(total=self.total, desc="scoring", unit="tok", unit_scale=True, file=stream_now,
                             dynamic_ncols=True, leave=True, smoothing=0.1)

    @property
    def done(self) -> int:
        """Tokens counted so far."""
        return sum(self.counted.values())

    def advance(self, shard: int, tokens: int) -> None:
        """This rank scored ``tokens`` more tokens of ``shard``."""
        with self._lock:
            if shard in self.counted:
                self.counted[shard] = min(self.todo[shard], self.counted[shard] + tokens)
        self._show()

    def shard_done(self, shard: int) -> None:
        """``shard``'s file is written."""
        with self._lock:
            if shard in self.counted:
                self.counted[shard] = self.todo[shard]
        self._show()

    def poll(self, *, force: bool = False) -> None:
        """Count the shards whose files appeared since the last look (at most once a second unless ``force``)."""
        now = self._clock()
        if not force and now - self._last_poll < _POLL_S:
            return
        self._last_poll = now
        written = store.shards_on_disk(self.out)
        with self._lock:
            for shard in written & self.counted.keys():
                self.counted[shard] = self.todo[shard]
        self._show()

    def rate(self) -> float | None:
        """Tokens per second since the clock started, or ``None`` before anything could be timed."""
        if self._start is None:
            return None
        elapsed = self._clock() - self._start
        counted = self.done - self._done_at_start
        return counted / elapsed if elapsed > 0 and counted > 0 else None

    def line(self) -> str:
        """``scored 1,234 of 10,000 tokens (12%), 567 tokens/s, 00:15 left``."""
        done, rate = self.done, self.rate()
        share = 100 * done / self.total if self.total else 100.0
        text = f"scored {done:,} of {self.total:,} tokens ({share:.0f}%)"
        if rate is not None:
            text += f", {rate:,.0f} tokens/s"
            if done < self.total:
                text += f", {_duration((self.total - done) / rate)} left"
        return text

    def _show(self) -> None:
        if self._start is None and self.done > 0:
            self._start, self._done_at_start = self._clock(), self.done
        if self._bar is not None:
            with self._lock:
                delta = self.done - self._bar.n
                if delta > 0:
                    self._bar.update(delta)
            return
        now = self._clock()
        if self.interval_s > 0 and self.done > 0 and now - self._last_line >= self.interval_s:
            self._last_line = now
            print(f"{PREFIX} {self.line()}", file=self._stream or sys.stderr, flush=True)

    def close(self) -> None:
        """Count what is on disk and end the bar (the launcher prints the job's own last line)."""
        self.poll(force=True)
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["AuditProgress"]
