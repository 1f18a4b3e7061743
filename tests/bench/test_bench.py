"""The benchmark suite runs end to end (a tiny sweep) and records what the performance issue asks for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardkl import bench


def test_quick_bench_writes_jsonl_and_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    proc = subprocess.run(
        [sys.executable, "-m", "shardkl.bench", "--quick", "--impls", "eager", "--dtypes", "float32",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    methods = {(r["method"], r["world_size"]) for r in rows}
    assert {("floor", 1), ("eager_reference", 1), ("shardkl[eager]", 1), ("floor", 2), ("allgather_baseline", 2),
            ("megatron_baseline", 2), ("shardkl[eager]", 2)} <= methods
    for r in rows:
        assert r["reps"] >= 3 and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert {"torch", "processor", "date"} <= set(r["machine"])
    ours = [r for r in rows if r["method"] == "shardkl[eager]" and r["world_size"] == 2]
    # one collective per forward, none in backward, and the same bytes per token for every vocabulary size
    assert all(r["collectives"] == 1 for r in ours)
    assert len({r["bytes_sent_per_rank"] / r["tokens"] for r in ours}) == 1
    megatron = [r for r in rows if r["method"] == "megatron_baseline" and r["passes"] == "forward"]
    assert all(r["collectives"] == 3 for r in megatron)
    assert "faster than eager" in proc.stdout


def test_peak_memory_accounting_sees_a_temporary() -> None:
    import torch

    x = torch.zeros(1000, 1000)
    # x * 2 allocates 4 MB that is freed on return: the peak must see it, the net must not
    peak = bench.peak_extra_bytes(lambda: (x * 2).sum(), torch.device("cpu"))
    assert 4_000_000 <= peak < 4_100_000
