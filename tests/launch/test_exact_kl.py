"""launch/exact_kl.py end to end as subprocesses (python and torchrun): its JSON, its output, its errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shardkl.apps.experiment import ExperimentConfig
from shardkl.apps.runtime import usable_cpus

# the launcher as subprocesses (python and torchrun): in `pytest -m slow`
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = str(ROOT / "launch" / "exact_kl.py")
SEED = str(ROOT / "configs" / "seed.toml")


def _run(
    args: list[str], nproc: int | None, cwd: Path = ROOT, timeout: float = 240, **env: str
) -> subprocess.CompletedProcess[str]:
    # OMP_NUM_THREADS set: torchrun prints its notice only when it is not (the launcher sets its own thread count)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    if nproc is None:
        cmd = [sys.executable, LAUNCHER, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               LAUNCHER, *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    runs = {}
    for world in (1, 2, 3):
        # each run in its own folder, writing its JSON where it does by default
        cwd = tmp_path_factory.mktemp(f"w{world}")
        proc = _run(["--config", SEED], None if world == 1 else world, cwd=cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads((cwd / "results" / "exact_kl.json").read_text())
        runs[world] = {"json": result, "stdout": proc.stdout, "stderr": proc.stderr}
    return runs


def test_seed_config_json_has_the_contract_fields(seed_runs: dict[int, dict]) -> None:
    r = seed_runs[2]["json"]
    for key in ("world_size", "vocab_size", "tokens", "exact_kl", "estimators", "time_s", "peak_mem_bytes"):
        assert key in r
    assert r["launcher"] == "torchrun" and seed_runs[1]["json"]["launcher"] == "python"
    assert r["world_size"] == 2 and r["vocab_size"] == 1000 and r["tokens"] == 50
    assert r["vocab_per_rank"] == [500, 500] and seed_runs[3]["json"]["vocab_per_rank"] == [334, 333, 333]
    for name in ("k1", "k2", "k3"):
        assert set(r["estimators"][name]) >= {"mean", "bias", "std", "rel_error"}
    assert r["peak_mem_bytes"] > 0 and r["time_s"] > 0


def test_threads_per_rank_are_the_cpus_divided_by_the_local_ranks(seed_runs: dict[int, dict]) -> None:
    for world in (1, 2, 3):
        assert seed_runs[world]["json"]["threads"] == max(1, usable_cpus() // world)


def test_what_does_not_depend_on_the_world_size(seed_runs: dict[int, dict]) -> None:
    exact = [seed_runs[w]["json"]["exact_kl"] for w in (1, 2, 3)]
    assert 0.004 <= exact[0] <= 0.006
    # the printed exact KL is the same line for every world size
    lines = {w: next(line for line in seed_runs[w]["stdout"].splitlines() if "exact KL(reference||new)" in line)
             for w in (1, 2, 3)}
    assert lines[1] == lines[2] == lines[3] == "exact KL(reference||new) per token, mean: 4.961407e-03"
    for name in ("k1", "k2", "k3"):
        means = [seed_runs[w]["json"]["estimators"][name]["mean"] for w in (1, 2, 3)]
        # same tokens on every world size: only float32 rounding of log-probs of size ~log(V) differs
        assert max(abs(m - means[0]) for m in means) <= 1e-6


def test_output_is_a_table_on_stdout_and_one_progress_line_per_stage_on_stderr(seed_runs: dict[int, dict]) -> None:
    for world in (1, 2, 3):
        out, err = seed_runs[world]["stdout"], seed_runs[world]["stderr"]
        assert out.splitlines()[3].split() == ["estimator", "mean", "bias", "std", "std", "error", "|bias|/KL"]
        assert "|bias|/KL: the bias relative to the exact KL" in out
        lines = err.splitlines()
        # rank 0 only: each line once, nothing from torchrun, no "still ..." line for a stage this short
        assert [line.split(":")[0].split(" in ")[0] for line in lines] == [
            "[shardkl] generating logits", "[shardkl] sampling 1 token(s) per position from the reference (Gumbel-max)",
            "[shardkl] computing exact KL and estimators", "[shardkl] done", "[shardkl] wrote results/exact_kl.json",
        ], err
        assert "\x1b[" not in out + err


def test_estimator_means_agree_with_exact_kl_within_standard_error(seed_runs: dict[int, dict]) -> None:
    r = seed_runs[2]["json"]
    for name, s in r["estimators"].items():
        assert abs(s["mean"] - r["exact_kl"]) <= 3 * s["std_error"], (name, s)


def test_many_samples_bfloat16_threads_and_no_output(tmp_path: Path) -> None:
    path = tmp_path / "est.json"
    config = str(ROOT / "configs" / "estimators.toml")
    proc = _run(["--config", config, "--dtype", "bfloat16", "--threads", "1", "--output", str(path)], 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(path.read_text())
    assert r["tokens"] == 200 and r["samples"] == 64 and r["dtype"] == "bfloat16" and r["threads"] == 1
    for name, s in r["estimators"].items():
        assert abs(s["mean"] - r["exact_kl"]) <= 3 * s["std_error"], (name, s)
    # Schulman: k3 has the variance of k2 and far less than k1
    assert r["estimators"]["k3"]["std"] < 0.2 * r["estimators"]["k1"]["std"]
    proc = _run(["--vocab-size", "1", "--output", ""], 2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" not in proc.stderr and not (tmp_path / "results").exists()
    assert "world_size=2  vocab=1" in proc.stdout  # a vocabulary smaller than the world size: an empty shard


def test_help_lists_every_key_with_its_default() -> None:
    proc = _run(["--help"], None)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for field in dataclasses.fields(ExperimentConfig):
        assert f"--{field.name}" in text and f"default: {field.default}" in text, field.name
    for key in ("--output", "--threads", "--progress_s", "--config FILE.toml"):
        assert key in text
    assert "default: results/exact_kl.json" in text
    # docs/launchers.md has a row for every key
    docs = (ROOT / "docs" / "launchers.md").read_text()
    keys = set(re.findall(r"\[--(\w+) ", text)) - {"config"}
    assert len(keys) == 13, keys
    for key in keys:
        assert f"| `{key}` |" in docs, key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vocab-size", "many"], "vocab_size must be int, got 'many'"),
        (["--config", "configs/missing.toml"], "config file not found: configs/missing.toml"),
        (["--colour", "red"], "unknown option --colour"),
        (["--dtype", "int8"], "dtype must be one of"),
        (["--threads", "-1"], "threads must be >= 0"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(args: list[str], message: str) -> None:
    proc = _run(args, None)
    assert proc.returncode == 2
    assert proc.stderr.startswith("exact_kl.py: error: ") and proc.stderr.strip().count("\n") == 0
    assert message in proc.stderr


def test_bad_configuration_under_torchrun_fails_on_every_rank() -> None:
    proc = _run(["--vocab-size", "0"], 2, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("exact_kl.py: error:")]
    assert lines == ["exact_kl.py: error: vocab_size must be >= 1, got 0"] * 2
    assert "exitcode  : 2" in proc.stderr
