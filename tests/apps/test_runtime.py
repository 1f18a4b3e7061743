"""What every launcher does around the library: threads per rank, one process without torchrun, the JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shardkl.apps import runtime


def test_threads_per_rank_divides_the_usable_cpus_among_the_local_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert runtime.threads_per_rank() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.threads_per_rank() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert runtime.threads_per_rank() == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert runtime.threads_per_rank() == 1  # never 0
    assert runtime.threads_per_rank(3) == 3  # asked for: as asked


def test_one_process_without_torchrun_has_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    try:
        run = runtime.start("gloo", threads=1)
        assert (run.rank, run.world_size, run.group, run.backend, run.threads) == (0, 1, None, "none", 1)
        assert run.device == torch.device("cpu") and torch.get_num_threads() == 1
        runtime.finish(run)  # nothing to tear down
    finally:
        torch.set_num_threads(threads)


def test_write_json_creates_the_folder(tmp_path: Path) -> None:
    path = runtime.write_json(tmp_path / "results" / "x.json", {"a": 1.5})
    assert path == tmp_path / "results" / "x.json"
    assert json.loads(path.read_text()) == {"a": 1.5}
