"""Everything an audit checks and decides before any rank computes: :func:`plan_audit`.

Every rank (and the Ray driver) runs it on the same files, before any process group exists, and gets the same plan,
so a bad input is the same one-line :class:`~shardkl.apps.audit.corpus.AuditInputError` everywhere and nothing is
written (under torchrun the ranks then agree in one all-reduce that one refused, print their lines and exit 2
together). The plan holds the tokenized corpus, its windows and shards, the real vocabulary size and the audit's
identity (what ``OUT/audit.json`` records and ``--resume`` compares).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shardkl.apps.audit import store
from shardkl.apps.audit.config import AuditConfig
from shardkl.apps.audit.corpus import (
    AuditInputError,
    Corpus,
    DataFormat,
    Windows,
    batches,
    make_windows,
    read_documents,
    shard_count,
    shard_slice,
    tokenize,
)
from shardkl.apps.audit.models import ModelInfo, inspect_pair


@dataclass(frozen=True)
class AuditPlan:
    """What an audit computes, the same on every rank.

    Attributes:
        config: the audit's keys.
        corpus: every document's tokens.
        windows: the windows, in document order.
        shards: number of shards.
        documents_in_data: documents in the data file (read, whether or not they score a token).
        data_format: ``"text"``, ``"jsonl"`` or ``"parquet"``.
        vocab_size: the real vocabulary (P's tokenizer's ids).
        p_info, q_info: what :func:`shardkl.apps.audit.models.inspect_pair` read.
        identity: what ``OUT/audit.json`` holds.
    """

    config: AuditConfig
    corpus: Corpus
    windows: Windows
    shards: int
    documents_in_data: int
    data_format: DataFormat
    vocab_size: int
    p_info: ModelInfo
    q_info: ModelInfo
    identity: dict[str, Any]

    @property
    def tokens(self) -> int:
        """Scored tokens of the whole corpus."""
        return int(self.windows.scored.sum())

    def shard_tokens(self, shard: int) -> int:
        """Scored tokens of one shard."""
        return int(self.windows.scored[self._slice(shard)].sum())

    def _slice(self, shard: int) -> slice:
        return shard_slice(shard, len(self.windows), self.config.shard_windows)

    def shard_batches(self, shard: int) -> list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """The forward passes of one shard: ``(window indices, ids [B, T], lengths [B])`` each, ids right-padded
        with 0 (padding is never scored and, attention being causal, never seen by a scored position)."""
        part = self._slice(shard)
        lengths = self.windows.length[part]
        out = []
        for members in batches(lengths, self.config.batch_tokens):
            index = np.arange(part.start, part.stop)[members]
            width = int(self.windows.length[index].max())
            ids = torch.zeros(len(index), width, dtype=torch.long)
            for row, w in enumerate(index):
                tokens = self.corpus.tokens(int(self.windows.doc[w]), int(self.windows.start[w]),
                                            int(self.windows.length[w]))
                ids[row, : len(tokens)] = torch.from_numpy(tokens)
            out.append((index, ids, torch.from_numpy(self.windows.length[index].copy())))
        return out


def world_size_from_env() -> int:
    """The number of ranks of this job.

    Returns:
        ``WORLD_SIZE`` under torchrun, else 1.
    """
    return int(os.environ.get("WORLD_SIZE", "1"))


def plan_audit(config: AuditConfig, *, world_size: int, check_out: bool = True) -> AuditPlan:
    """Check every input and plan the audit; nothing is written.

    Args:
        config: the audit's keys.
        world_size: ranks of the job (torchrun's ``WORLD_SIZE``, or the Ray workers).
        check_out: refuse an output folder that holds another audit, or any audit without ``--resume``
            (:func:`shardkl.apps.audit.store.check_identity`); the Ray workers skip it (the driver checked, then
            wrote the identity).

    Returns:
        :class:`AuditPlan`.

    Raises:
        AuditInputError: one line naming the bad input, with the expected and actual values.
    """
    if config.tp > 1 and world_size == 1:
        raise AuditInputError(
            f"tp={config.tp} needs {config.tp} ranks per group: run under torchrun --nproc-per-node {config.tp} or "
            f"with --ray --num_workers {config.tp}"
        )
    if world_size % config.tp:
        raise AuditInputError(
            f"tp: {world_size} rank(s) do not split into groups of tp={config.tp}; run a multiple of {config.tp} "
            "ranks"
        )
    data = Path(config.data)
    if not data.is_file():
        raise AuditInputError(f"data: no such file: {config.data}")
    p_info, q_info, tokenizer, vocab = inspect_pair(
        config.p_model, config.q_model, trust_remote_code=config.trust_remote_code, context=config.context,
        tp=config.tp,
    )
    documents, kind = read_documents(data, text_key=config.text_key, limit=config.max_documents)
    if not documents:
        raise AuditInputError(f"data: {config.data} holds no documents: nothing to audit")
    corpus = tokenize(documents, tokenizer)
    too_large = int(corpus.ids.max()) if corpus.ids.size else -1
    if too_large >= vocab:
        raise AuditInputError(f"data: the tokenizer produced id {too_large}, beyond its own {vocab} ids")
    windows = make_windows(corpus.lengths, config.context)
    if len(windows) == 0:
        raise AuditInputError(
            f"data: none of the {len(documents)} document(s) of {config.data} has 2 or more tokens: nothing to score"
        )
    shards = shard_count(len(windows), config.shard_windows)
    identity = {
        "p_model": str(Path(config.p_model).resolve()),
        "q_model": str(Path(config.q_model).resolve()),
        "p_dtype": config.p_dtype,
        "q_dtype": config.q_dtype,
        "data": str(data.resolve()),
        "data_bytes": data.stat().st_size,
        "text_key": config.text_key if kind != "text" else None,
        "max_documents": config.max_documents,
        "context": config.context,
        "shard_windows": config.shard_windows,
        "batch_tokens": config.batch_tokens,
        "estimators": config.estimators,
        "seed": config.seed,
        "materialise": config.materialise,
        "vocab_size": vocab,
        "documents": len(documents),
        "windows": len(windows),
        "tokens": int(windows.scored.sum()),
        "shards": shards,
    }
    if check_out:
        store.check_identity(config.out, identity, resume=config.resume)
    return AuditPlan(config, corpus, windows, shards, len(documents), kind, vocab, p_info, q_info, identity)


__all__ = ["AuditInputError", "AuditPlan", "plan_audit", "world_size_from_env"]
