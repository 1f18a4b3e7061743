"""The seed experiment as a Ray Train job (application code behind ``launch/ray_kl.py``).

- :func:`run_on_ray` (driver side) runs :func:`shardkl.apps.experiment.run_rank` on ``num_workers`` Ray Train workers.
  Ray Train's ``TorchTrainer`` places the workers, creates the ``torch.distributed`` process group (gloo on CPU,
  NCCL on GPU) and tears everything down on failure; :func:`train_loop_per_worker` is the per-worker function
  and rank 0's return value comes back as ``Result.return_value`` (no checkpoint, no ``ray.train.report``).
  A small progress actor (:class:`ProgressBoard`) records each rank's pid and every stage it reaches with the
  time it reached it, so the driver prints each stage once, in order, with its own time, and can name the rank of a
  worker that died or hung. ``fit()`` runs in a thread while the driver watches a deadline, so a failure becomes a
  :class:`RayJobError` within the configured timeout instead of a silent hang. ``on_stage`` runs a callable on the
  workers at each stage (the failure tests kill or stall a worker with it).
- :func:`start_ray` is ``ray.init`` for a launcher: Ray's own log lines go to Ray's log files unless asked for.

``ray`` is imported lazily. For shardkl on your own Ray worker group, see :mod:`shardkl.integrations.ray`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

from shardkl.apps.experiment import STAGES as EXPERIMENT_STAGES
from shardkl.apps.experiment import ExperimentConfig, run_rank
from shardkl.apps.progress import StageLog, Timeline
from shardkl.options import set_collective_timeout

STAGES = ("ready", *EXPERIMENT_STAGES)
"""Stages a worker reports, in order: its process group is up, then those of :func:`run_rank`."""

StageHook = Callable[[int, str], None]
"""``on_stage(rank, stage)``: run on a worker as it reaches each of :data:`STAGES`, after the board has recorded it."""

_POLL_S = 0.2


def _collective_timeout_s(config: ExperimentConfig) -> int:
    """80% of the job's timeout: a rank whose peer stalled reports it before the driver's own deadline fires."""
    return max(1, math.floor(0.8 * config.timeout_s))


class RayJobError(RuntimeError):
    """A Ray job of shardkl failed; the message is one line naming the rank(s) and the cause."""


class ProgressBoard:
    """What every worker of one job has reached; a Ray actor created by :func:`run_on_ray`.

    Each rank's entry holds its pid and host and the history of the stages it reached, each as
    ``(stage, message, wall-clock time)``, so the driver can print every stage once, in order, with its own time,
    however rarely it polls.
    """

    def __init__(self) -> None:
        self._workers: dict[int, dict[str, Any]] = {}

    def mark(self, rank: int, stage: str, message: str, pid: int, host: str, at: float) -> None:
        entry = self._workers.setdefault(rank, {"pid": pid, "host": host, "history": []})
        entry["history"].append((stage, message, at))
        entry["stage"] = stage

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return {rank: {**entry, "history": list(entry["history"])} for rank, entry in self._workers.items()}


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train per-worker function: :func:`shardkl.apps.experiment.run_rank` on the group Ray Train set up.

    Ray pickles it by reference, so it lives in the package (a function defined in a script is not importable on
    the workers). Rank 0's return value becomes ``Result.return_value`` on the driver.

    Args:
        config: ``{"experiment": dataclasses.asdict(ExperimentConfig), "use_gpu": bool, "board": ProgressBoard
            actor handle or None, "on_stage": StageHook or None, "progress_s": seconds between the progress lines
            that rank 0 prints itself in local mode (no board), or None}``, as built by :func:`run_on_ray`.

    Returns:
        :func:`shardkl.apps.experiment.run_rank`'s result dictionary (the same on every rank).
    """
    import ray.train
    import torch.distributed as dist

    experiment = ExperimentConfig(**config["experiment"])
    # shardkl's collectives wait as long as the process group's (run_on_ray's TorchConfig)
    set_collective_timeout(_collective_timeout_s(experiment))
    board = config.get("board")
    on_stage: StageHook | None = config.get("on_stage")
    rank = ray.train.get_context().get_world_rank()
    group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    device = torch.device("cpu")
    if config.get("use_gpu"):
        import ray.train.torch

        device = ray.train.torch.get_device()
    log = None
    if config.get("progress_s") is not None and rank == 0:
        log = StageLog(interval_s=config["progress_s"])

    def reach(stage: str, message: str) -> None:
        if log is not None and stage != "ready":
            log.stage(stage, message)
        if board is not None:
            import ray

            ray.get(board.mark.remote(rank, stage, message, os.getpid(), socket.gethostname(), time.time()), timeout=30)
        if on_stage is not None:
            on_stage(rank, stage)

    try:
        reach("ready", "process group ready")
        return run_rank(experiment, group=group, device=device, progress=reach)
    finally:
        if log is not None:
            log.close()


