"""The seed experiment as a Ray Train job (application code behind ``launch/ray_kl.py``).

- :func:`run_on_ray` (driver side) runs :func:`shardkl.apps.experiment.run_rank` on ``num_workers`` Ray Train workers.
  Ray Train's ``TorchTrainer`` places the workers, creates the ``torch.distributed`` process group (gloo on CPU,
  NCCL on GPU) and tears everything down on failure; :func:`train_loop_per_worker` is the per-worker function
  and rank 0's return value comes back as ``Result.return_value`` (no checkpoint, no ``ray.train.report``).
  A small progress actor records each rank's stage and pid, so the driver can print progress and name the rank
  of a worker that died or hung. ``fit()`` runs in a thread while the driver watches a deadline, so a failure
  becomes a :class:`RayJobError` within the configured timeout instead of a silent hang.

``ray`` is imported lazily. For shardkl on your own Ray worker group, see :mod:`shardkl.integrations.ray`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

from shardkl.apps.config import ExperimentConfig
from shardkl.apps.experiment import run_rank

STAGES = ("ready", "computing", "done")
"""Stages a worker reports, in order: process group up, computing, finished."""

TEST_KILL_ENV = "SHARDKL_RAY_TEST_KILL"
"""Test hook, read by the driver: ``"RANK:STAGE"`` makes worker RANK SIGKILL itself on reaching STAGE (one of
``ready``, ``computing``); ``"RANK:STAGE:hang"`` makes it sleep forever instead. Used by the failure tests."""

_POLL_S = 0.5


class RayJobError(RuntimeError):
    """A Ray job of shardkl failed; the message is one line naming the rank(s) and the cause."""


class ProgressBoard:
    """Stage, pid and host of every worker of one job; a Ray actor created by :func:`run_on_ray`."""

    def __init__(self) -> None:
        self._workers: dict[int, dict[str, Any]] = {}

    def mark(self, rank: int, stage: str, pid: int, host: str) -> None:
        self._workers[rank] = {"stage": stage, "pid": pid, "host": host, "time": time.time()}

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return dict(self._workers)


def _parse_test_kill(value: str) -> tuple[int, str, str] | None:
    if not value:
        return None
    parts = value.split(":")
    if len(parts) < 2 or not parts[0].isdigit() or parts[1] not in STAGES[:2] or parts[2:] not in ([], ["hang"]):
        raise ValueError(f"{TEST_KILL_ENV} must be RANK:STAGE[:hang] with STAGE in ready|computing, got {value!r}")
    return int(parts[0]), parts[1], parts[2] if len(parts) == 3 else "kill"


def _reach(stage: str, rank: int, board: Any, test_kill: tuple[int, str, str] | None) -> None:
    """Record ``stage`` on the progress board, then fire the test hook if it targets this rank and stage."""
    if board is not None:
        import ray

        ray.get(board.mark.remote(rank, stage, os.getpid(), socket.gethostname()), timeout=30)
    if test_kill is not None and tuple(test_kill[:2]) == (rank, stage):
        if test_kill[2] == "hang":
            time.sleep(10**6)
        os.kill(os.getpid(), signal.SIGKILL)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train per-worker function: :func:`shardkl.apps.experiment.run_rank` on the group Ray Train set up.

    Ray pickles it by reference, so it lives in the package (a function defined in a script or test file is not
    importable on the workers). Rank 0's return value becomes ``Result.return_value`` on the driver.

    Args:
        config: ``{"experiment": dataclasses.asdict(ExperimentConfig), "use_gpu": bool, "board": ProgressBoard
            actor handle or None, "test_kill": (rank, stage, action) or None}``, as built by :func:`run_on_ray`.

    Returns:
        :func:`shardkl.apps.experiment.run_rank`'s result dictionary (the same on every rank).
    """
    import ray.train
    import torch.distributed as dist

    experiment = ExperimentConfig(**config["experiment"])
    board = config.get("board")
    test_kill = config.get("test_kill")
    rank = ray.train.get_context().get_world_rank()
    group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    device = torch.device("cpu")
    if config.get("use_gpu"):
        import ray.train.torch

        device = ray.train.torch.get_device()
    _reach("ready", rank, board, test_kill)
    _reach("computing", rank, board, test_kill)
    result = run_rank(experiment, group=group, device=device)
    _reach("done", rank, board, None)
    return result


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


