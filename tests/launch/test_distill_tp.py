"""End-to-end runs of launch/distill_tp.py under torchrun at TP = 2, checking its JSON and its own verification."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# the launcher as subprocesses under torchrun: in `pytest -m slow`
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = str(ROOT / "launch" / "distill_tp.py")


def _run(args: list[str], nproc: int | None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc is None:
        cmd = [sys.executable, LAUNCHER, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               LAUNCHER, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _check(result: dict, proc: subprocess.CompletedProcess[str]) -> None:
    assert result["world_size"] == 2
    # the same steps on one process give the same per-token divergences and the same student
    assert result["verify"]["max_rel_diff_per_token"] < 1e-5, result["verify"]
    assert result["verify"]["max_abs_diff_weights"] < 1e-6, result["verify"]
    for step in result["steps"]:
        # fp32 from hidden states against float64 from materialised logits
        assert step["max_rel_diff_float64"] < 1e-5, step
        # the step lowers the divergence on its own batch
        assert step["loss_after"] < step["loss"], step
    first = result["first_step"]
    kept = [v for values, mask in zip(first["per_token"], first["mask"], strict=True)
            for v, m in zip(values, mask, strict=True) if m]
    assert kept and min(kept) > 0
    # one printed line per kept token of the first step
    assert sum(1 for line in proc.stdout.splitlines() if line.strip() and line.split()[0].isdigit()) == len(kept)


@pytest.mark.slow
def test_jsd_from_hidden_states_at_tp2(tmp_path: Path) -> None:
    path = tmp_path / "jsd.json"
    proc = _run(["--config", "configs/distill.toml", "--verify", "--output", str(path)], 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per-token jsd beta=0.5 full teacher" in proc.stdout
    result = json.loads(path.read_text())
    assert result["config"]["teacher_hidden_size"] != result["config"]["student_hidden_size"]
    _check(result, proc)


@pytest.mark.slow
def test_top_k_teacher_at_tp2(tmp_path: Path) -> None:
    path = tmp_path / "topk.json"
    args = ["--config", "configs/distill.toml", "--divergence", "reverse_kl", "--top-k", "16", "--steps", "1"]
    proc = _run([*args, "--verify", "--output", str(path)], 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per-token reverse_kl top-16 teacher" in proc.stdout
    _check(json.loads(path.read_text()), proc)


def test_bad_configuration_exits_2_with_one_line() -> None:
    # every check of the configuration is tested in-process in tests/apps/test_distill.py; here, the exit contract
    proc = _run(["--divergence", "jsd", "--top-k", "4"], None)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "divergence='jsd' needs the teacher's full logits" in proc.stderr
    assert "Traceback" not in proc.stderr
