"""The audit's corpus: reading the three formats, windows (every position once), shards, batches; its files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from shardkl.apps.audit import store
from shardkl.apps.audit.corpus import (
    AuditInputError,
    batches,
    make_windows,
    read_documents,
    shard_count,
    shard_slice,
    shards_of_group,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def test_text_file_one_document_per_line_keeps_blank_lines_and_strips_crlf(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"first doc\r\n\nthird  doc\nlast")
    documents, kind = read_documents(path)
    assert kind == "text" and documents == ["first doc", "", "third  doc", "last"]
    assert read_documents(path, limit=2)[0] == ["first doc", ""]


def test_jsonl_reads_the_text_key_and_numbers_documents_by_line(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"body": "a b", "id": 0}) + "\n\n" + json.dumps({"body": "c"}) + "\n")
    documents, kind = read_documents(path, text_key="body")
    assert kind == "jsonl" and documents == ["a b", "", "c"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"body": "x"}\n', "line 1 has no key 'text' (its keys: body); choose the text's key with --text_key"),
        ('{"text": "x"}\n{"text": 3}\n', "line 2: 'text' must be a string, got int"),
        ('{"text": "x"}\nnot json\n', "line 2 is not valid JSON"),
        ('["text"]\n', "line 1 must be a JSON object, got list"),
    ],
)
def test_jsonl_errors_name_the_line_and_what_was_expected(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text(content)
    with pytest.raises(AuditInputError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        read_documents(path)
    assert "\n" not in str(info.value)


def test_parquet_reads_a_column_by_row_and_names_the_columns_when_one_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": [0, 1, 2], "content": ["a", None, "c d"]}), path)
    documents, kind = read_documents(path, text_key="content")
    assert kind == "parquet" and documents == ["a", "", "c d"]
    assert read_documents(path, text_key="content", limit=1)[0] == ["a"]
    with pytest.raises(AuditInputError, match=r"has no column 'text' \(its columns: id, content\)"):
        read_documents(path)
    with pytest.raises(AuditInputError, match="column 'id' must hold strings, got int64"):
        read_documents(path, text_key="id")


def test_missing_and_undecodable_files_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(AuditInputError, match="data: no such file"):
        read_documents(tmp_path / "missing.txt")
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(AuditInputError, match="is not UTF-8 text"):
        read_documents(path)


@pytest.mark.parametrize("context", [2, 3, 5, 16])
def test_windows_score_every_position_with_a_successor_exactly_once(context: int) -> None:
    rng = np.random.default_rng(context)
    lengths = np.concatenate([[0, 1, 2, context, context + 1, 2 * context], rng.integers(0, 60, size=40)])
    windows = make_windows(lengths, context)
    assert (windows.length >= 2).all() and (windows.length <= context).all()
    scored: dict[int, list[int]] = {}
    for doc, start, length in zip(windows.doc, windows.start, windows.length, strict=True):
        # a window of `length` tokens scores its positions 0 .. length - 2
        scored.setdefault(int(doc), []).extend(range(int(start), int(start) + int(length) - 1))
    for doc, length in enumerate(lengths):
        assert sorted(scored.get(doc, [])) == list(range(max(0, int(length) - 1))), doc
    # consecutive windows of a document share exactly one token, and positions map back by pos % (context - 1)
    for i in range(1, len(windows)):
        if windows.doc[i] == windows.doc[i - 1]:
            assert windows.start[i] == windows.start[i - 1] + windows.length[i - 1] - 1
    assert windows.scored.sum() == np.maximum(lengths - 1, 0).sum()
    with pytest.raises(ValueError, match="context must be >= 2"):
        make_windows(lengths, 1)


def test_shards_split_windows_in_order_and_go_round_robin_to_groups() -> None:
    assert shard_count(10, 4) == 3 and shard_count(8, 4) == 2
    assert [shard_slice(s, 10, 4) for s in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert shards_of_group(7, 0, 3) == [0, 3, 6] and shards_of_group(7, 2, 3) == [2, 5]
    assert sorted(s for g in range(3) for s in shards_of_group(7, g, 3)) == list(range(7))


def test_batches_take_every_window_once_within_the_token_budget() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 33, size=50)
    packed = batches(lengths, 64)
    assert sorted(i for batch in packed for i in batch) == list(range(50))
    for batch in packed:
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= 64
        assert lengths[batch[0]] == longest
    # a window longer than the budget still gets a batch of its own
    assert batches(np.array([100, 3]), 64) == [[0], [1]]


def _columns(n: int, samples: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    out = {name: rng.integers(0, 50, size=n) for name in store.INT_COLUMNS}
    out.update({name: rng.random(n).astype(np.float32) for name in store.COLUMNS if name not in store.INT_COLUMNS})
    if samples:
        out.update({name: rng.random((n, samples)).astype(np.float32) for name in store.ESTIMATOR_COLUMNS})
    return out


def test_shard_files_round_trip_and_leave_no_temporary_file(tmp_path: Path) -> None:
    first, second = _columns(5, samples=3), _columns(7, samples=3)
    store.write_shard(tmp_path, 0, first, metadata={"shard": 0})
    store.write_shard(tmp_path, 1, second, metadata={"shard": 1})
    assert store.shards_on_disk(tmp_path) == {0, 1}
    assert sorted(os.listdir(tmp_path / "tokens")) == ["shard-000000.parquet", "shard-000001.parquet"]
    back = store.read_columns(tmp_path, [0, 1], [*store.COLUMNS, *store.ESTIMATOR_COLUMNS])
    for name in store.COLUMNS:
        np.testing.assert_array_equal(back[name], np.concatenate([first[name], second[name]]))
    assert back["k2"].shape == (12, 3)
    np.testing.assert_array_equal(back["k2"], np.concatenate([first["k2"], second["k2"]]))
    schema = pq.read_schema(store.shard_path(tmp_path, 1))
    assert json.loads(schema.metadata[b"shardkl"]) == {"shard": 1}


def test_stale_temporaries_are_removed_and_never_count_as_shards(tmp_path: Path) -> None:
    store.write_shard(tmp_path, 3, _columns(4))
    stale = tmp_path / "tokens" / ".shard-000004.parquet.0123abcd.tmp"
    stale.write_bytes(b"half a file")
    assert store.shards_on_disk(tmp_path) == {3}
    assert store.remove_temporaries(tmp_path) == 1 and not stale.exists()


def test_an_output_folder_holds_one_audit(tmp_path: Path) -> None:
    identity = {"context": 16, "shards": 3}
    out = tmp_path / "out"
    store.check_identity(out, identity, resume=False)  # nothing there yet
    store.check_identity(out, identity, resume=True)  # --resume on nothing starts one
    store.write_identity(out, identity)
    store.check_identity(out, identity, resume=False)  # a run that failed before its first shard left only this
    store.write_shard(out, 0, _columns(3))
    with pytest.raises(AuditInputError, match=r"already holds an audit \(1 shard file\(s\)\); pass --resume"):
        store.check_identity(out, identity, resume=False)
    store.check_identity(out, identity, resume=True)
    with pytest.raises(AuditInputError, match="holds a different audit: context is 16 there, 32 now"):
        store.check_identity(out, {**identity, "context": 32}, resume=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(AuditInputError, match="exists and is not a folder"):
        store.check_identity(tmp_path / "file", identity, resume=False)
