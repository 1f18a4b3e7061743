"""Ray: launch/ray_kl.py end to end against launch/exact_kl.py, the worker-group API on Ray actors, and failures.

Few and module-scoped: each Ray start costs seconds on 2 cores. Every Ray instance is local (``RAY_ADDRESS`` is
removed) and shut down by its owner; ``PYTHONPATH`` points Ray workers at this checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests._distributed import free_port, split_sizes
from tests.reference import reference

ray = pytest.importorskip("ray")
pytest.importorskip("ray.train.torch")

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
RAY_LAUNCHER = str(ROOT / "launch" / "ray_kl.py")
TORCH_LAUNCHER = str(ROOT / "launch" / "exact_kl.py")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SHARDKL_RAY_TEST_KILL")}
    pythonpath = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _ray_launch(args: list[str], timeout: float = 240, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, RAY_LAUNCHER, *args], cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def _ray_launch_timed(args: list[str], **env: str) -> tuple[int, list[tuple[float, str]]]:
    """Run the launcher, timestamping each stderr line as it arrives: ``(returncode, [(seconds, line)])``."""
    t0 = time.perf_counter()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen([sys.executable, RAY_LAUNCHER, *args], cwd=ROOT, env=_env(**env), text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        returncode = proc.wait(timeout=240)
    return returncode, lines


def _seconds_at(lines: list[tuple[float, str]], prefix: str) -> float:
    return next(t for t, line in lines if line.startswith(prefix))


def _last_line(text: str) -> str:
    return next(line for line in reversed(text.splitlines()) if line.strip())


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ray")
    ray_proc, _ = _ray_launch(["--config", "configs/seed.toml", "--num-workers", "2", "--output",
                                   str(out / "ray.json")])
    assert ray_proc.returncode == 0, ray_proc.stderr[-3000:]
    torch_proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", TORCH_LAUNCHER,
         "--config", "configs/seed.toml", "--output", str(out / "torchrun.json")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240,
    )
    assert torch_proc.returncode == 0, torch_proc.stderr[-3000:]
    # Ray Train's local mode under torchrun: the same worker function, the process group from torchrun
    local_proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", RAY_LAUNCHER,
         "--config", "configs/seed.toml", "--num-workers", "0", "--output", str(out / "local.json")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240,
    )
    assert local_proc.returncode == 0, local_proc.stderr[-3000:]
    return {
        "ray": json.loads((out / "ray.json").read_text()),
        "torchrun": json.loads((out / "torchrun.json").read_text()),
        "local": json.loads((out / "local.json").read_text()),
        "ray_proc": ray_proc,
    }


def test_ray_launcher_matches_torchrun_launcher(seed_runs: dict[str, Any]) -> None:
    r, t = seed_runs["ray"], seed_runs["torchrun"]
    assert r["launcher"] == "ray" and t["launcher"] == "torchrun"
    assert r["world_size"] == 2 and r["vocab_per_rank"] == [500, 500] and r["tokens"] == 50
    assert 0.004 <= r["exact_kl"] <= 0.006
    assert abs(r["exact_kl"] - t["exact_kl"]) <= 1e-6 * t["exact_kl"]
    for name in ("k1", "k2", "k3"):
        assert abs(r["estimators"][name]["mean"] - t["estimators"][name]["mean"]) <= 1e-6
    local = seed_runs["local"]
    assert local["launcher"] == "ray-local" and local["world_size"] == 2
    assert abs(local["exact_kl"] - t["exact_kl"]) <= 1e-6 * t["exact_kl"]
    proc = seed_runs["ray_proc"]
    assert "exact KL(reference||new) per token, mean:" in proc.stdout
    stages = [line for line in proc.stderr.splitlines() if line.startswith("[shardkl] ")]
    for stage in ("starting cluster", "workers ready (2/2)", "computing (2/2)", "finished in"):
        assert any(stage in line for line in stages), (stage, stages)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-workers", "two"], "num_workers must be an int >= 0, got 'two'"),
        (["--colour", "red"], "unknown option --colour"),
        (["--backend", "nccl"], "backend nccl needs --use-gpu"),
    ],
)
def test_bad_configuration_exits_2_with_one_line_before_starting_ray(args: list[str], message: str) -> None:
    proc, _ = _ray_launch(args, timeout=60)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.startswith("ray_kl.py: error: ") and message in line and "\n" not in line, line


def test_killed_worker_names_the_rank_and_fails_fast() -> None:
    returncode, lines = _ray_launch_timed(["--config", "configs/seed.toml", "--num-workers", "2", "--timeout-s", "60"],
                                          SHARDKL_RAY_TEST_KILL="1:computing")
    text = "\n".join(line for _, line in lines)
    assert returncode == 1, text[-3000:]
    line = _last_line(text)
    assert line.startswith("ray_kl.py: error: rank 1 died: worker process exited unexpectedly"), line
    assert "Traceback" not in line
    # measured from the driver's "computing" line, so Ray's start-up time (load-dependent) does not count;
    # typically ~4 s on 2 cores, always well inside --timeout-s
    failed_after = _seconds_at(lines, "ray_kl.py: error:") - _seconds_at(lines, "[shardkl] computing")
    assert failed_after < 30, failed_after


def test_hung_worker_is_reported_within_the_timeout() -> None:
    returncode, lines = _ray_launch_timed(["--config", "configs/seed.toml", "--num-workers", "2", "--timeout-s", "20"],
                                          SHARDKL_RAY_TEST_KILL="1:computing:hang")
    text = "\n".join(line for _, line in lines)
    assert returncode == 1, text[-3000:]
    line = _last_line(text)
    assert line.startswith("ray_kl.py: error:"), line
    # rank 0's collective times out (after 80% of --timeout-s, 16 s) and the line names rank 1 as the silent one
    assert "rank 0" in line and "rank(s) 1" in line, line
    failed_after = _seconds_at(lines, "ray_kl.py: error:") - _seconds_at(lines, "[shardkl] computing")
    assert 16 <= failed_after < 20 + 5, failed_after  # the timeout, plus Ray's shutdown before the line is printed


# -- the worker-group API on Ray actors of our own ------------------------------------------------------------

VOCAB = 1003


class _PolicyShard:
    """A Ray actor of a user's worker group: joins a gloo group and holds one vocabulary shard."""

    def setup(self, rank: int, world: int, port: int) -> None:
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        self.rank = rank

    def kl(
        self, p_logits: torch.Tensor, q_logits: torch.Tensor, tokens: torch.Tensor, start: int
    ) -> dict[str, np.ndarray]:
        import torch.distributed as dist

        from shardkl import VocabLayout
        from shardkl.integrations.ray import kl_stats_on_worker

        layout = VocabLayout(start, start + p_logits.shape[-1], group=dist.group.WORLD)
        return kl_stats_on_worker(p_logits, q_logits, tokens, layout=layout)