def run_on_ray(
    config: ExperimentConfig,
    *,
    num_workers: int,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    storage_path: str | None = None,
    startup_timeout_s: float | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the experiment of :func:`shardkl.apps.experiment.run_rank` on ``num_workers`` Ray Train workers.

    Call it after ``ray.init`` (local instance or an existing cluster). Each worker holds one vocabulary
    shard; the process group is gloo on CPU workers and NCCL with ``use_gpu`` (``config.backend`` may name it
    explicitly). ``FailureConfig(max_failures=0)``: a failure is reported, not retried.

    ``num_workers=0`` is Ray Train's local mode: no Ray cluster, :func:`train_loop_per_worker` runs in this
    process, and under ``torchrun`` Ray Train creates the process group from torchrun's environment (every
    torchrun rank calls this function and gets the result). There is no progress board or driver deadline then;
    collectives use torch's default timeout.

    Args:
        config: the experiment; ``config.timeout_s`` bounds the computation once the workers are up:
            collectives time out after 80% of it, the driver gives up after all of it.
        num_workers: Ray Train workers, one vocabulary shard each; 0 for local mode (see above).
        use_gpu: one GPU per worker and NCCL.
        cpus_per_worker: CPUs reserved per worker.
        storage_path: Ray Train's run storage (default: a temporary directory, removed afterwards).
        startup_timeout_s: how long the workers may take to start, e.g. while the cluster scales up (default: the
            larger of 120 s and ``config.timeout_s``).
        log: called with one progress line per stage (default: print to stderr).

    Returns:
        The result dictionary of :func:`shardkl.apps.experiment.run_rank` (rank 0's, the same on every rank).

    Raises:
        ValueError: a bad argument or test hook, before anything starts.
        RayJobError: a worker died, raised or timed out; one line naming the rank(s) and the cause, raised
            within about ``config.timeout_s`` of the stage that failed. When the driver's own deadline fires, the
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
    test_kill = _parse_test_kill(os.environ.get(TEST_KILL_ENV, ""))
    startup_limit = startup_timeout_s if startup_timeout_s is not None else max(120.0, config.timeout_s)
    say = log or (lambda message: print(f"[shardkl] {message}", file=sys.stderr, flush=True))

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
            "test_kill": test_kill,
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"shardkl-{uuid.uuid4().hex[:8]}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=0),
        ),
        # collectives time out first, so that the rank that saw the timeout reports it before the driver's deadline
        torch_config=TorchConfig(backend=backend, timeout_s=max(1, math.floor(0.8 * config.timeout_s))),
    )
    if local_mode:
        try:
            return trainer.fit().return_value
        finally:
            if own_storage:
                shutil.rmtree(storage, ignore_errors=True)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the watching thread
            outcome["error"] = exc

    say(f"starting {num_workers} {'GPU' if use_gpu else 'CPU'} worker(s), backend {backend}")
    thread = threading.Thread(target=fit, name="shardkl-ray-fit", daemon=True)
    start = time.monotonic()
    thread.start()
    workers: dict[int, dict[str, Any]] = {}
    shown: set[str] = set()
    stage_start = start
    try:
        while thread.is_alive():
            thread.join(_POLL_S)
            try:
                workers = ray.get(board.snapshot.remote(), timeout=10)
            except ray.exceptions.GetTimeoutError:
                continue
            reached = [sum(STAGES.index(w["stage"]) >= STAGES.index(s) for w in workers.values()) for s in STAGES]
            for stage, count, label in zip(STAGES, reached, ("workers ready", "computing", "done"), strict=True):
                if count == num_workers and stage not in shown:
                    shown.add(stage)
                    stage_start = time.monotonic()
                    say(f"{label} ({num_workers}/{num_workers}) after {stage_start - start:.1f} s")
            started = "ready" in shown
            limit = config.timeout_s if started else startup_limit
            if thread.is_alive() and time.monotonic() - stage_start > limit:
                behind = [r for r in range(num_workers) if r not in workers or workers[r]["stage"] != "done"]
                if not started:
                    raise RayJobError(
                        f"workers did not start within {limit:g} s: rank(s) "
                        f"{', '.join(str(r) for r in range(num_workers) if r not in workers)} not ready "
                        f"(asked for {num_workers} x {resources}; available: {ray.available_resources()})"
                    )
                raise RayJobError(
                    f"timed out after {limit:g} s: no progress from rank(s) "
                    f"{', '.join(map(str, behind))} ({_stages(workers, num_workers)})"
                )
        if "error" in outcome:
            try:
                workers = ray.get(board.snapshot.remote(), timeout=10)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                pass
            raise RayJobError(
                f"{_describe_failure(outcome['error'], workers, num_workers)} ({_stages(workers, num_workers)})"
            ) from outcome["error"]
        result = outcome["result"].return_value
        if not isinstance(result, dict):
            raise RayJobError(f"rank 0 returned no result (got {type(result).__name__})")
        say(f"finished in {time.monotonic() - start:.1f} s")
        return result
    finally:
        ray.kill(board)
        if own_storage:  # also after a driver timeout: the run is abandoned, nothing in it is needed
            shutil.rmtree(storage, ignore_errors=True)
