"""Every Python snippet of the README runs as pasted: saved under the name the README gives and run with the
command it gives (``torchrun`` runs through this interpreter's ``torch.distributed.run``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# a ```python block, with the sentence before it (which may say "Save this as `x.py` and run `cmd`")
BLOCKS = re.findall(r"([^\n]*\n[^\n]*)\n\n```python\n(.*?)```", README, flags=re.S)


def test_the_readme_has_snippets() -> None:
    assert len(BLOCKS) >= 3


def _under_torchrun(index: int) -> bool:
    return "torchrun" in BLOCKS[index][0]


# a snippet run under torchrun starts a process per rank: in `pytest -m slow`
@pytest.mark.parametrize(
    "index", [pytest.param(i, marks=pytest.mark.slow) if _under_torchrun(i) else i for i in range(len(BLOCKS))]
)
def test_snippet_runs_as_pasted(index: int, tmp_path: Path) -> None:
    before, code = BLOCKS[index]
    named = re.search(r"Save this as\s+`([^`]+)`\s+and\s+run\s+`([^`]+)`", before.replace("\n", " "))
    name, command = (named.group(1), named.group(2)) if named else ("snippet.py", "python snippet.py")
    (tmp_path / name).write_text(code)
    argv = command.split()
    launcher = Path(argv[0]).name
    if launcher == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    else:
        assert launcher in ("python", "python3"), command
        argv = [sys.executable, *argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip(), "the snippet printed nothing"


@pytest.mark.slow  # the Quickstart's launcher under torchrun
def test_quickstart_output_is_what_the_launcher_prints() -> None:
    shown = re.search(r"```\n(shardkl exact KL .*?)```", README, flags=re.S)
    assert shown, "the README shows the launcher's output"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "launch/exact_kl.py", "--config", "configs/seed.toml", "--output", ""]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    def table(text: str) -> list[str]:
        # everything but the last line, whose time and memory vary from run to run
        return [line.rstrip() for line in text.strip().splitlines() if not line.startswith("time (KL call")]

    assert table(done.stdout) == table(shown.group(1))
