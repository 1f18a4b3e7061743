"""The corpus of an audit: documents, their tokens, windows, shards and batches; all deterministic, no torch.

- **Documents** come from a text file (one document per line), JSONL (the text in ``text_key``) or parquet (the
  column ``text_key``). A document's index ``doc`` is its line (text, JSONL) or its row (parquet), 0-based; a blank
  line is an empty document (it keeps the numbering and scores nothing).
- **Tokens**: every document is tokenized with P's tokenizer as it is (its special tokens included), all tokens in
  one flat array with per-document offsets.
- **Windows**: a document of ``L`` tokens is cut into windows of at most ``context`` tokens that start every
  ``context - 1`` tokens, so consecutive windows share one token: a window scores each of its positions that has a
  next token in the window, and every position of the document that has a successor is scored exactly once (at
  position ``pos % (context - 1)`` of window ``pos // (context - 1)``). Each window is a forward pass of its own:
  its first token sees no earlier context.
- **Shards**: ``shard_windows`` consecutive windows (the last shard may hold fewer); shard ``s`` belongs to
  data-parallel group ``s % groups``. A shard is the unit of output (one parquet file) and of resume.
- **Batches**: a shard's windows sorted by length (longest first, ties in window order) and packed greedily while
  ``windows x longest length <= batch_tokens``; the same for any number of ranks, so every sampled token of
  ``--estimators`` (seeded per shard and batch) is too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

DataFormat = Literal["text", "jsonl", "parquet"]


class AuditInputError(ValueError):
    """Bad input to an audit (a file, a model, the corpus, the output folder); the message is one line."""


def data_format(path: str | Path) -> DataFormat:
    """The format of a corpus file, by its suffix.

    Args:
        path: the corpus file.

    Returns:
        ``"jsonl"`` for ``.jsonl``/``.ndjson``, ``"parquet"`` for ``.parquet``/``.pq``, else ``"text"``.
    """
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return "text"


def _keys(obj: dict[str, Any]) -> str:
    names = sorted(obj)
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "none"


def read_documents(path: str | Path, *, text_key: str = "text", limit: int = 0) -> tuple[list[str], DataFormat]:
    """The documents of a corpus file, in file order.

    Args:
        path: a text file (one document per line), ``.jsonl``/``.ndjson`` or ``.parquet``/``.pq``.
        text_key: the JSONL field or parquet column that holds the text.
        limit: read only the first ``limit`` documents; 0 for all.

    Returns:
        ``(documents, format)``; ``documents[doc]`` is the text of document ``doc``.

    Raises:
        AuditInputError: a missing or unreadable file, invalid JSON, a missing key or column, a value that is not
            text; one line naming the file, the line or row, and what was expected.
    """
    file = Path(path)
    if not file.is_file():
        raise AuditInputError(f"data: no such file: {path}")
    kind = data_format(file)
    try:
        if kind == "parquet":
            return _read_parquet(file, text_key, limit), kind
        with file.open(encoding="utf-8", newline="") as handle:
            lines = _lines(handle, limit)
            if kind == "text":
                return list(lines), kind
            return _parse_jsonl(file, lines, text_key), kind
    except UnicodeDecodeError as exc:
        raise AuditInputError(f"data: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise AuditInputError(f"data: cannot read {path}: {exc.strerror or exc}") from None


def _lines(handle: Iterable[str], limit: int) -> Iterable[str]:
    """Lines without their line ending (``\\n`` or ``\\r\\n``), at most ``limit`` (0: all)."""
    for count, line in enumerate(handle):
        if limit and count >= limit:
            return
        yield line.rstrip("\n").removesuffix("\r")


def _parse_jsonl(file: Path, lines: Iterable[str], text_key: str) -> list[str]:
    documents = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            documents.append("")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AuditInputError(f"data: {file} line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise AuditInputError(f"data: {file} line {number} must be a JSON object, got {type(obj).__name__}")
        if text_key not in obj:
            raise AuditInputError(
                f"data: {file} line {number} has no key {text_key!r} (its keys: {_keys(obj)}); "
                "choose the text's key with --text_key"
            )
        text = obj[text_key]
        if not isinstance(text, str):
            raise AuditInputError(
                f"data: {file} line {number}: {text_key!r} must be a string, got {type(text).__name__}"
            )
        documents.append(text)
    return documents


def _read_parquet(file: Path, text_key: str, limit: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as exc:
        raise AuditInputError(f"data: {file} is not a readable parquet file ({str(exc).splitlines()[0]})") from None
    names = parquet.schema_arrow.names
    if text_key not in names:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise AuditInputError(
            f"data: {file} has no column {text_key!r} (its columns: {shown or 'none'}); choose one with --text_key"
        )
    kind = parquet.schema_arrow.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise AuditInputError(f"data: {file} column {text_key!r} must hold strings, got {kind}")
    documents: list[str] = []
    for batch in parquet.iter_batches(columns=[text_key]):
        documents.extend(text or "" for text in batch.column(0).to_pylist())
        if limit and len(documents) >= limit:
            return documents[:limit]
    return documents


@dataclass(frozen=True)
class Corpus:
    """Every document's tokens, flat.

    Attributes:
        ids: ``[total tokens]`` int64 token ids, document after document.
        offsets: ``[documents + 1]`` int64; document ``d`` holds ``ids[offsets[d]:offsets[d + 1]]``.
    """

    ids: np.ndarray
    offsets: np.ndarray

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """``[documents]`` tokens per document."""
        return np.diff(self.offsets)

    def tokens(self, doc: int, start: int, length: int) -> np.ndarray:
        """``length`` tokens of document ``doc`` from position ``start``."""
        first = int(self.offsets[doc]) + start
        return self.ids[first : first + length]


def tokenize(documents: Sequence[str], tokenizer: Any, *, batch: int = 1024) -> Corpus:
    """Tokenize every document as the tokenizer does by default (its special tokens included).

    Args:
        documents: the texts, in document order.
        tokenizer: a Hugging Face tokenizer (P's).
        batch: documents per call of the tokenizer.

    Returns:
        :class:`Corpus`: all tokens, flat, with per-document offsets.
    """
    parts: list[np.ndarray] = []
    lengths = np.zeros(len(documents), dtype=np.int64)
    for first in range(0, len(documents), batch):
        encoded = tokenizer(list(documents[first : first + batch]), add_special_tokens=True)["input_ids"]
        for i, ids in enumerate(encoded):
            lengths[first + i] = len(ids)
            parts.append(np.asarray(ids, dtype=np.int64))
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return Corpus(ids, offsets)


@dataclass(frozen=True)
class Windows:
    """The windows of a corpus, in document order.

    Attributes:
        doc: ``[windows]`` the document of each window.
        start: ``[windows]`` its first token's position in the document.
        length: ``[windows]`` its tokens (2 to ``context``); it scores ``length - 1`` positions.
    """

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray

    def __len__(self) -> int:
        return len(self.doc)

    @property
    def scored(self) -> np.ndarray:
        """``[windows]`` scored positions per window."""
        return self.length - 1


def make_windows(lengths: np.ndarray, context: int) -> Windows:
    """Cut documents of the given token counts into windows of at most ``context`` tokens, consecutive windows of a
    document sharing one token (see the module docstring); documents of fewer than 2 tokens have none.

    Args:
        lengths: ``[documents]`` tokens per document.
        context: tokens per window, >= 2.

    Returns:
        :class:`Windows`, by document, then by start.
    """
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    stride = context - 1
    lengths = np.asarray(lengths, dtype=np.int64)
    # positions with a successor, L - 1 per document, in ceil((L - 1) / stride) windows
    counts = np.where(lengths >= 2, -(-(lengths - 1) // stride), 0)
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    first_window = np.cumsum(counts) - counts
    index_in_doc = np.arange(len(doc), dtype=np.int64) - np.repeat(first_window, counts)
    start = index_in_doc * stride
    length = np.minimum(context, lengths[doc] - start)
    return Windows(doc, start, length)


def shard_count(windows: int, shard_windows: int) -> int:
    """Number of shards of ``shard_windows`` windows each (the last may hold fewer).

    Args:
        windows: windows of the corpus.
        shard_windows: windows per shard.

    Returns:
        ``ceil(windows / shard_windows)``.
    """
    return -(-windows // shard_windows)


def shard_slice(shard: int, windows: int, shard_windows: int) -> slice:
    """The windows of one shard.

    Args:
        shard: the shard's index.
        windows: windows of the corpus.
        shard_windows: windows per shard.

    Returns:
        The slice of window indices.
    """
    return slice(shard * shard_windows, min((shard + 1) * shard_windows, windows))


def shards_of_group(shards: int, group: int, groups: int) -> list[int]:
    """The shards one data-parallel group computes: round-robin.

    Args:
        shards: number of shards to deal.
        group: the group's index.
        groups: number of groups.

    Returns:
        ``[group, group + groups, ...]``.
    """
    return list(range(group, shards, groups))


def batches(lengths: np.ndarray, batch_tokens: int) -> list[list[int]]:
    """Pack windows into forward passes: indices into ``lengths``, longest windows first.

    Each batch holds at least one window and, beyond one, ``windows x its longest length <= batch_tokens``.

    Args:
        lengths: ``[windows]`` tokens of each window of one shard.
        batch_tokens: budget of one forward pass (padded tokens).

    Returns:
        Lists of window indices; every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * int(lengths[out[-1][0]]) <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


__all__ = [
    "AuditInputError",
    "Corpus",
    "DataFormat",
    "Windows",
    "batches",
    "data_format",
    "make_windows",
    "read_documents",
    "shard_count",
    "shard_slice",
    "shards_of_group",
    "tokenize",
]
