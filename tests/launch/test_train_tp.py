"""launch/train_tp.py end to end under torchrun: precedence, the verify report, the table, where the JSON goes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from shardkl.apps.grpo import STEP_COLUMNS, TPConfig  # noqa: E402

# the launcher as subprocesses under torchrun: in `pytest -m slow`
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = str(ROOT / "launch" / "train_tp.py")


def _run(args: list[str], nproc: int | None, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([sys.executable, *prefix, LAUNCHER, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_train_tp_under_torchrun(tmp_path: Path) -> None:
    config = str(ROOT / "configs" / "tp" / "train_tp.toml")
    proc = _run(["--config", config, "--steps", "2", "--verify"], 2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the JSON lands in results/ under the working directory by default
    result = json.loads((tmp_path / "results" / "train_tp.json").read_text())
    # the command line (steps=2) wins over the file (steps=3), the file (response_len=10) over the defaults (12)
    assert result["world_size"] == 2 and len(result["steps"]) == 2
    assert result["config"]["response_len"] == 10 and result["config"]["estimator"] == "exact"
    first = result["steps"][0]
    assert first["kl_estimate"] == 0.0 and first["kl_term"] == 0.0 and first["exact_kl"] == 0.0
    for step in result["steps"]:
        assert step["kl_term"] == pytest.approx(result["config"]["kl_coef"] * step["kl_estimate"])
        assert step["exact_kl_after_update"] > 1e-3
    verify = result["verify"]
    assert verify["max_rel_diff_scalars"] < 1e-4, verify
    assert verify["max_abs_diff_grads"] < 1e-5 and verify["max_abs_diff_weights"] < 1e-5, verify
    # stdout: the table, then its legend; stderr: rank 0's progress lines, each once
    lines = proc.stdout.splitlines()
    assert lines[0].split() == list(STEP_COLUMNS)
    assert all(f"  {name}: " in proc.stdout for name in STEP_COLUMNS)
    assert "verify, largest differences from one process: max_rel_diff_scalars=" in proc.stdout
    progress = [line for line in proc.stderr.splitlines() if "still" not in line]
    assert [line.split(":")[0].split(" in ")[0] for line in progress] == [
        "[shardkl] training", "[shardkl] verifying", "[shardkl] done", "[shardkl] wrote results/train_tp.json"
    ], proc.stderr


def test_help_lists_every_key_and_bad_keys_exit_2(tmp_path: Path) -> None:
    proc = _run(["--help"], None, cwd=tmp_path)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for field in dataclasses.fields(TPConfig):
        assert f"--{field.name}" in text and f"default: {field.default}" in text, field.name
    for key in ("--verify", "--output", "--backend", "--threads", "--timeout_s"):
        assert key in text
    # docs/launchers.md names every key
    docs = (ROOT / "docs" / "launchers.md").read_text()
    for field in dataclasses.fields(TPConfig):
        assert f"`{field.name}`" in docs, field.name
    proc = _run(["--estimator", "k9"], None, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("train_tp.py: error: estimator must be one of exact, k1")
