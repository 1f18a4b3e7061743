"""The benchmark runs end to end (the quick preset), streams what it promises, and keeps stderr clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardkl.bench import cli, measure


def test_quick_bench_writes_jsonl_and_png_with_a_clean_stderr(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    proc = subprocess.run(
        [sys.executable, "-m", "shardkl.bench", "--preset", "quick", "--impls", "eager", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    methods = {(r["method"], r["world_size"]) for r in rows}
    assert {("floor", 1), ("eager_reference", 1), ("shardkl[eager]", 1), ("floor", 2), ("allgather_baseline", 2),
            ("megatron_baseline", 2), ("shardkl[eager]", 2), ("grad_memory", 1)} <= methods
    for r in rows:
        assert r["reps"] >= 3 and r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["min_s"] <= r["max_s"]
        assert r["floor_s"] > 0 and r["dtype"] == "float32"
        assert {"torch", "processor", "date"} <= set(r["machine"])
    ours = [r for r in rows if r["method"] == "shardkl[eager]" and r["world_size"] == 2]
    forward = {r["vocab"]: r for r in ours if r["passes"] == "forward"}
    both = {r["vocab"]: r for r in ours if r["passes"] == "forward+backward"}
    # one collective per forward, none in backward, and the same bytes per token for every vocabulary size
    assert all(r["collectives"] == 1 for r in forward.values())
    assert all(both[v]["collectives"] == forward[v]["collectives"] for v in forward)
    assert len({r["bytes_sent_per_rank"] / r["tokens"] for r in ours}) == 1
    # the fused-linear rows: every method and pass on both world sizes; the fused path holds far less memory than
    # the logits the unfused path materialises, and issues the same one collective per call
    linear = {(r["method"], r["passes"], r["world_size"]): r for r in rows if r["method"].startswith("linear:")}
    for world in (1, 2):
        assert ("linear:matmuls", "forward", world) in linear
        for passes in ("forward", "forward+backward", "fwd+bwd frozen q"):
            fused, unfused = linear[("linear:fused", passes, world)], linear[("linear:unfused", passes, world)]
            assert fused["peak_extra_bytes"] < unfused["peak_extra_bytes"], passes
            assert fused["collectives"] == unfused["collectives"] == (1 if world == 2 else 0)
            assert fused["hidden"] == 32
    assert "x bound (fused only)" in proc.stdout
    megatron = [r for r in rows if r["method"] == "megatron_baseline" and r["passes"] == "forward"]
    assert all(r["collectives"] == 3 for r in megatron)
    # stdout: every table row names its dtype, and the ratio is explained rather than judged against targets
    table = [cells for cells in map(str.split, proc.stdout.splitlines())
             if len(cells) > 8 and cells[0].isdigit() and cells[2].isdigit() and cells[3].isdigit()]
    assert len(table) == len(rows) and all(cells[1] == "float32" for cells in table)
    assert "x floor = median time / median time of `floor`" in proc.stdout and "target" not in proc.stdout
    # stderr: the progress bar only (no warnings, no profiler output)
    noise = [line for line in proc.stderr.splitlines() if line.strip() and "world size" not in line]
    assert noise == [], noise[:10]


def test_peak_memory_accounting_sees_a_temporary_and_not_a_view() -> None:
    x = torch.zeros(1000, 1000)
    # x * 2 allocates 4 MB that is freed on return: the peak must see it
    peak = measure.peak_extra_bytes(lambda: (x * 2).sum(), torch.device("cpu"))
    assert 4_000_000 <= peak < 4_100_000
    assert measure.peak_extra_bytes(lambda: x[10:].mul_(2), torch.device("cpu")) == 0


def test_bandwidth_of_known_and_unknown_devices() -> None:
    assert measure.hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert measure.hbm_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert measure.hbm_bandwidth("NVIDIA H200") == 4.8e12
    assert measure.hbm_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert measure.hbm_bandwidth("Some Future GPU") is None


def test_help_says_how_long_and_how_much_memory() -> None:
    text = cli.parser().format_help()
    assert "two minutes" in text and "3 GB" in text and "results/bench" in text
