"""The audit in one process on tiny models: per-token values against a float64 computation from the models' own full
logits, the summary against numpy's statistics of those values, the estimators, the checks before any work.

The multi-rank runs (torchrun ``--tp 2``, two data-parallel ranks, Ray) and the launcher's output are in
``tests/launch/test_kl_audit.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("pyarrow")

from shardkl.apps.audit import compute, store  # noqa: E402
from shardkl.apps.audit.config import AuditConfig  # noqa: E402
from shardkl.apps.audit.corpus import AuditInputError  # noqa: E402
from shardkl.apps.audit.job import run_rank  # noqa: E402
from shardkl.apps.audit.plan import plan_audit  # noqa: E402
from shardkl.apps.audit.stats import describe  # noqa: E402
from tests.apps._audit_fixtures import (  # noqa: E402
    corpus_lines,
    make_model,
    make_pair,
    make_tokenizer,
    reference,
    save,
    write_corpus,
)

CONTEXT = 12
LINES = corpus_lines(16)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls: one thread is fastest, and on a shared machine more threads contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pair")
    p, q = make_pair(root, LINES, scale=0.3)
    return {"root": root, "p": p, "q": q, "data": write_corpus(root / "corpus.jsonl", LINES, "jsonl")}


def _config(pair: dict[str, Path], out: Path, **overrides: Any) -> AuditConfig:
    values: dict[str, Any] = {"p_model": str(pair["p"]), "q_model": str(pair["q"]), "data": str(pair["data"]),
                              "out": str(out), "context": CONTEXT, "shard_windows": 5, "batch_tokens": 40,
                              "plots": False, **overrides}
    return AuditConfig(**values)


def _run(config: AuditConfig) -> dict[str, Any]:
    result = run_rank(plan_audit(config, world_size=1))
    assert result is not None
    return result.summary


def _sorted(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.lexsort((columns["pos"], columns["doc"]))
    return {k: v[order] for k, v in columns.items()}


@pytest.fixture(scope="module")
def audited(pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("audit") / "out"
    summary = _run(_config(pair, out))
    columns = store.read_columns(out, sorted(store.shards_on_disk(out)), store.COLUMNS)
    return {"out": out, "summary": summary, "columns": _sorted(columns),
            "reference": reference(pair["p"], pair["q"], LINES, CONTEXT)}


def test_per_token_values_equal_float64_from_the_models_own_full_logits(audited: dict[str, Any]) -> None:
    got, ref = audited["columns"], audited["reference"]
    assert got["doc"].size == ref["doc"].size > 100
    for name in ("doc", "pos", "token", "top1_p", "top1_q"):
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    for name in ("kl_pq", "kl_qp", "logp_p", "logp_q", "entropy_p", "entropy_q"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=0, err_msg=name)
    # the two directions differ, and neither is ever negative
    assert (got["kl_pq"] > 0).all() and (got["kl_qp"] > 0).all() and not np.allclose(got["kl_pq"], got["kl_qp"])


def test_summary_equals_numpy_statistics_of_the_reference_values(audited: dict[str, Any]) -> None:
    s, ref = audited["summary"], audited["reference"]
    assert s["tokens"] == ref["doc"].size and s["documents"] == len(set(ref["doc"].tolist()))
    for name in ("kl_pq", "kl_qp"):
        expected = describe(ref[name])
        for key, value in expected.items():
            assert s[name][key] == pytest.approx(value, rel=1e-5), (name, key)
    assert s["ppl_p"] == pytest.approx(math.exp(-ref["logp_p"].mean()), rel=1e-5)
    assert s["ppl_q"] == pytest.approx(math.exp(-ref["logp_q"].mean()), rel=1e-5)
    assert s["ln_ppl_ratio"] == pytest.approx((ref["logp_p"] - ref["logp_q"]).mean(), rel=1e-5)
    assert s["top1_agreement"] == np.mean(ref["top1_p"] == ref["top1_q"])
    delta = np.exp(ref["logp_q"]) - np.exp(ref["logp_p"])
    for key, value in (("mean", delta.mean()), ("rms", np.sqrt((delta**2).mean())),
                       ("p1", np.percentile(delta, 1)), ("p99", np.percentile(delta, 99))):
        assert s["delta_p"][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


def test_outputs_on_disk(audited: dict[str, Any]) -> None:
    out = audited["out"]
    written = json.loads((out / "summary.json").read_text())
    assert written == json.loads(json.dumps(audited["summary"]))
    for key in ("tokens", "documents", "p_model", "q_model", "p_dtype", "q_dtype", "data", "context", "versions",
                "kl_pq", "kl_qp", "ppl_p", "ppl_q", "ln_ppl_ratio", "top1_agreement", "delta_p"):
        assert key in written, key
    assert set(written["kl_pq"]) == {"mean", "std", "stderr", "min", "p01", "p1", "p5", "p10", "median", "p90",
                                     "p95", "p99", "p999", "max"}
    assert set(written["delta_p"]) == {"mean", "rms", "p1", "p99"}
    assert written["documents_in_data"] == len(LINES) and written["vocab_size"] > 0
    assert (out / "report.txt").read_text().startswith("shardkl KL audit: ")
    identity = json.loads((out / "audit.json").read_text())
    assert identity["tokens"] == written["tokens"] and identity["context"] == CONTEXT
    # one file per shard, rows sorted by (doc, pos), the contract's columns
    import pyarrow.parquet as pq

    first = pq.read_table(store.shard_path(out, 0))
    assert first.column_names == list(store.COLUMNS)
    docs, positions = first.column("doc").to_numpy(), first.column("pos").to_numpy()
    assert (np.diff(docs * 10**6 + positions) > 0).all()


def test_materialised_logits_give_the_same_values(pair: dict[str, Path], audited: dict[str, Any],
                                                   tmp_path: Path) -> None:
    summary = _run(_config(pair, tmp_path / "out", materialise=True))
    columns = _sorted(store.read_columns(tmp_path / "out", range(summary["shards"]), store.COLUMNS))
    for name in ("kl_pq", "kl_qp", "logp_p", "entropy_q"):
        np.testing.assert_allclose(columns[name], audited["columns"][name], rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(columns["top1_q"], audited["columns"]["top1_q"])


def test_estimators_track_the_exact_kl_and_do_not_change_the_exact_values(
    pair: dict[str, Path], audited: dict[str, Any], tmp_path: Path
) -> None:
    summary = _run(_config(pair, tmp_path / "out", estimators=16))
    exact = summary["kl_pq"]["mean"]
    assert exact == pytest.approx(audited["summary"]["kl_pq"]["mean"], rel=1e-6)
    e = summary["estimators"]
    assert e["samples"] == 16 and e["draws"] == 16 * summary["tokens"]
    for name in ("k1", "k3"):  # unbiased: within a few standard errors
        assert abs(e[name]["bias"]) <= 4 * e[name]["stderr"], (name, e[name])
        assert e[name]["rel_bias"] == pytest.approx(abs(e[name]["bias"]) / exact)
    columns = store.read_columns(tmp_path / "out", range(summary["shards"]), ["k1", "kl_pq"])
    assert columns["k1"].shape == (summary["tokens"], 16)


def test_a_padded_p_and_an_unpadded_q_audit_over_the_real_ids(pair: dict[str, Path], tmp_path: Path) -> None:
    tokenizer = make_tokenizer(LINES)
    unpadded = save(make_model(len(tokenizer), 5), tokenizer, tmp_path / "q")
    config = dataclasses.replace(_config(pair, tmp_path / "out"), q_model=str(unpadded))
    summary = _run(config)
    ref = reference(pair["p"], unpadded, LINES, CONTEXT)
    assert summary["vocab_size"] == len(tokenizer)
    assert summary["kl_qp"]["mean"] == pytest.approx(ref["kl_qp"].mean(), rel=1e-5)
    assert summary["kl_pq"]["p99"] == pytest.approx(np.percentile(ref["kl_pq"], 99), rel=1e-5)


def test_token_blocks_bound_the_per_call_temporaries_and_stay_large_enough() -> None:
    # (FLOATS_PER_ROW + FLOATS_PER_ID) x rows within 1% of tokens x V logits: V = 2000 -> 6 blocks of 341 rows
    assert compute.token_block(2044, 2000, min_rows=1) == 341
    assert (compute.FLOATS_PER_ROW + compute.FLOATS_PER_ID) * 341 <= 0.01 * 2044 * 2000
    # a large vocabulary needs no split at all
    assert compute.token_block(2044, 32000, min_rows=1) == 2044
    # at least min_rows per block (fewer, larger blocks), and one block when the batch is small
    assert compute.token_block(2044, 2000, min_rows=525) == 682
    assert compute.token_block(60, 300) == 60
    # draws add ids per position, so the blocks shrink
    with_draws, without = (compute.token_block(4096, 8000, ids, min_rows=1) for ids in (9, 1))
    assert with_draws < without


def _bad_tokenizer_q(root: Path) -> Path:
    tokenizer = make_tokenizer(LINES, extra_words=("zebra",))
    return save(make_model(len(tokenizer) + 4, 3), tokenizer, root / "q_other_vocab")


def _short_head_q(root: Path) -> Path:
    tokenizer = make_tokenizer(LINES)
    return save(make_model(len(tokenizer) - 2, 3), tokenizer, root / "q_short_head")


def _corrupt_config(root: Path, pair: dict[str, Path]) -> Path:
    import shutil

    target = root / "q_bad_config"
    shutil.copytree(pair["q"], target)
    (target / "config.json").write_text("{not json")
    return target


def _truncated_weights(root: Path, pair: dict[str, Path]) -> Path:
    import shutil

    target = root / "q_bad_weights"
    shutil.copytree(pair["q"], target)
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) // 3])
    return target


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other_vocab", "q_model: different vocabularies: P's tokenizer has"),
        ("short_head", "q_model: different vocabularies: the output layer of"),
        ("missing_key", "has no key 'body'"),
        ("empty", "holds no documents: nothing to audit"),
        ("one_token_documents", "has 2 or more tokens: nothing to score"),
        ("missing_model", "p_model: no such directory"),
        ("missing_data", "data: no such file"),
        ("bad_config", "q_model: .* is not a readable Hugging Face model"),
        ("bad_weights", "q_model: cannot read the weights"),
        ("tp_alone", "tp=2 needs 2 ranks per group"),
        ("long_context", "context 4096 exceeds the model's max_position_embeddings 128"),
    ],
)
def test_bad_input_is_one_line_before_any_work(pair: dict[str, Path], tmp_path: Path, case: str,
                                                message: str) -> None:
    out = tmp_path / "out"
    config = _config(pair, out)
    if case == "other_vocab":
        config = dataclasses.replace(config, q_model=str(_bad_tokenizer_q(tmp_path)))
    elif case == "short_head":
        config = dataclasses.replace(config, q_model=str(_short_head_q(tmp_path)))
    elif case == "missing_key":
        config = dataclasses.replace(config, text_key="body")
    elif case == "empty":
        config = dataclasses.replace(config, data=str(write_corpus(tmp_path / "empty.txt", [])))
        (tmp_path / "empty.txt").write_text("")
    elif case == "one_token_documents":
        config = dataclasses.replace(config, data=str(write_corpus(tmp_path / "short.txt", ["", ""])))
    elif case == "missing_model":
        config = dataclasses.replace(config, p_model=str(tmp_path / "nowhere"))
    elif case == "missing_data":
        config = dataclasses.replace(config, data=str(tmp_path / "nowhere.txt"))
    elif case == "bad_config":
        config = dataclasses.replace(config, q_model=str(_corrupt_config(tmp_path, pair)))
    elif case == "bad_weights":
        config = dataclasses.replace(config, q_model=str(_truncated_weights(tmp_path, pair)))
    elif case == "tp_alone":
        config = dataclasses.replace(config, tp=2)
    elif case == "long_context":
        config = dataclasses.replace(config, context=4096)
    with pytest.raises(AuditInputError, match=message) as info:
        plan_audit(config, world_size=1)
    assert "\n" not in str(info.value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"context": 1}, "context must be >= 2"), ({"p_model": ""}, "p_model is required"),
     ({"tp": 0}, "tp must be >= 1"), ({"ray": True, "num_workers": 3, "tp": 2}, "num_workers must be a multiple")],
)
def test_bad_values_fail_in_the_config_itself(overrides: dict[str, Any], message: str) -> None:
    values = {"p_model": "p", "q_model": "q", "data": "d", "out": "o", **overrides}
    with pytest.raises(ValueError, match=message):
        AuditConfig(**values)