def quiet_ray_logging(verbose: bool) -> None:
    """Ray's Python log lines in this process at INFO with ``verbose``, else only its errors; no colour codes on a
    stream that is not a terminal.

    Ray colours the lines it forwards (and its "[repeated Nx across cluster]" notes, whatever ``RAY_COLOR_PREFIX``
    says) with colorama; colorama's own ``init()`` strips the codes from streams that are not terminals.
    """
    # importing Ray configures its logger (so the level is set after) and puts its copy of colorama on the path
    import ray.train  # noqa: F401

    logging.getLogger("ray").setLevel(logging.INFO if verbose else logging.ERROR)
    try:
        import colorama
    except ImportError:  # a Ray without colorama colours nothing
        return
    colorama.init()


def start_ray(address: str = "", *, verbose: bool = False) -> str:
    """``ray.init`` for a launcher: join ``address`` (``auto``, ``HOST:PORT``, ``ray://…``) or, if empty, start an
    embedded local instance (``address="local"``, so a ``ray start`` cluster on this machine is never joined by
    accident).

    Without ``verbose``, the workers' output and Ray's own messages stay in Ray's log files instead of being
    forwarded to this process's stderr, and the driver logs only Ray's errors.

    Returns:
        The folder of Ray's log files for this session (on the head node when joining a cluster).
    """
    import ray

    quiet_ray_logging(verbose)
    level = logging.INFO if verbose else logging.ERROR
    if address:
        context = ray.init(address=address, log_to_driver=verbose, logging_level=level)
    else:
        context = ray.init(address="local", include_dashboard=False, log_to_driver=verbose, logging_level=level)
    session = context.address_info.get("session_dir") or ""
    return os.path.join(session, "logs") if session else "(unknown)"


def start_failure(address: str, exc: BaseException) -> str:
    """The one line a launcher prints when :func:`start_ray` raised (connection, authentication, resources), instead
    of Ray's traceback."""
    text = str(exc).strip()
    where = "join Ray at " + address if address else "start Ray"
    return f"could not {where}: {type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _first_line(text: str, limit: int = 300) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _death_detail(err: BaseException) -> str | None:
    """``None`` if ``err`` is not a dead worker process, else the exit detail Ray gives for it."""
    from ray.exceptions import RayActorError

    failure = getattr(err, "health_check_failure", None)
    if failure is None and not isinstance(err, RayActorError):
        return None
    text = str(failure if failure is not None else err)
    detail = re.search(r"Worker exit detail: (.*?)(\. |$)", text, flags=re.MULTILINE)
    return _first_line(detail.group(1), 160) if detail else "the Ray health check of its actor failed"


def _describe_failure(exc: BaseException, workers: dict[int, dict[str, Any]], num_workers: int) -> str:
    """One line naming the failed rank(s) and the cause of a Ray Train failure; dead workers first, then the ranks
    whose collectives failed because of them."""
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(exc, WorkerGroupError) and exc.worker_failures:
        died, raised = [], []
        for rank, err in sorted(exc.worker_failures.items()):
            detail = _death_detail(err)
            if detail is not None:
                died.append(f"rank {rank} died: worker process exited unexpectedly ({detail})")
            else:
                raised.append(f"rank {rank} raised {type(err).__name__}: {_first_line(str(err), 200)}")
        silent = [str(r) for r in range(num_workers) if r not in exc.worker_failures]
        quiet = [f"no error from rank(s) {', '.join(silent)} (hung, or stopped by Ray)"] if silent else []
        return "; then ".join(["; ".join(part) for part in (died, raised, quiet) if part])
    cause: BaseException = exc.controller_failure if isinstance(exc, ControllerError) else exc
    detail = _death_detail(cause)
    pid_match = re.search(r"\bpid: (\d+)", str(cause))
    if detail is not None and pid_match:
        pid = int(pid_match.group(1))
        by_pid = {info["pid"]: rank for rank, info in workers.items()}
        who = f"rank {by_pid[pid]}" if pid in by_pid else "a worker"
        return f"{who} (pid {pid}) died: worker process exited unexpectedly ({detail})"
    return f"{type(cause).__name__}: {_first_line(str(cause))}"


