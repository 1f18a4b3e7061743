"""The benchmark: it runs end to end (the quick preset, slow), keeps every earlier run, refuses to start without its
extra, says "slower" when it is, and draws every method it measured."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from shardkl.bench import cli, measure, report

ROOT = Path(__file__).resolve().parents[2]


def _earlier_run(root: Path) -> dict[Path, bytes]:
    """A finished run's folder under ``root``, as a later run must leave it."""
    folder = root / "20000101-000000"
    folder.mkdir(parents=True)
    files = {folder / "results.jsonl": b'{"earlier": true}\n', folder / "plot.png": b"earlier plot",
             folder / "table.txt": b"earlier table\n"}
    for path, data in files.items():
        path.write_bytes(data)
    return files


@pytest.mark.slow
def test_quick_bench_writes_a_new_run_folder_with_a_clean_stderr(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    earlier = _earlier_run(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "shardkl.bench", "--preset", "quick", "--impls", "auto,eager", "--divergences",
         "auto,eager", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {path: path.read_bytes() for path in earlier} == earlier, "a run must never touch an earlier run"
    (folder,) = [f for f in tmp_path.iterdir() if f.name != "20000101-000000"]
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert (folder / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "table.txt").read_text().strip() in proc.stdout
    assert all(r["run"] == folder.name for r in rows)
    methods = {(r["method"], r["world_size"]) for r in rows}
    assert {("floor", 1), ("naive_pytorch", 1), ("shardkl[auto]", 1), ("shardkl[eager]", 1), ("floor", 2),
            ("allgather_baseline", 2), ("megatron_baseline", 2), ("shardkl[auto]", 2), ("shardkl[eager]", 2),
            ("grad_memory", 1)} <= methods
    # jsd and topk_kl at the headline point only, with the same impls as exact_kl; topk_kl against its own floor
    headline = {(r["method"], r["passes"]) for r in rows if (r["tokens"], r["vocab"]) == (64, 3000)}
    for method in ("jsd[auto]", "jsd[eager]", "topk_kl[auto]", "topk_kl[eager]"):
        assert {(method, "forward"), (method, "forward+backward")} <= headline, method
    assert {r["world_size"] for r in rows if r["method"].startswith(("jsd[", "topk_kl["))} == {1}
    student = {r["floor"] for r in rows if r["method"].startswith("topk_kl[")}
    assert student == {"student_floor"}
    topk = next(r for r in rows if r["method"] == "topk_kl[auto]")
    floor = next(r for r in rows
                 if r["method"] == "floor" and (r["tokens"], r["vocab"], r["world_size"]) == (64, 3000, 1))
    assert topk["input_bytes"] * 2 == floor["input_bytes"]
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
    assert "The default call (shardkl[auto], no options) at every point:" in proc.stdout
    # stderr: the progress bar only (no warnings, no profiler output)
    noise = [line for line in proc.stderr.splitlines() if line.strip() and "world size" not in line]
    assert noise == [], noise[:10]


_BLOCK_TQDM = """\
import sys


class _NoTqdm:
    # as if the bench extra were not installed: tqdm cannot be found, here and in every spawned process
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tqdm":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTqdm())
"""


def test_without_the_bench_extra_it_exits_with_one_line_and_keeps_earlier_runs(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCK_TQDM)
    out = tmp_path / "bench"
    earlier = _earlier_run(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "shardkl.bench", "--preset", "quick", "--world-sizes", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "python -m shardkl.bench: error: the benchmark needs the bench extra (matplotlib, tqdm): "
        "pip install -e '.[bench]' (missing: tqdm)"
    ], proc.stderr
    assert proc.stdout == ""
    assert sorted(out.iterdir()) == [out / "20000101-000000"]
    assert {path: path.read_bytes() for path in earlier} == earlier


def test_each_run_gets_a_new_folder(tmp_path: Path) -> None:
    first = cli.new_run_folder(tmp_path / "bench")
    second = cli.new_run_folder(tmp_path / "bench")
    assert first != second and first.is_dir() and second.is_dir()
    assert first.parent == second.parent == tmp_path / "bench"
    assert list(first.iterdir()) == list(second.iterdir()) == []


def _row(method: str, passes: str = "forward", *, median_s: float, vocab: int = 32000, tokens: int = 2048,
         world: int = 1, peak: int | None = 0, **extra: Any) -> measure.Row:
    input_bytes = 2 * tokens * vocab * 4 // world
    return measure.Row(
        method=method, passes=passes, world_size=world, dtype="float32", tokens=tokens, vocab=vocab, device="cpu",
        median_s=median_s, p20_s=median_s, p80_s=median_s, min_s=median_s, max_s=median_s, reps=5, inner=1,
        floor_s=0.01, peak_extra_bytes=peak, input_bytes=input_bytes, collectives=0, bytes_sent_per_rank=0,
        load_avg=0.0, huge_pages=True, run="20260101-000000", machine={"processor": "test CPU", "cpus": 2,
                                                                      "torch": torch.__version__}, **extra,
    )


def _rows() -> list[measure.Row]:
    """A small run: the headline point with every kind of method, and a two-point sweep on one and two ranks."""
    rows = []
    for passes in ("forward", "forward+backward"):
        rows += [_row("naive_pytorch", passes, median_s=0.5, peak=10**9), _row("shardkl[auto]", passes, median_s=0.02),
                 _row("shardkl[compiled]", passes, median_s=0.02), _row("shardkl[eager]", passes, median_s=2.5),
                 _row("jsd[auto]", passes, median_s=0.05, peak=10**6),
                 replace(_row("topk_kl[auto]", passes, median_s=0.03), floor="student_floor",
                         input_bytes=2048 * 32000 * 4)]
        for world in (1, 2):
            for vocab in (4000, 32000):
                naive = "naive_pytorch" if world == 1 else "allgather_baseline"
                rows += [_row(naive, passes, median_s=0.004, tokens=256, vocab=vocab, world=world, peak=10**7),
                         _row("shardkl[auto]", passes, median_s=0.001, tokens=256, vocab=vocab, world=world)]
    rows += [_row("floor", median_s=0.01), _row("grad_memory", median_s=0.03, peak=10**9),
             replace(_row("student_floor", median_s=0.005), floor="student_floor")]
    rows += [_row(m, median_s=0.0005, tokens=256, vocab=v, world=w, peak=p)
             for w in (1, 2) for v in (4000, 32000) for m, p in (("floor", 0), ("grad_memory", 10**7))]
    return rows


def test_summary_says_slower_never_a_speed_up_below_one() -> None:
    assert report.speed(0.1, 0.5, "naive PyTorch") == "5.0x faster than naive PyTorch"
    assert report.speed(0.5, 0.1, "naive PyTorch") == "5.0x slower than naive PyTorch"
    assert report.speed(1.0, 1.02, "compiled") == "1.02x faster than compiled"
    lines = "\n".join(report.summary(_rows(), tokens=2048, vocab=32000))
    assert "shardkl[auto] (the default) forward: 2.00x the floor (20.0 ms), 25.0x faster than naive PyTorch" in lines
    assert "shardkl[eager] forward: 250.00x the floor (2500.0 ms), 5.0x slower than naive PyTorch" in lines
    assert "topk_kl[auto] forward: 3.00x the student's floor" in lines
    assert "world size 2, float32, 256 x 32000: forward 1.00 ms, 4.0x faster than all-gather + naive PyTorch" in lines
    speedups = [float(x) for x in re.findall(r"([0-9.]+)x faster", lines)]
    assert speedups and min(speedups) >= 1.0, speedups


def test_plot_draws_every_method_the_headline_and_no_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    drawn: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), save(self, *a, **k))[1])
    assert report.plot(_rows(), tmp_path / "plot.png", headline=(2048, 32000))
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = drawn
    texts = [t.get_text() for t in fig.texts] + [fig._suptitle.get_text() if fig._suptitle else ""]
    texts += [ax.get_title() for ax in fig.axes] + [ax.get_ylabel() for ax in fig.axes]
    assert any("Headline: 2048 tokens x 32,000 vocabulary" in t for t in texts)
    assert any("lower is better" in t for t in texts)
    labels = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
    assert {"naive_pytorch", "shardkl[auto]", "allgather_baseline"} <= labels
    assert not labels & set(report.REFERENCES), "grad_memory and the floors are not KL methods"
    # the headline: one line per method, jsd and topk_kl next to exact_kl, each with its value written next to it
    headline = [ax for ax in fig.axes if ax.get_yticklabels() and any(
        t.get_text() == "jsd[auto]" for t in ax.get_yticklabels())]
    assert headline, "the headline panel lists the methods"
    ticks = [t.get_text() for t in headline[0].get_yticklabels()]
    assert {"naive_pytorch", "shardkl[auto]", "shardkl[compiled]", "jsd[auto]", "topk_kl[auto] *"} <= set(ticks)
    # memory: a zero must be visible (the axis starts below it, markers are not clipped)
    memory = [ax for ax in fig.axes if "memory" in ax.get_ylabel() or "memory" in ax.get_title()]
    assert memory
    for ax in memory:
        low = ax.get_xlim()[0] if "memory" in ax.get_title() else ax.get_ylim()[0]
        assert low < 0, ax.get_title() or ax.get_ylabel()
        markers = [line for line in ax.get_lines() if line.get_marker() not in ("None", "", None)]
        assert markers and not any(line.get_clip_on() for line in markers)


