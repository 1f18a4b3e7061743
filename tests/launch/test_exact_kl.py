"""End-to-end runs of launch/exact_kl.py as subprocesses (python and torchrun), checking its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = str(ROOT / "launch" / "exact_kl.py")


def _run(args: list[str], nproc: int | None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc is None:
        cmd = [sys.executable, LAUNCHER, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               LAUNCHER, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def seed_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("launch")
    results = {}
    for world in (1, 2, 3):
        path = out / f"w{world}.json"
        proc = _run(["--config", "configs/seed.toml", "--output", str(path)], None if world == 1 else world)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "exact KL(reference||new)" in proc.stdout
        results[world] = json.loads(path.read_text())
    return results


def test_seed_config_json_has_the_contract_fields(seed_results: dict[int, dict]) -> None:
    r = seed_results[2]
    for key in ("world_size", "vocab_size", "tokens", "exact_kl", "estimators", "time_s", "peak_mem_bytes"):
        assert key in r
    assert r["world_size"] == 2 and r["vocab_size"] == 1000 and r["tokens"] == 50
    assert r["vocab_per_rank"] == [500, 500]
    for name in ("k1", "k2", "k3"):
        assert set(r["estimators"][name]) >= {"mean", "bias", "std", "rel_error"}
    assert r["peak_mem_bytes"] > 0 and r["time_s"] > 0


def test_seed_exact_kl_is_about_half_delta_squared_and_independent_of_world_size(seed_results) -> None:
    exact = [seed_results[w]["exact_kl"] for w in (1, 2, 3)]
    assert 0.004 <= exact[0] <= 0.006
    assert max(abs(e - exact[0]) for e in exact) <= 1e-6 * exact[0]
    for name in ("k1", "k2", "k3"):
        means = [seed_results[w]["estimators"][name]["mean"] for w in (1, 2, 3)]
        # same tokens on every world size: only fp32 rounding of log-probs of size ~log(V) differs
        assert max(abs(m - means[0]) for m in means) <= 1e-6


def test_estimator_means_agree_with_exact_kl_within_standard_error(seed_results) -> None:
    r = seed_results[2]
    for name, s in r["estimators"].items():
        assert abs(s["mean"] - r["exact_kl"]) <= 3 * s["std_error"], (name, s)


def test_many_samples_and_bfloat16(tmp_path: Path) -> None:
    path = tmp_path / "est.json"
    proc = _run(["--config", "configs/estimators.toml", "--dtype", "bfloat16", "--output", str(path)], 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(path.read_text())
    assert r["tokens"] == 200 and r["samples"] == 64 and r["dtype"] == "bfloat16"
    for name, s in r["estimators"].items():
        assert abs(s["mean"] - r["exact_kl"]) <= 3 * s["std_error"], (name, s)
    # Schulman: k3 has the variance of k2 and far less than k1
    assert r["estimators"]["k3"]["std"] < 0.2 * r["estimators"]["k1"]["std"]


def test_vocab_smaller_than_world_size_still_works(tmp_path: Path) -> None:
    path = tmp_path / "tiny.json"
    proc = _run(["--vocab-size", "1", "--output", str(path)], 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(path.read_text())
    assert r["vocab_per_rank"] == [1, 0] and r["exact_kl"] == 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vocab-size", "many"], "vocab_size must be int"),
        (["--config", "configs/missing.toml"], "config file not found: configs/missing.toml"),
        (["--colour", "red"], "unknown option --colour"),
        (["--dtype", "int8"], "dtype must be one of"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(args: list[str], message: str) -> None:
    proc = _run(args, None)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_configuration_under_torchrun_fails_on_every_rank() -> None:
    proc = _run(["--vocab-size", "0"], 2, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("exact_kl.py: error:")]
    assert lines == ["exact_kl.py: error: vocab_size must be >= 1, got 0"] * 2
    assert "exitcode  : 2" in proc.stderr