def _stages(workers: dict[int, dict[str, Any]], num_workers: int) -> str:
    return ", ".join(f"rank {r}={workers[r]['stage'] if r in workers else 'starting'}" for r in range(num_workers))


def _reached(workers: dict[int, dict[str, Any]], num_workers: int, stage: str) -> float | None:
    """The wall-clock time at which the last of ``num_workers`` ranks reached ``stage``, or ``None`` if one has not."""
    times = []
    for rank in range(num_workers):
        at = next((t for s, _, t in workers.get(rank, {}).get("history", []) if s == stage), None)
        if at is None:
            return None
        times.append(at)
    return max(times)


class _Watcher:
    """The driver's view of the board: prints each stage once, in order, and marks the run's timeline."""

    def __init__(self, num_workers: int, log: StageLog, timeline: Timeline) -> None:
        self.num_workers = num_workers
        self.log = log
        self.timeline = timeline
        self.workers: dict[int, dict[str, Any]] = {}
        self.shown_rank0 = 0
        self.ready = self.finished = False
        # worker times are wall-clock; the timeline's are perf_counter
        self._offset = time.time() - time.perf_counter()

    def _at(self, wall: float) -> float:
        return min(wall - self._offset, time.perf_counter())

    def update(self, workers: dict[int, dict[str, Any]]) -> bool:
        """Take a new snapshot; returns whether any worker reached a new stage."""
        changed = sum(len(w["history"]) for w in workers.values()) != sum(
            len(w["history"]) for w in self.workers.values()
        )
        self.workers = workers
        n = self.num_workers
        ready_at = _reached(workers, n, "ready")
        if not self.ready and ready_at is not None:
            self.ready = True
            after = self.timeline.mark("worker start", at=self._at(ready_at))
            self.log.stage("running", f"workers ready ({n}/{n}) after {after:.1f} s")
        if self.ready:
            history = workers.get(0, {}).get("history", [])
            for stage, message, _ in history[self.shown_rank0 :]:
                if stage != "ready":
                    self.log.stage(stage, message)
            self.shown_rank0 = len(history)
        done_at = _reached(workers, n, "done")
        if self.ready and not self.finished and done_at is not None:
            self.finished = True
            after = self.timeline.mark("experiment", at=self._at(done_at))
            self.log.stage("closing the Ray Train run", f"workers finished ({n}/{n}) after {after:.1f} s")
        return changed