def test_report_run_draws_from_the_rows_beside_it(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    folder = cli.new_run_folder(tmp_path)
    (folder / "results.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in _rows()))
    text = cli.report_run(folder, headline=(2048, 32000))
    assert (folder / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "table.txt").read_text() in text + "\n"
    assert "shardkl[auto] (the default) forward" in text


def test_peak_memory_accounting_sees_a_temporary_and_not_a_view() -> None:
    x = torch.zeros(1000, 1000)
    # x * 2 allocates 4 MB that is freed on return: the peak must see it
    peak = measure.peak_extra_bytes(lambda: (x * 2).sum(), torch.device("cpu"))
    assert 4_000_000 <= peak < 4_100_000
    assert measure.peak_extra_bytes(lambda: x[10:].mul_(2), torch.device("cpu")) == 0


def test_rounds_interleave_and_settle_after_a_slow_method() -> None:
    log: list[str] = []
    keys = [("floor", "forward"), ("naive", "forward"), ("auto", "forward"), ("eager", "forward")]
    calls = {key: (lambda name=key[0]: log.append(name)) for key in keys}
    reps = {key: 3 for key in keys} | {("naive", "forward"): 2}
    inner = {key: 1 for key in keys} | {("floor", "forward"): 2}
    samples = measure.timed_rounds(
        calls, keys, 3, reps, inner, {("naive", "forward")}, ready=lambda: log.append("|"), sync=lambda: None
    )
    assert [len(samples[key]) for key in keys] == [3, 2, 3, 3]
    # after a sample of the slow method, the next method is called once untimed, before its barrier
    round_ = ["|", "floor", "floor", "|", "naive", "auto", "|", "auto", "|", "eager"]
    assert log == round_ * 2 + ["|", "floor", "floor", "|", "auto", "|", "eager"]


def test_bandwidth_of_known_and_unknown_devices() -> None:
    assert measure.hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert measure.hbm_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert measure.hbm_bandwidth("NVIDIA H200") == 4.8e12
    assert measure.hbm_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert measure.hbm_bandwidth("Some Future GPU") is None


def test_help_says_how_long_how_much_memory_and_where_runs_go() -> None:
    text = cli.parser().format_help()
    assert "two minutes" in text and "3 GB" in text and "results/bench" in text and "RUN-ID" in text
