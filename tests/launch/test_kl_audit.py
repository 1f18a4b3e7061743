"""launch/kl_audit.py end to end as subprocesses: one process, torchrun (``--tp 2``, two data-parallel ranks), Ray
(2 workers, one killed mid-job), stop and resume, bad input on every rank, its stdout and stderr.

Every run audits the same tiny pair (``tests/apps/_audit_fixtures.py``) over a 24-document corpus, windows of 16
tokens, 6 shards; each must give the summary of the one-process run (to 1e-5 relative). Slow: each subprocess imports
torch and transformers, and Ray takes tens of seconds to start on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("pyarrow")

from tests.apps._audit_fixtures import corpus_lines, make_pair, write_corpus  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = str(ROOT / "launch" / "kl_audit.py")
WITH_HOOK = str(Path(__file__).resolve().parent / "_kl_audit_with_hook.py")
LINES = corpus_lines(24)
# one thread per rank: on a machine shared with other work, more threads contend (docs/launchers.md, "Threads")
ARGS = ["--context", "16", "--shard_windows", "8", "--batch_tokens", "64", "--threads", "1"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_COLOR_PREFIX")}
    pythonpath = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    # OMP_NUM_THREADS set: torchrun prints its notice only when it is not (the launcher sets its own thread count)
    return {**env, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def _launch(args: list[str], nproc: int | None = None, script: str = LAUNCHER, timeout: float = 300,
            cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, script, *args]
    if nproc is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script,
               *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pair")
    p, q = make_pair(root, LINES, scale=0.3)
    return {"root": root, "p": p, "q": q, "text": write_corpus(root / "corpus.txt", LINES),
            "jsonl": write_corpus(root / "corpus.jsonl", LINES, "jsonl")}


def _args(pair: dict[str, Path], out: Path, data: str = "text") -> list[str]:
    return ["--p_model", str(pair["p"]), "--q_model", str(pair["q"]), "--data", str(pair[data]), "--out", str(out),
            *ARGS]


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def _assert_same_summary(a: dict[str, Any], b: dict[str, Any], path: str = "", scales: Any = None) -> None:
    """Every statistic equal to 1e-5 relative; ``run`` (how the job ran) and ``versions`` aside.

    A mean of signed per-token values (``delta_p.mean``, ``ln_ppl_ratio``) cancels: its digits are relative to the
    size of its terms (``delta_p.rms``, ``ln ppl_p``), not to its own value.
    """
    scales = scales or {"delta_p.mean": a["delta_p"]["rms"], "ln_ppl_ratio": math.log(a["ppl_p"])}
    for key, value in a.items():
        if key in ("run", "versions"):
            continue
        where = f"{path}.{key}" if path else key
        assert key in b, where
        if isinstance(value, dict):
            _assert_same_summary(value, b[key], where, scales)
        elif isinstance(value, float):
            tolerance = 1e-5 * scales.get(where, 0.0)
            assert math.isclose(value, b[key], rel_tol=1e-5, abs_tol=tolerance), (where, value, b[key])
        else:
            assert value == b[key], (where, value, b[key])


@pytest.fixture(scope="module")
def baseline(pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("one") / "out"
    proc = _launch(_args(pair, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "proc": proc, "summary": _summary(out)}


def test_one_process_prints_the_report_and_clean_progress(baseline: dict[str, Any]) -> None:
    proc, out, summary = baseline["proc"], baseline["out"], baseline["summary"]
    assert proc.stdout == (out / "report.txt").read_text()
    assert summary["tokens"] > 300 and summary["shards"] == 6 and summary["run"]["launcher"] == "python"
    lines = proc.stderr.splitlines()
    # every line is the launcher's (not a terminal: plain lines, no carriage return), each said once
    assert all(line.startswith("[shardkl] ") for line in lines) and "\r" not in proc.stderr, proc.stderr
    assert lines[0] == "[shardkl] loading P and Q (float32, float32) on 1 rank(s)"
    assert lines[1].startswith(f"[shardkl] {summary['tokens']:,} tokens in {summary['windows']} windows of up to 16")
    assert re.fullmatch(r"\[shardkl\] scored \d[\d,]* tokens in \d+\.\d s, [\d,]+ tokens/s on 1 rank\(s\) "
                        r"\(models loaded\)", lines[-2]), lines[-2]
    assert lines[-1].startswith(f"[shardkl] wrote {out}/{{summary.json,report.txt,kl_histogram.png,")
    assert len(lines) == len(set(lines))
    for name in ("kl_histogram.png", "kl_by_position.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "tokens").glob("shard-*.parquet"))) == 6


@pytest.mark.parametrize(("nproc", "tp", "trunk"), [(2, 2, "tensor_parallel"), (2, 1, "replicated")])
def test_torchrun_gives_the_summary_of_one_process(pair: dict[str, Path], baseline: dict[str, Any], tmp_path: Path,
                                                   nproc: int, tp: int, trunk: str) -> None:
    out = tmp_path / "out"
    proc = _launch([*_args(pair, out, "jsonl"), "--tp", str(tp)], nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(out)
    run = summary["run"]
    assert (run["launcher"], run["world_size"], run["tp"], run["groups"], run["trunk"]) == (
        "torchrun", nproc, tp, nproc // tp, trunk)
    _assert_same_summary(baseline["summary"], {**summary, "data": baseline["summary"]["data"],
                                               "data_format": "text", "text_key": None})
    # rank 0 alone prints: the report once, progress lines once each, nothing from torchrun
    assert proc.stdout == (out / "report.txt").read_text()
    assert all(line.startswith("[shardkl] ") for line in proc.stderr.splitlines()), proc.stderr


def test_a_stopped_job_resumes_to_the_summary_of_an_uninterrupted_one(pair: dict[str, Path], baseline: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    stopped = _launch(["0", "2", "exit", str(tmp_path / "stopped"), *_args(pair, out)], script=WITH_HOOK)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert len(list((out / "tokens").glob("shard-*.parquet"))) == 2 and not (out / "summary.json").exists()
    # the same command without --resume refuses the folder instead of mixing two runs
    again = _launch(_args(pair, out))
    assert again.returncode == 2
    assert again.stderr.strip() == (f"kl_audit.py: error: out: {out} already holds an audit (2 shard file(s)); "
                                    "pass --resume to continue it, or choose another --out")
    resumed = _launch([*_args(pair, out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = _summary(out)
    assert summary["run"]["shards_found_on_disk"] == 2
    assert summary["run"]["tokens_this_run"] < summary["tokens"]
    assert "2 shard(s) were already on disk" in resumed.stderr
    _assert_same_summary(baseline["summary"], summary)
    # a different audit in the same folder is refused, naming what differs
    other = _launch([*_args(pair, out), "--resume", "--context", "12"])
    assert other.returncode == 2
    assert "holds a different audit: context is 16 there, 12 now" in other.stderr


def _bad_vocab_q(pair: dict[str, Path]) -> Path:
    from tests.apps._audit_fixtures import make_model, make_tokenizer, save

    target = pair["root"] / "q_other_vocab"
    if not target.exists():
        tokenizer = make_tokenizer(LINES, extra_words=("zebra",))
        save(make_model(len(tokenizer) + 4, 3), tokenizer, target)
    return target


def _bad_case(pair: dict[str, Path], tmp_path: Path, case: str) -> list[str]:
    args = _args(pair, tmp_path / "out")
    if case == "different vocabularies":
        args[3] = str(_bad_vocab_q(pair))
    elif case == "missing text key":
        args[5] = str(pair["jsonl"])
        args += ["--text_key", "body"]
    elif case == "empty corpus":
        (tmp_path / "empty.txt").write_text("")
        args[5] = str(tmp_path / "empty.txt")
    elif case == "context 1":
        args += ["--context", "1"]
    elif case == "missing path":
        args[1] = str(tmp_path / "nowhere")
    elif case == "unreadable model":
        bad = tmp_path / "bad_model"
        bad.mkdir()
        (bad / "config.json").write_text("{not json")
        args[3] = str(bad)
    return args


BAD = {
    "different vocabularies": "kl_audit.py: error: q_model: different vocabularies: P's tokenizer has",
    "missing text key": "has no key 'body' (its keys: id, text); choose the text's key with --text_key",
    "empty corpus": "holds no documents: nothing to audit",
    "context 1": "kl_audit.py: error: context must be >= 2",
    "missing path": "kl_audit.py: error: p_model: no such directory: ",
    "unreadable model": "is not a readable Hugging Face model",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(pair: dict[str, Path], tmp_path: Path, case: str) -> None:
    proc = _launch(_bad_case(pair, tmp_path, case))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and BAD[case] in proc.stderr, proc.stderr
    assert proc.stderr.startswith("kl_audit.py: error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["different vocabularies", "missing text key"])
def test_bad_input_under_torchrun_fails_on_every_rank(pair: dict[str, Path], tmp_path: Path, case: str) -> None:
    proc = _launch(_bad_case(pair, tmp_path, case), nproc=2)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kl_audit.py: error:")]
    assert len(errors) == 2 and errors[0] == errors[1] and BAD[case] in errors[0], proc.stderr
    assert "exitcode  : 2" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_help_lists_every_key_and_the_docs_have_a_row_for_each() -> None:
    from dataclasses import fields

    from shardkl.apps.audit.config import AuditConfig

    proc = _launch(["--help"])
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    docs = (ROOT / "docs" / "audit.md").read_text()
    for field in fields(AuditConfig):
        assert f"--{field.name}" in text, field.name
        assert f"| `{field.name}` |" in docs, field.name


@pytest.mark.ray
def test_ray_job_survives_a_killed_worker_with_the_same_summary(pair: dict[str, Path], baseline: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    pytest.importorskip("ray.train.torch")
    out, marker = tmp_path / "out", tmp_path / "killed"
    proc = _launch(["1", "1", "kill", str(marker), *_args(pair, out), "--ray", "--num_workers", "2"],
                   script=WITH_HOOK, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()  # rank 1 did die after its first shard
    summary = _summary(out)
    assert summary["run"]["launcher"] == "ray" and summary["run"]["world_size"] == 2
    # the workers Ray Train started again found the finished shards and skipped them
    assert summary["run"]["shards_found_on_disk"] >= 1
    _assert_same_summary(baseline["summary"], summary)
    assert proc.stdout == (out / "report.txt").read_text()
    assert all(line.startswith("[shardkl] ") for line in proc.stderr.splitlines()), proc.stderr


@pytest.mark.ray
def test_ray_job_with_a_tensor_parallel_group(pair: dict[str, Path], baseline: dict[str, Any],
                                              tmp_path: Path) -> None:
    pytest.importorskip("ray.train.torch")
    # paths relative to the driver's folder: the workers work there too
    relative = ["--p_model", "p", "--q_model", "q", "--data", "corpus.txt", "--out", "ray_out", *ARGS]
    proc = _launch([*relative, "--ray", "--num_workers", "2", "--tp", "2"], timeout=600, cwd=pair["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(pair["root"] / "ray_out")
    assert (summary["run"]["tp"], summary["run"]["groups"], summary["run"]["trunk"]) == (2, 1, "tensor_parallel")
    assert (summary["p_model"], summary["data"]) == ("p", "corpus.txt")
    paths = {key: baseline["summary"][key] for key in ("p_model", "q_model", "data")}
    _assert_same_summary(baseline["summary"], {**summary, **paths})
    bad = _launch([*_bad_case(pair, tmp_path, "different vocabularies"), "--ray"])
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and BAD["different vocabularies"] in bad.stderr


def test_the_benchmark_runs_both_ways_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _launch(["--vocab", "3000", "--hidden", "64", "--windows", "2", "--context", "64", "--reps", "1",
                    "--output", str(out)], script=str(ROOT / "launch" / "audit_bench.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["mode"]: row for row in result["rows"]}
    assert set(rows) == {"from hidden states", "materialised logits"} and result["tokens"] == 126
    # materialised: at least both models' logits of the batch; from hidden states: a fraction of one model's
    assert rows["materialised logits"]["audit_part_extra_bytes"] >= 2 * result["one_model_logits_bytes"]
    assert rows["from hidden states"]["audit_part_extra_bytes"] < rows["materialised logits"]["audit_part_extra_bytes"]
    assert all(row["tokens_per_s"] > 0 and row["tokens_per_cpu_s"] > 0 for row in rows.values())
    assert proc.stdout.splitlines()[1].split()[:2] == ["tokens/s", "tokens/CPU"]