def run_on_ray(
    config: ExperimentConfig,
    *,
    num_workers: int,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    storage_path: str | None = None,
    startup_timeout_s: float | None = None,
    log: StageLog | None = None,
    timeline: Timeline | None = None,
    on_stage: StageHook | None = None,
    progress_s: float = 5.0,
) -> dict[str, Any]:
    """Run the experiment of :func:`shardkl.apps.experiment.run_rank` on ``num_workers`` Ray Train workers.

    Call it after ``ray.init`` (local instance or an existing cluster). Each worker holds one vocabulary
    shard; the process group is gloo on CPU workers and NCCL with ``use_gpu`` (``config.backend`` may name it
    explicitly). ``FailureConfig(max_failures=0)``: a failure is reported, not retried.

    ``num_workers=0`` is Ray Train's local mode: no Ray cluster, :func:`train_loop_per_worker` runs in this
    process, and under ``torchrun`` Ray Train creates the process group from torchrun's environment (every
    torchrun rank calls this function and gets the result). Rank 0 then prints its own progress lines; there is no
    progress board or driver deadline, and collectives use torch's default timeout.

    Args:
        config: the experiment; ``config.timeout_s`` bounds the computation once the workers are up:
            collectives time out after 80% of it, the driver gives up after all of it without progress.
        num_workers: Ray Train workers, one vocabulary shard each; 0 for local mode (see above).
        use_gpu: one GPU per worker and NCCL.
        cpus_per_worker: CPUs reserved per worker.
        storage_path: Ray Train's run storage (default: a temporary directory, removed afterwards).
        startup_timeout_s: how long the workers may take to start, e.g. while the cluster scales up (default: the
            larger of 120 s and ``config.timeout_s``).
        log: where the driver's progress lines go (default: a :class:`StageLog` on stderr, closed on return).
        timeline: marked with ``worker start``, ``experiment`` and ``Ray Train teardown``; its start is the zero of
            the ``after N s`` times (default: a new one, started now).
        on_stage: run on each worker as it reaches each of :data:`STAGES` (pickled to the workers; the failure tests
            kill or stall a worker from here).
        progress_s: seconds between the progress lines of a long stage in local mode (the default ``log`` uses it too).

    Returns:
        The result dictionary of :func:`shardkl.apps.experiment.run_rank` (rank 0's, the same on every rank).

    Raises:
        ValueError: a bad argument, before anything starts.
        RayJobError: a worker died, raised or timed out; one line naming the rank(s) and the cause, raised
            within about ``config.timeout_s`` of the last progress. When the driver's own deadline fires, the
            abandoned Ray Train run is only stopped by ``ray.shutdown()`` or the driver's exit (as the launcher
            does).
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    backend = config.backend if config.backend != "auto" else ("nccl" if use_gpu else "gloo")
    if backend == "nccl" and not use_gpu:
        raise ValueError("backend nccl needs GPU workers (use_gpu=True)")
    startup_limit = startup_timeout_s if startup_timeout_s is not None else max(120.0, config.timeout_s)
    own_log = log is None
    local_mode = num_workers == 0
    board = None if local_mode else ray.remote(num_cpus=0)(ProgressBoard).remote()
    resources = {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    own_storage = storage_path is None
    storage = storage_path or tempfile.mkdtemp(prefix="shardkl-ray-")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "experiment": dataclasses.asdict(config),
            "use_gpu": use_gpu,
            "board": board,
            "on_stage": on_stage,
            "progress_s": progress_s if local_mode else None,
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"shardkl-{uuid.uuid4().hex[:8]}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=0),
        ),
        # collectives time out first, so that the rank that saw the timeout reports it before the driver's deadline
        torch_config=TorchConfig(backend=backend, timeout_s=_collective_timeout_s(config)),
    )
    if local_mode:
        try:
            return trainer.fit().return_value
        finally:
            if own_storage:
                shutil.rmtree(storage, ignore_errors=True)
    log = log or StageLog(interval_s=progress_s)
    timeline = timeline or Timeline()
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the watching thread
            outcome["error"] = exc

    log.stage("starting workers", f"starting {num_workers} {'GPU' if use_gpu else 'CPU'} worker(s), backend {backend}")
    thread = threading.Thread(target=fit, name="shardkl-ray-fit", daemon=True)
    watcher = _Watcher(num_workers, log, timeline)
    thread.start()
    last_progress = time.monotonic()
    try:
        while thread.is_alive():
            thread.join(_POLL_S)
            try:
                if watcher.update(ray.get(board.snapshot.remote(), timeout=10)):
                    last_progress = time.monotonic()
            except ray.exceptions.GetTimeoutError:
                continue
            limit = config.timeout_s if watcher.ready else startup_limit
            if thread.is_alive() and time.monotonic() - last_progress > limit:
                workers = watcher.workers
                if not watcher.ready:
                    raise RayJobError(
                        f"workers did not start within {limit:g} s: rank(s) "
                        f"{', '.join(str(r) for r in range(num_workers) if workers.get(r, {}).get('stage') is None)} "
                        f"not ready (asked for {num_workers} x {resources}; available: {ray.available_resources()})"
                    )
                behind = [r for r in range(num_workers) if workers.get(r, {}).get("stage") != "done"]
                raise RayJobError(
                    f"timed out after {limit:g} s without progress from rank(s) "
                    f"{', '.join(map(str, behind))} ({_stages(workers, num_workers)})"
                )
        try:
            watcher.update(ray.get(board.snapshot.remote(), timeout=10))
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            pass
        if "error" in outcome:
            raise RayJobError(
                f"{_describe_failure(outcome['error'], watcher.workers, num_workers)} "
                f"({_stages(watcher.workers, num_workers)})"
            ) from outcome["error"]
        result = outcome["result"].return_value
        if not isinstance(result, dict):
            raise RayJobError(f"rank 0 returned no result (got {type(result).__name__})")
        after = timeline.mark("Ray Train teardown")
        log.end_stage(f"Ray Train run closed after {after:.1f} s")
        return result
    finally:
        log.end_stage()
        if own_log:
            log.close()
        ray.kill(board)
        if own_storage:  # also after a driver timeout: the run is abandoned, nothing in it is needed
            shutil.rmtree(storage, ignore_errors=True)
