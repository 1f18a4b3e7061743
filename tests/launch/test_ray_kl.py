"""launch/ray_kl.py end to end: the numbers of launch/exact_kl.py, clean output whose times add up, failures.

Few Ray starts (each costs seconds on 2 cores): the seed run, a killed worker, a stalled worker. Every Ray instance
is local (``RAY_ADDRESS`` is removed) and shut down by the launcher; ``PYTHONPATH`` points Ray workers at this
checkout. The failure tests kill or stall a worker with a hook defined in ``_ray_kl_with_hook.py``, not in the
package.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.train.torch")

# a Ray instance per test or module: in `pytest -m slow`
pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RAY_LAUNCHER = str(ROOT / "launch" / "ray_kl.py")
TORCH_LAUNCHER = str(ROOT / "launch" / "exact_kl.py")
WITH_HOOK = str(Path(__file__).resolve().parent / "_ray_kl_with_hook.py")
SEED = str(ROOT / "configs" / "seed.toml")
ANSI = "\x1b["


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_COLOR_PREFIX")}
    pythonpath = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _launch(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _last_line(text: str) -> str:
    return next(line for line in reversed(text.splitlines()) if line.strip())


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ray")
    ray_proc = _launch([sys.executable, RAY_LAUNCHER, "--config", SEED, "--num-workers", "2"], cwd=out)
    assert ray_proc.returncode == 0, ray_proc.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    torch_proc = _launch([*torchrun, TORCH_LAUNCHER, "--config", SEED, "--output", str(out / "torchrun.json")],
                         cwd=out)
    assert torch_proc.returncode == 0, torch_proc.stderr[-3000:]
    # Ray Train's local mode under torchrun: the same worker function, the process group from torchrun
    local_proc = _launch([*torchrun, RAY_LAUNCHER, "--config", SEED, "--num-workers", "0", "--output",
                          str(out / "local.json")], cwd=out)
    assert local_proc.returncode == 0, local_proc.stderr[-3000:]
    return {
        "ray": json.loads((out / "results" / "ray_kl.json").read_text()),
        "torchrun": json.loads((out / "torchrun.json").read_text()),
        "local": json.loads((out / "local.json").read_text()),
        "ray_proc": ray_proc,
        "torch_proc": torch_proc,
        "local_proc": local_proc,
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
    # the same table as the torchrun launcher's, line for line but the timing line
    table = [line for line in seed_runs["ray_proc"].stdout.splitlines() if not line.startswith("time (KL call")]
    assert table == [line for line in seed_runs["torch_proc"].stdout.splitlines()
                     if not line.startswith("time (KL call")]


EXPECTED = [
    "starting Ray: embedded local instance",
    "Ray ready after",
    "starting 2 CPU worker(s), backend gloo",
    "workers ready (2/2) after",
    "generating logits: 50 tokens x 1000 vocab over 2 rank(s)",
    "sampling 1 token(s) per position from the reference (Gumbel-max)",
    "computing exact KL and estimators",
    "done in",
    "workers finished (2/2) after",
    "Ray Train run closed after",
    "shutting down Ray",
    "wrote results/ray_kl.json",
    "total",
]


def test_ray_launcher_stderr_is_its_own_progress_each_line_once_in_order(seed_runs: dict[str, Any]) -> None:
    err = seed_runs["ray_proc"].stderr
    assert ANSI not in err
    lines = err.splitlines()
    # nothing from Ray itself without --verbose: every line is the launcher's
    assert all(line.startswith("[shardkl] ") for line in lines), err
    stages = [line.removeprefix("[shardkl] ") for line in lines if not line.startswith("[shardkl]   still ")]
    assert len(stages) == len(EXPECTED), err
    for line, expected in zip(stages, EXPECTED, strict=True):
        assert line.startswith(expected), (line, expected)
    assert "; its logs: " in stages[1]


def test_ray_launcher_times_add_up(seed_runs: dict[str, Any]) -> None:
    err = seed_runs["ray_proc"].stderr
    # every "after N s" is since the launcher started, so they never go back
    afters = [float(m) for m in re.findall(r" after (\d+\.\d) s", err)]
    assert len(afters) == 4 and afters == sorted(afters), err
    timings = seed_runs["ray"]["timings_s"]
    parts = {k: v for k, v in timings.items() if k != "total"}
    assert list(parts) == ["start-up and imports", "Ray start", "worker start", "experiment", "Ray Train teardown",
                           "Ray shutdown"]
    assert sum(parts.values()) == pytest.approx(timings["total"], rel=1e-9)
    assert all(v >= 0 for v in parts.values()) and timings["total"] >= afters[-1]
    total = re.search(r"total (\d+\.\d) s: (.*)", _last_line(err))
    assert total is not None, err
    shown = [float(s) for s in re.findall(r" (\d+\.\d) s", total.group(2))]
    # each number is rounded to 0.1 s: the printed parts add up to the printed total within those roundings
    assert sum(shown) == pytest.approx(float(total.group(1)), abs=0.05 * (len(shown) + 1) + 1e-9)


def test_local_mode_prints_rank_0_progress_only(seed_runs: dict[str, Any]) -> None:
    lines = seed_runs["local_proc"].stderr.splitlines()
    assert [line.split(":")[0].split(" in ")[0] for line in lines] == [
        "[shardkl] generating logits", "[shardkl] sampling 1 token(s) per position from the reference (Gumbel-max)",
        "[shardkl] computing exact KL and estimators", "[shardkl] done",
        f"[shardkl] wrote {seed_runs['local_proc'].args[-1]}",
    ], lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-workers", "two"], "num_workers must be int, got 'two'"),
        (["--num-workers", "-1"], "num_workers must be >= 0"),
        (["--colour", "red"], "unknown option --colour"),
        (["--backend", "nccl"], "backend nccl needs --use-gpu"),
    ],
)
def test_bad_configuration_exits_2_with_one_line_before_starting_ray(args: list[str], message: str) -> None:
    proc = _launch([sys.executable, RAY_LAUNCHER, *args], cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.startswith("ray_kl.py: error: ") and message in line and "\n" not in line, line


def test_help_lists_the_ray_keys() -> None:
    proc = _launch([sys.executable, RAY_LAUNCHER, "--help"], cwd=ROOT, timeout=60)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for key in ("--num_workers", "--address", "--use_gpu", "--verbose", "--output", "--progress_s", "--vocab_size"):
        assert key in text
    assert "default: results/ray_kl.json" in text and "default: 2" in text
    # docs/ray.md has a row for every key of its own
    docs = (ROOT / "docs" / "ray.md").read_text()
    for key in ("num_workers", "address", "use_gpu", "verbose", "output", "progress_s"):
        assert f"| `{key}` |" in docs, key


def test_killed_worker_names_the_rank_in_one_last_line(tmp_path: Path) -> None:
    proc = _launch([sys.executable, WITH_HOOK, "1", "computing", "kill", "--config", SEED, "--num-workers", "2",
                    "--timeout-s", "60"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _last_line(proc.stderr)
    assert line.startswith("ray_kl.py: error: rank 1 died: worker process exited unexpectedly"), line
    assert "(rank 0=computing, rank 1=computing)" in line, line
    # no Ray noise even on failure: all but the last line are the launcher's progress
    assert all(x.startswith("[shardkl] ") for x in proc.stderr.splitlines()[:-1]), proc.stderr
    assert "Traceback" not in proc.stderr and ANSI not in proc.stderr
    assert not (tmp_path / "results").exists()


def test_hung_worker_is_reported_and_verbose_shows_ray_without_colour(tmp_path: Path) -> None:
    proc = _launch([sys.executable, WITH_HOOK, "1", "computing", "hang", "--config", SEED, "--num-workers", "2",
                    "--timeout-s", "20", "--verbose"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _last_line(proc.stderr)
    assert line.startswith("ray_kl.py: error:"), line
    # rank 0's collective times out (after 80% of --timeout-s) and the line names rank 1 as the silent one
    assert "rank 0 raised" in line and "no error from rank(s) 1" in line, line
    # --verbose: Ray's own lines are forwarded (prefixed with the actor), without colour codes into a pipe
    assert "(RayTrainWorker pid=" in proc.stderr or "(TrainController pid=" in proc.stderr, proc.stderr[-3000:]
    assert ANSI not in proc.stderr
