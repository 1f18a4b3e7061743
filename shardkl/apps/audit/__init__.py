"""KL audit of two Hugging Face causal LMs over a corpus (the application behind ``launch/kl_audit.py``).

Per scored token: KL(P‖Q) and KL(Q‖P) over the full vocabulary, each model's log-prob of the actual next token,
entropy and top-1 id, all from the models' last hidden states and each rank's rows of their output layers through
:class:`shardkl.LinearLogits` (the logits never exist), one all-gather of a few floats per token per call. Values go
to parquet, one file per shard; the summary (exact quantiles), the report and the plots are computed from the files
at the end, so resume is skipping the shards on disk.

Modules, in the order data flows through them:

- ``config``: the keys (:class:`AuditConfig`);
- ``corpus``: documents, tokens, windows, shards, batches (numpy only);
- ``models``: checks of the model pair before any work; loading per rank; this rank's output-layer rows;
- ``plan``: every check and decision before any rank computes (:func:`plan_audit`);
- ``compute``: one batch's per-token values (:func:`score_batch`);
- ``store``: the files under ``OUT/`` (atomic shard writes, the audit's identity for ``--resume``);
- ``job``: one rank's loop over its shards and rank 0's summary (:func:`run_rank`, :func:`finish_audit`);
- ``stats``, ``plots``: the summary's statistics and the report; the plots;
- ``progress``: tokens/s and time left on stderr; ``ray``: the same job as a Ray Train run.

Nothing here is imported by the library; ``pyarrow``, ``transformers``, ``matplotlib`` and ``tqdm`` come with the
``audit`` extra.
"""

from __future__ import annotations

from shardkl.apps.audit.config import AuditConfig
from shardkl.apps.audit.corpus import AuditInputError

__all__ = ["AuditConfig", "AuditInputError"]
