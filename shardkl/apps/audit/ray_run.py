"""The audit as a Ray Train job: the per-rank function of torchrun, run by ``TorchTrainer`` workers.

The driver (:func:`run_audit_on_ray`) has already planned the audit and written ``OUT/audit.json``; each worker plans
again from the same files (``check_out=False``) and runs :func:`shardkl.apps.audit.job.run_rank` on the process
group Ray Train created (gloo on CPU). ``FailureConfig(max_failures=k)``: when a worker dies, Ray Train stops the
others and starts the whole group again, up to ``k`` times; the new workers find the finished shards on disk and skip
them, so the job completes with the summary an uninterrupted run gives. The driver shows progress by watching the
shard files appear (so ``--out`` must be on storage the driver sees too: on a cluster, a shared file system) and
prints the report rank 0 returns.

``ray`` is imported lazily; the failure descriptions and Ray's quiet start-up are :mod:`shardkl.apps.ray_job`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from shardkl.apps.audit import store
from shardkl.apps.audit.config import AuditConfig
from shardkl.apps.audit.job import AuditResult, ShardHook
from shardkl.apps.audit.plan import AuditPlan
from shardkl.apps.audit.progress import AuditProgress

_POLL_S = 0.5


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train per-worker function: plan the audit again and run this rank's part of it.

    Relative paths of the config are the driver's: the worker works in the driver's folder where it exists (on one
    machine, or a cluster that mounts it at the same place).

    Args:
        loop_config: ``{"config": dataclasses.asdict(AuditConfig), "cwd": the driver's folder, "on_shard": ShardHook
            or None}``.

    Returns:
        On rank 0, ``{"summary": ..., "report": ...}`` (Ray Train hands rank 0's value to the driver); else ``None``.
    """
    import torch
    import torch.distributed as dist

    from shardkl.apps.audit.job import run_rank
    from shardkl.apps.audit.models import quiet_transformers
    from shardkl.apps.audit.plan import plan_audit
    from shardkl.options import set_collective_timeout

    config = AuditConfig(**loop_config["config"])
    if os.path.isdir(loop_config.get("cwd") or ""):
        os.chdir(loop_config["cwd"])
    set_collective_timeout(config.timeout_s)
    quiet_transformers()
    world = dist.get_world_size() if dist.is_initialized() else 1
    group = dist.group.WORLD if world > 1 else None
    plan = plan_audit(config, world_size=world, check_out=False)
    result = run_rank(plan, group=group, device=torch.device("cpu"), write_identity=False, launcher="ray",
                      threads=torch.get_num_threads(), on_shard=loop_config.get("on_shard"))
    return None if result is None else {"summary": result.summary, "report": result.report}


def run_audit_on_ray(
    plan: AuditPlan,
    *,
    on_shard: ShardHook | None = None,
    say: Callable[[str], None] | None = None,
    cpus_per_worker: float = 1.0,
) -> AuditResult:
    """Run a planned audit on ``config.num_workers`` Ray Train workers; call it after ``ray.init``.

    Args:
        plan: from :func:`shardkl.apps.audit.plan.plan_audit` on the driver, whose identity is already on disk.
        on_shard: see :data:`shardkl.apps.audit.job.ShardHook` (pickled to the workers; the tests kill one).
        say: where the driver's progress lines go.
        cpus_per_worker: CPUs Ray reserves per worker.

    Returns:
        The summary and report of rank 0.

    Raises:
        RayJobError: the workers failed more than ``max_failures`` times, or rank 0 returned nothing; one line.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from shardkl.apps.ray_job import RayJobError, _describe_failure

    config = plan.config
    tell = say or (lambda message: None)
    storage = tempfile.mkdtemp(prefix="shardkl-audit-ray-")
    trainer = TorchTrainer(
        # Ray's annotation says the function returns None; Ray Train hands rank 0's value back as return_value
        train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config={"config": dataclasses.asdict(config), "cwd": os.getcwd(), "on_shard": on_shard},
        scaling_config=ScalingConfig(num_workers=config.num_workers, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=f"shardkl-audit-{uuid.uuid4().hex[:8]}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
        torch_config=TorchConfig(backend="gloo", timeout_s=int(config.timeout_s)),
    )
    found = store.shards_on_disk(config.out)
    todo = {s: plan.shard_tokens(s) for s in range(plan.shards) if s not in found}
    tell(f"{plan.tokens:,} tokens in {len(plan.windows):,} windows of up to {config.context} tokens, "
         f"{plan.shards} shard(s){f', {len(found)} already on disk' if found else ''}; "
         f"{config.num_workers} Ray Train worker(s) in groups of {config.tp}")
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the driver's thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="shardkl-audit-fit", daemon=True)
    progress = AuditProgress(config.out, todo, interval_s=config.progress_s, start_at_first=True) if todo else None
    thread.start()
    try:
        while thread.is_alive():
            thread.join(_POLL_S)
            if progress is not None:
                progress.poll()
    finally:
        if progress is not None:
            progress.close()
        shutil.rmtree(storage, ignore_errors=True)
    if "error" in outcome:
        raise RayJobError(_describe_failure(outcome["error"], {}, config.num_workers)) from outcome["error"]
    value = outcome["result"].return_value
    if not isinstance(value, dict):
        raise RayJobError(f"rank 0 returned no result (got {type(value).__name__})")
    return AuditResult(value["summary"], value["report"])


class RayDriverOutput(io.TextIOBase):
    """What Ray prints on the driver's stdout while the job runs (not the report, which comes after).

    Ray's error listener prints a worker's death to the driver's stdout, ``(raylet) A worker died or was killed ...``,
    whatever ``log_to_driver`` says. With ``verbose`` such lines go to stderr as they are; otherwise each becomes one
    launcher line (the details are in Ray's log files), so that stdout holds the report alone.
    """

    def __init__(self, verbose: bool, say: Callable[[str], None]) -> None:
        super().__init__()
        self.verbose = verbose
        self.say = say
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        if not line.strip():
            return
        if self.verbose:
            print(line, file=sys.stderr, flush=True)
        elif "worker died" in line.lower() or "was killed" in line.lower():
            self.say("a Ray worker died; Ray Train restarts the workers (at most --max_failures times) and they skip "
                     "the shards already on disk")

    def flush(self) -> None:
        if self._pending:
            self._line(self._pending)
            self._pending = ""


@contextlib.contextmanager
def ray_driver_output(verbose: bool, say: Callable[[str], None]) -> Iterator[None]:
    """Route what Ray prints on the driver's stdout through :class:`RayDriverOutput` while the job runs.

    Args:
        verbose: forward Ray's lines to stderr as they are.
        say: where the launcher's own line goes.

    Returns:
        A context manager.
    """
    sink = RayDriverOutput(verbose, say)
    with contextlib.redirect_stdout(sink):
        try:
            yield
        finally:
            sink.flush()


def prepare_out(plan: AuditPlan) -> None:
    """The driver's part before the workers start: ``OUT/audit.json`` and no stale temporary files.

    Args:
        plan: the audit's plan, from the driver's :func:`shardkl.apps.audit.plan.plan_audit`.
    """
    store.write_identity(plan.config.out, plan.identity)
    store.remove_temporaries(plan.config.out)


def ray_env() -> None:
    """No usage statistics prompt or upload from an embedded instance."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


__all__ = [
    "RayDriverOutput", "prepare_out", "ray_driver_output", "ray_env", "run_audit_on_ray", "train_loop_per_worker",
]
