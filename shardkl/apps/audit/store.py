"""What an audit keeps on disk under ``OUT/``: the per-token parquet files, the audit's identity, the summary.

- ``OUT/tokens/shard-SSSSSS.parquet``: one file per shard, written once by TP rank 0 of the data-parallel group that
  computed it, atomically (a temporary name in the same folder, then ``os.replace``), so a file that exists is
  complete. Rows sorted by ``(doc, pos)``; columns :data:`COLUMNS` (plus ``k1``, ``k2``, ``k3``: one list of
  ``--estimators`` values per token). The file's metadata names the shard and the data-parallel group.
- ``OUT/audit.json``: what the audit is (models, data, context, shards, ...), written before the first shard; a
  resumed audit must match it key for key (:func:`check_identity`), so no shard is ever mixed into a different
  audit, while the number of ranks (``tp``, groups) may change between runs.
- Shards on disk are the resume state: a shard whose file exists is skipped; the summary is computed from the files
  alone, so a token is counted once however often the job was stopped.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shardkl.apps.audit.corpus import AuditInputError

COLUMNS = ("doc", "pos", "token", "kl_pq", "kl_qp", "logp_p", "logp_q", "entropy_p", "entropy_q", "top1_p", "top1_q")
"""Per-token columns, in file order: ids are int64, values float32."""
INT_COLUMNS = ("doc", "pos", "token", "top1_p", "top1_q")
ESTIMATOR_COLUMNS = ("k1", "k2", "k3")
IDENTITY_FILE = "audit.json"
TOKENS_DIR = "tokens"
_SHARD = re.compile(r"shard-(\d{6,})\.parquet")
_TEMPORARY = re.compile(r"\.shard-\d{6,}\.parquet\.[0-9a-f]+\.tmp")


def shard_path(out: str | Path, shard: int) -> Path:
    """Where a shard's file lives.

    Args:
        out: the audit's output folder.
        shard: the shard's index.

    Returns:
        ``OUT/tokens/shard-SSSSSS.parquet``.
    """
    return Path(out) / TOKENS_DIR / f"shard-{shard:06d}.parquet"


def shards_on_disk(out: str | Path) -> set[int]:
    """The shards whose file exists (complete, by construction).

    Args:
        out: the audit's output folder.

    Returns:
        Their indices.
    """
    folder = Path(out) / TOKENS_DIR
    if not folder.is_dir():
        return set()
    return {int(m.group(1)) for name in os.listdir(folder) if (m := _SHARD.fullmatch(name))}


def remove_temporaries(out: str | Path) -> int:
    """Delete the temporary files of writers that were stopped mid-write. Call it only while no rank writes.

    Args:
        out: the audit's output folder.

    Returns:
        How many were deleted.
    """
    folder = Path(out) / TOKENS_DIR
    if not folder.is_dir():
        return 0
    stale = [name for name in os.listdir(folder) if _TEMPORARY.fullmatch(name)]
    for name in stale:
        (folder / name).unlink(missing_ok=True)
    return len(stale)


def write_shard(
    out: str | Path, shard: int, columns: Mapping[str, np.ndarray], *, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write one shard's per-token rows atomically: a temporary file in the same folder, then ``os.replace``.

    Args:
        out: the audit's output folder.
        shard: the shard's index.
        columns: :data:`COLUMNS` (1-D, one row per scored token), optionally ``k1``/``k2``/``k3`` as
            ``[tokens, samples]`` arrays.
        metadata: JSON-able values stored in the file's schema metadata under ``shardkl``.

    Returns:
        The shard's path.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays: dict[str, Any] = {}
    for name in COLUMNS:
        values = np.asarray(columns[name])
        arrays[name] = pa.array(values.astype(np.int64 if name in INT_COLUMNS else np.float32, copy=False))
    for name in ESTIMATOR_COLUMNS:
        if name in columns:
            values = np.asarray(columns[name], dtype=np.float32)
            flat = pa.array(values.reshape(-1))
            arrays[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    table = pa.table(arrays).replace_schema_metadata({"shardkl": json.dumps(dict(metadata or {}))})
    path = shard_path(out, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def read_columns(out: str | Path, shards: Sequence[int], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns of the given shards' files, concatenated in shard order.

    Args:
        out: the audit's output folder.
        shards: the shards to read, in order.
        names: the columns to read.

    Returns:
        ``{name: array}``; estimator columns come back as ``[tokens, samples]`` float arrays.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for shard in shards:
        table = pq.read_table(shard_path(out, shard), columns=list(names))
        for name in names:
            column = table.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(column.type):
                size = column.type.list_size
                values = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, size)
            else:
                values = column.to_numpy(zero_copy_only=False)
            parts[name].append(values)
    return {name: np.concatenate(arrays) if arrays else np.zeros(0) for name, arrays in parts.items()}


def check_identity(out: str | Path, identity: Mapping[str, Any], *, resume: bool) -> None:
    """Refuse an output folder that would mix two audits.

    Without ``resume``, ``out`` must hold no shard file yet (an identity alone, left by a run that failed before its
    first shard, is replaced). With it, an audit there must have the same identity (an empty or missing folder
    simply starts one).

    Args:
        out: the output folder.
        identity: the audit's identity (:attr:`shardkl.apps.audit.plan.AuditPlan.identity`).
        resume: the ``--resume`` key.

    Raises:
        AuditInputError: one line naming the folder and, on a mismatch, the first differing key with both values.
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise AuditInputError(f"out: {out} exists and is not a folder")
    file = folder / IDENTITY_FILE
    done = shards_on_disk(folder)
    if not resume:
        if done:
            raise AuditInputError(
                f"out: {out} already holds an audit ({len(done)} shard file(s)); pass --resume to continue it, or "
                "choose another --out"
            )
        return
    if not file.exists():
        if done:
            raise AuditInputError(f"out: {out} holds shard files but no {IDENTITY_FILE}; cannot tell what they are")
        return
    try:
        written = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AuditInputError(f"out: cannot read {file}: {exc}") from None
    for key, value in identity.items():
        if written.get(key) != value:
            raise AuditInputError(
                f"--resume: {out} holds a different audit: {key} is {written.get(key)!r} there, {value!r} now"
            )


def write_identity(out: str | Path, identity: Mapping[str, Any]) -> None:
    """Create ``OUT/tokens/`` and write ``OUT/audit.json`` (atomically).

    Args:
        out: the output folder.
        identity: what the audit is.
    """
    folder = Path(out)
    (folder / TOKENS_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / IDENTITY_FILE, identity)


def write_json_atomic(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write indented JSON through a temporary file and ``os.replace``.

    Args:
        path: the file.
        payload: JSON-able values.

    Returns:
        The path.
    """
    target = Path(path)
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        temporary.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


__all__ = [
    "COLUMNS",
    "ESTIMATOR_COLUMNS",
    "IDENTITY_FILE",
    "TOKENS_DIR",
    "check_identity",
    "read_columns",
    "remove_temporaries",
    "shard_path",
    "shards_on_disk",
    "write_identity",
    "write_json_atomic",
    "write_shard",
]
