"""shardkl: exact KL divergence, entropy and token log-probs of vocabulary-sharded logits.

Each rank passes its contiguous slice of the vocabulary; per-shard statistics are merged with one
all-gather of a few floats per token, so no rank materialises the full-vocabulary softmax.
"""

from __future__ import annotations

from shardkl import nn
from shardkl.distill import DIVERGENCES, Divergence, TopKTeacher, distillation_loss, jsd, topk_kl
from shardkl.distributed import CollectiveCounter, CollectiveError, count_collectives
from shardkl.estimators import SAMPLED_ESTIMATORS, SampledEstimator, k1, k2, k3
from shardkl.functional import KLStats, entropy, exact_kl, kl_stats, sampled_kl, token_logprobs
from shardkl.layout import VocabLayout, shard_bounds
from shardkl.linear import LinearLogits
from shardkl.losses import ESTIMATORS, Estimator, GRPOLoss, grpo_loss, kl_penalty
from shardkl.options import NAN_POLICIES, NanPolicy, Options, set_collective_timeout
from shardkl.reduction import REDUCTIONS, Reduction, reduce_tokens
from shardkl.sampling import sample_tokens

__version__ = "0.2.0"

__all__ = [
    "DIVERGENCES",
    "ESTIMATORS",
    "NAN_POLICIES",
    "REDUCTIONS",
    "SAMPLED_ESTIMATORS",
    "CollectiveCounter",
    "CollectiveError",
    "Divergence",
    "Estimator",
    "GRPOLoss",
    "KLStats",
    "LinearLogits",
    "NanPolicy",
    "Options",
    "Reduction",
    "SampledEstimator",
    "TopKTeacher",
    "VocabLayout",
    "__version__",
    "count_collectives",
    "distillation_loss",
    "entropy",
    "exact_kl",
    "grpo_loss",
    "jsd",
    "k1",
    "k2",
    "k3",
    "kl_penalty",
    "kl_stats",
    "nn",
    "reduce_tokens",
    "sample_tokens",
    "sampled_kl",
    "set_collective_timeout",
    "shard_bounds",
    "token_logprobs",
    "topk_kl",
]
