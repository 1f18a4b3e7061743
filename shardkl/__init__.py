"""shardkl: exact KL divergence, entropy and token log-probs of vocabulary-sharded logits.

Each rank passes its contiguous slice of the vocabulary; per-shard statistics are merged with one
all-gather of a few floats per token, so no rank materialises the full-vocabulary softmax.
"""

from __future__ import annotations

from shardkl import nn  # noqa: F401 - the submodule shardkl.nn, kept out of __all__
from shardkl._divergences import Direction
from shardkl.distill import DIVERGENCES, Divergence, TopKTeacher, distillation_loss, jsd, topk_kl
from shardkl.distributed import CollectiveError
from shardkl.estimators import SAMPLED_ESTIMATORS, SampledEstimator, k1, k2, k3
from shardkl.functional import (
    CompareStats,
    KLStats,
    compare_stats,
    entropy,
    exact_kl,
    kl_stats,
    sampled_kl,
    token_logprobs,
)
from shardkl.kernels import IMPLS, Impl
from shardkl.layout import VocabLayout, shard_bounds
from shardkl.linear import HIDDEN_GRADS, HiddenGrad, LinearLogits
from shardkl.losses import ESTIMATORS, Estimator, GRPOLoss, grpo_loss, kl_penalty
from shardkl.options import NAN_POLICIES, NanPolicy, Options, set_collective_timeout
from shardkl.reduction import REDUCTIONS, Reduction, reduce_tokens
from shardkl.sampling import sample_tokens

__version__ = "0.2.0"

# `nn` is a submodule (shardkl.nn.KLPenalty, ...), not in __all__: a star import must not shadow torch.nn
__all__ = [
    "DIVERGENCES",
    "ESTIMATORS",
    "HIDDEN_GRADS",
    "IMPLS",
    "NAN_POLICIES",
    "REDUCTIONS",
    "SAMPLED_ESTIMATORS",
    "CollectiveError",
    "CompareStats",
    "Direction",
    "Divergence",
    "Estimator",
    "GRPOLoss",
    "HiddenGrad",
    "Impl",
    "KLStats",
    "LinearLogits",
    "NanPolicy",
    "Options",
    "Reduction",
    "SampledEstimator",
    "TopKTeacher",
    "VocabLayout",
    "__version__",
    "compare_stats",
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
    "reduce_tokens",
    "sample_tokens",
    "sampled_kl",
    "set_collective_timeout",
    "shard_bounds",
    "token_logprobs",
    "topk_kl",
]

_MOVED = {"count_collectives": "shardkl.testing", "CollectiveCounter": "shardkl.testing"}


def __getattr__(name: str) -> object:
    if name in _MOVED:
        raise AttributeError(
            f"shardkl.{name} moved to {_MOVED[name]}.{name} (it patches torch.distributed for the whole process, "
            "so it lives with the test utilities)"
        )
    raise AttributeError(f"module 'shardkl' has no attribute {name!r}")
