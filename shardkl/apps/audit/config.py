"""The keys of ``launch/kl_audit.py``: one frozen dataclass, parsed by :mod:`shardkl.apps.cli`.

Checks that need nothing but the values themselves live in ``__post_init__`` (a bad value is one line and exit status
2 on every rank, before anything else happens); checks that read files (models, tokenizers, the corpus, the output
folder) are in :func:`shardkl.apps.audit.plan.plan_audit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

ModelDtype = Literal["float32", "bfloat16"]
Trunk = Literal["auto", "replicated"]


@dataclass(frozen=True)
class AuditConfig:
    """audit (P is the reference: KL(P||Q) takes its expectation under P, and --estimators samples from P)"""

    p_model: str = ""
    """(required) Hugging Face model directory (from save_pretrained) of P, the reference; its tokenizer tokenizes
    the corpus"""
    q_model: str = ""
    """(required) Hugging Face model directory of Q, the model audited against P (same tokenizer, same real
    vocabulary)"""
    data: str = ""
    """(required) corpus: a .jsonl or .parquet file (text in --text_key), or any other file as text, one document
    per line"""
    out: str = ""
    """(required) output folder: tokens/*.parquet (per token), summary.json, report.txt, plots (*.png)"""
    tp: int = 1
    """ranks per tensor-parallel group: the vocabulary is split over them; the corpus over world_size / tp groups"""
    ray: bool = False
    """run as a Ray Train job (num_workers workers) instead of in this process or under torchrun"""
    num_workers: int = 2
    """with --ray: Ray Train workers (a multiple of tp; one CPU each)"""
    ray_address: str = ""
    """with --ray: cluster to join (auto, HOST:PORT, ray://...); empty: $RAY_ADDRESS if set, else an embedded local
    instance"""
    max_failures: int = 2
    """with --ray: how many times Ray Train restarts the workers after one fails; finished shards are kept"""
    trust_remote_code: bool = False
    """let transformers run the model directories' own Python code (off: only architectures transformers ships)"""
    p_dtype: ModelDtype = "float32"
    """dtype P is loaded in (the KL is computed in float32 either way)"""
    q_dtype: ModelDtype = "float32"
    """dtype Q is loaded in"""
    text_key: str = "text"
    """field (JSONL) or column (parquet) that holds each document's text"""
    context: int = 512
    """tokens per window; a window scores each of its positions that has a next token in it, and windows of one
    document overlap by one token, so every position of a document that has a successor is scored exactly once"""
    estimators: int = 0
    """tokens drawn from P per position to compare Schulman's k1/k2/k3 with the exact KL(P||Q); 0 for none"""
    resume: bool = False
    """continue the audit already in --out: shards on disk are kept and skipped (without it, a non-empty --out is
    refused)"""
    batch_tokens: int = 4096
    """tokens per forward pass (windows x their padded length; at least one window)"""
    shard_windows: int = 64
    """windows per shard; each shard is one parquet file, written once, and the unit of resume"""
    max_documents: int = 0
    """audit only the first N documents of the corpus; 0 for all"""
    seed: int = 0
    """seed of the tokens drawn for --estimators (the same draws for any tp and any number of groups)"""
    trunk: Trunk = "auto"
    """auto: with tp > 1 and one tensor-parallel group spanning all ranks, load each model tensor-parallel with
    transformers' tp_plan where the architecture has one (else replicated); replicated: every rank holds whole
    models and keeps only its rows of the output layer"""
    materialise: bool = False
    """compute each model's logits (this rank's vocabulary rows) as a tensor and pass those to shardkl, for
    comparison: the same statistics, with the logits' memory"""
    plots: bool = True
    """write the plots (matplotlib)"""
    threads: int = 0
    """torch CPU threads per rank; 0: the CPUs this process may use divided by the ranks on this machine"""
    timeout_s: float = 600.0
    """seconds a collective may wait for the other ranks before the job fails with one line"""
    progress_s: float = 10.0
    """seconds between progress lines when stderr is not a terminal (a terminal gets a live bar); 0 for none"""
    verbose: bool = False
    """with --ray: also forward Ray's own log lines and the workers' output to stderr"""

    def __post_init__(self) -> None:
        for name in ("p_model", "q_model", "data", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required (--{name} PATH)")
        if self.context < 2:
            raise ValueError(
                f"context must be >= 2 (a window needs a position and its next token to score), got {self.context}"
            )
        for name, low in (("tp", 1), ("num_workers", 1), ("batch_tokens", 1), ("shard_windows", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("estimators", "max_failures", "max_documents", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.progress_s < 0:
            raise ValueError(f"progress_s must be >= 0, got {self.progress_s}")
        for name, kind in (("p_dtype", ModelDtype), ("q_dtype", ModelDtype), ("trunk", Trunk)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"{name} must be one of {', '.join(get_args(kind))}, got {getattr(self, name)!r}")
        if self.ray and self.num_workers % self.tp:
            raise ValueError(
                f"num_workers must be a multiple of tp (groups of {self.tp} ranks), got {self.num_workers}"
            )


__all__ = ["AuditConfig", "ModelDtype", "Trunk"]
