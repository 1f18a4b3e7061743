"""shardkl: exact KL divergence, entropy and token log-probs of vocabulary-sharded logits.

Each rank passes its contiguous slice of the vocabulary; per-shard statistics are merged with one
all-gather of a few floats per token, so no rank materialises the full-vocabulary softmax.
"""

from __future__ import annotations

from shardkl import nn
from shardkl.distributed import CollectiveCounter, CollectiveError, count_collectives, set_collective_timeout
from shardkl.estimators import k1, k2, k3
from shardkl.functional import (
    ESTIMATORS,
    Estimator,
    KLStats,
    entropy,
    exact_kl,
    kl_stats,
    sampled_kl,
    token_logprobs,
)
from shardkl.losses import PENALTY_KINDS, GRPOLoss, PenaltyKind, grpo_loss, kl_penalty
from shardkl.reduction import REDUCTIONS, Reduction, reduce_tokens

__version__ = "0.1.0"

__all__ = [
    "ESTIMATORS",
    "REDUCTIONS",
    "CollectiveCounter",
    "CollectiveError",
    "Estimator",
    "GRPOLoss",
    "KLStats",
    "PENALTY_KINDS",
    "PenaltyKind",
    "Reduction",
    "__version__",
    "count_collectives",
    "entropy",
    "exact_kl",
    "grpo_loss",
    "k1",
    "k2",
    "k3",
    "kl_penalty",
    "kl_stats",
    "nn",
    "reduce_tokens",
    "sampled_kl",
    "set_collective_timeout",
    "token_logprobs",
]