@pytest.fixture(scope="module")
def ray_actors() -> Iterator[list[Any]]:
    import ray.cloudpickle

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor class is defined in this file
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": _env()["PYTHONPATH"], "OMP_NUM_THREADS": "1"}})
    try:
        actor_cls = ray.remote(num_cpus=1)(_PolicyShard)
        actors = [actor_cls.remote() for _ in range(2)]
        port = free_port()
        ray.get([a.setup.remote(rank, 2, port) for rank, a in enumerate(actors)], timeout=120)
        yield actors
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_stats_on_worker_matches_float64_reference(ray_actors: list[Any], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    p = torch.randn(3, 4, VOCAB, generator=g, dtype=torch.float64) * 2
    q = p + 0.05 * torch.randn(3, 4, VOCAB, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (3, 4), generator=g)
    sizes = split_sizes(VOCAB, 2)  # uneven: 601 + 402
    bounds = [(sum(sizes[:r]), sum(sizes[: r + 1])) for r in range(2)]
    refs = [a.kl.remote(p[..., lo:hi].to(dtype), q[..., lo:hi].to(dtype), tokens, lo)
            for a, (lo, hi) in zip(ray_actors, bounds, strict=True)]
    per_worker = ray.get(refs, timeout=120)
    expected = reference(p.to(dtype).double(), q.to(dtype).double(), tokens)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name in ("exact_kl", "entropy", "p_logprobs", "q_logprobs"):
        got = per_worker[0][name]
        assert isinstance(got, np.ndarray) and got.shape == (3, 4)
        assert got.dtype == (np.float64 if dtype == torch.float64 else np.float32)
        np.testing.assert_allclose(got, expected[name].numpy(), rtol=tol, atol=tol, err_msg=name)
        np.testing.assert_array_equal(per_worker[1][name], got)  # every rank returns the same arrays
    assert set(per_worker[0]) == {"exact_kl", "entropy", "p_logprobs", "q_logprobs", "k1", "k2", "k3"}
    log_ratio = per_worker[0]["q_logprobs"] - per_worker[0]["p_logprobs"]
    np.testing.assert_allclose(per_worker[0]["k1"], -log_ratio, rtol=1e-6, atol=1e-12)


# -- the driver's one-line error, from Ray Train's exceptions (no Ray start) -----------------------------------


def test_failure_line_puts_the_dead_rank_first_and_names_silent_ranks() -> None:
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from shardkl.apps.ray_job import _describe_failure

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
