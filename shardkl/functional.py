"""Public functions of shardkl: exact KL, sampled estimators, token log-probs and entropy of sharded logits.

Every function takes this rank's contiguous slice of the vocabulary in the last dimension (slices in rank
order, sizes may differ, a rank may hold none) and the ``group`` the vocabulary is split over; ``group=None``
means the tensors hold the whole vocabulary. All of them are thin views of :func:`kl_stats`, which issues one
collective per call and none in backward.

Every function also accepts DTensor logits sharded on the last dimension (the group then comes from the mesh;
results are plain tensors, identical on the ranks of the vocabulary group) and ``valid_vocab_size=`` to drop a
padded vocabulary tail; ``shardkl._frontdoor`` does both before anything else.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from shardkl import estimators
from shardkl._engine import EngineOptions, ShardedStatsFunction
from shardkl._frontdoor import local_inputs
from shardkl.distributed import ProcessGroup
from shardkl.kernels import Impl, check_impl
from shardkl.reduction import Reduction, check_mask, check_reduction, reduce_tokens

Estimator = Literal["k1", "k2", "k3"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
NanPolicy = Literal["raise", "propagate"]
NAN_POLICIES: tuple[str, ...] = get_args(NanPolicy)


class KLStats(NamedTuple):
    """Per-token results of :func:`kl_stats`, each shaped like the logits without their last dimension.

    Attributes:
        exact_kl: KL(P‖Q) over the full vocabulary.
        entropy: entropy of P.
        p_logprobs: log P(x) at the given tokens (``None`` without tokens).
        q_logprobs: log Q(x) at the given tokens (``None`` without tokens).
        k1, k2, k3: Schulman's estimators of KL(P‖Q) at the tokens, assumed sampled from P (``None`` without tokens).
    """

    exact_kl: Tensor
    entropy: Tensor
    p_logprobs: Tensor | None
    q_logprobs: Tensor | None
    k1: Tensor | None
    k2: Tensor | None
    k3: Tensor | None


def _check_logits(name: str, logits: object) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension (at least 1-D), got a 0-d tensor")
    return logits


def _check_inputs(
    p_logits: object, q_logits: object | None, tokens: object | None, temperature: float
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Local validation, before any collective, so that no rank is left waiting on one that raised."""
    p = _check_logits("p_logits", p_logits)
    q = None
    if q_logits is not None:
        q = _check_logits("q_logits", q_logits)
        if q.shape != p.shape:
            raise ValueError(
                f"p_logits and q_logits must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}"
            )
        if q.device != p.device:
            raise ValueError(f"p_logits and q_logits must be on one device, got {p.device} and {q.device}")
    t = None
    if tokens is not None:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must have an integer dtype, got {tokens.dtype}")
        if tokens.shape != p.shape[:-1]:
            raise ValueError(
                f"tokens must have the logits' shape without the vocabulary dimension, {tuple(p.shape[:-1])}, "
                f"got {tuple(tokens.shape)}"
            )
        t = tokens.to(device=p.device, dtype=torch.long)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive number, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return p, q, t


def _options(vocab_size: object, validate: object, nan_policy: object, impl: object = "auto") -> EngineOptions:
    """Check the options every rank must agree on, before any collective."""
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 0):
        raise ValueError(f"vocab_size must be a non-negative int or None, got {vocab_size!r}")
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    check_impl(impl)
    return EngineOptions(validate=validate, nan_policy=str(nan_policy), vocab_size=vocab_size, impl=str(impl))


def _checked_kl_stats(
    p: Tensor,
    q: Tensor | None,
    t: Tensor | None,
    group: ProcessGroup | None,
    temperature: float,
    options: EngineOptions,
) -> KLStats:
    """:func:`kl_stats` on inputs that the public function has already unwrapped and checked."""
    if q is None:
        raise TypeError("q_logits must be a torch.Tensor, got None")
    kl, ent, logp, logq = ShardedStatsFunction.apply(p, q, t, group, float(temperature), options)
    if t is None:
        return KLStats(kl, ent, None, None, None, None, None)
    return KLStats(
        kl, ent, logp, logq, estimators.k1(logp, logq), estimators.k2(logp, logq), estimators.k3(logp, logq)
    )


def kl_stats(
    p_logits: Tensor,
    q_logits: Tensor,
    tokens: Tensor | None = None,
    *,
    group: ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    valid_vocab_size: int | None = None,
    validate: bool = True,
    nan_policy: NanPolicy = "raise",
    impl: Impl = "auto",
) -> KLStats:
    """All per-token results of two sharded policies from one collective.

    Args:
        p_logits: this rank's slice of the logits of P, the sampling distribution, ``[..., V_local]``.
        q_logits: this rank's slice of the logits of Q, same shape.
        tokens: global token ids sampled from P, shaped like the logits without the last dimension, or ``None``.
        group: process group the vocabulary is split over; ``None`` for full-vocabulary tensors.
        temperature: P = softmax(p_logits / T), Q = softmax(q_logits / T).
        vocab_size: the global vocabulary size, if known; checked against the sum of the local sizes (after
            ``valid_vocab_size`` dropped the padding).
        valid_vocab_size: real vocabulary size; columns with global id ``>= valid_vocab_size`` (padding at the
            end of the vocabulary, Megatron's equal partitions) count as ``-inf`` and get zero gradient.
        validate: check that the ranks' calls fit together (shapes, dtypes, temperature, vocab_size), folded into
            the one collective. Token ids are always checked against the vocabulary.
        nan_policy: ``"raise"``: a NaN or ``+inf`` logit raises ``ValueError`` on every rank; ``"propagate"``:
            the tokens concerned get NaN results.
        impl: kernels: ``"eager"``, ``"compiled"`` (torch.compile), ``"triton"`` (CUDA) or ``"auto"``; see
            :mod:`shardkl.kernels`. All give the same results to fp32 rounding.

    Returns:
        :class:`KLStats`, float32 (float64 for float64 input), differentiable with respect to both logits. Plain
        tensors also for DTensor logits (the same values on every rank of the vocabulary group).

    Shape:
        logits ``[..., V_local]`` → every field ``[...]``.
    """
    if q_logits is None:
        raise TypeError("q_logits must be a torch.Tensor, got None")
    p_logits, q_logits, tokens, _, group = local_inputs(
        p_logits, q_logits, tokens, group=group, valid_vocab_size=valid_vocab_size
    )
    p, q, t = _check_inputs(p_logits, q_logits, tokens, temperature)
    options = _options(vocab_size, validate, nan_policy, impl)
    return _checked_kl_stats(p, q, t, group, temperature, options)


def exact_kl(
    p_logits: Tensor,
    q_logits: Tensor,
    *,
    group: ProcessGroup | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "none",
    temperature: float = 1.0,
    vocab_size: int | None = None,
    valid_vocab_size: int | None = None,
    validate: bool = True,
    nan_policy: NanPolicy = "raise",
    impl: Impl = "auto",
) -> Tensor:
    """Exact KL(P‖Q) per token over the full, sharded vocabulary.

    Args:
        p_logits: this rank's slice of the logits of P, ``[..., V_local]``.
        q_logits: this rank's slice of the logits of Q, same shape.
        group: process group the vocabulary is split over; ``None`` for full-vocabulary tensors.
        mask: bool or 0/1 tensor shaped like the result; 1 = the token counts.
        reduction: see :func:`shardkl.reduce_tokens`.
        temperature: applied to both logits.
        vocab_size, valid_vocab_size, validate, nan_policy, impl: as in :func:`kl_stats`.

    Returns:
        Per-token KL ``[...]`` (masked tokens are 0) or a scalar; never negative, ``inf`` where P puts mass on a
        token that Q gives ``-inf``.
    """
    check_reduction(reduction)
    p_logits, q_logits, _, mask, group = local_inputs(
        p_logits, q_logits, None, mask, group=group, valid_vocab_size=valid_vocab_size
    )
    p, q, _ = _check_inputs(p_logits, q_logits, None, temperature)
    check_mask(mask, p.shape[:-1])
    options = _options(vocab_size, validate, nan_policy, impl)
    kl = _checked_kl_stats(p, q, None, group, temperature, options).exact_kl
    return reduce_tokens(kl, mask, reduction=reduction)


def sampled_kl(
    p_logits: Tensor,
    q_logits: Tensor,
    tokens: Tensor,
    *,
    estimator: Estimator = "k3",
    group: ProcessGroup | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "none",
    temperature: float = 1.0,
    vocab_size: int | None = None,
    valid_vocab_size: int | None = None,
    validate: bool = True,
    nan_policy: NanPolicy = "raise",
    impl: Impl = "auto",
) -> Tensor:
    """Schulman's estimator of KL(P‖Q) at tokens sampled from P.

    Args:
        p_logits: this rank's slice of the logits of P, the distribution the tokens were sampled from.
        q_logits: this rank's slice of the logits of Q, same shape.
        tokens: global token ids, ``[...]``.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        group, mask, reduction, temperature, vocab_size, valid_vocab_size, validate, nan_policy, impl: as in
            :func:`exact_kl`.

    Returns:
        Per-token estimates ``[...]`` or a scalar.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    check_reduction(reduction)
    p_logits, q_logits, tokens, mask, group = local_inputs(
        p_logits, q_logits, tokens, mask, group=group, valid_vocab_size=valid_vocab_size
    )
    p, q, t = _check_inputs(p_logits, q_logits, tokens, temperature)
    check_mask(mask, p.shape[:-1])
    options = _options(vocab_size, validate, nan_policy, impl)
    stats = _checked_kl_stats(p, q, t, group, temperature, options)
    values = {"k1": stats.k1, "k2": stats.k2, "k3": stats.k3}[estimator]
    assert values is not None
    return reduce_tokens(values, mask, reduction=reduction)


def token_logprobs(
    logits: Tensor,
    tokens: Tensor,
    *,
    group: ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    valid_vocab_size: int | None = None,
    validate: bool = True,
    nan_policy: NanPolicy = "raise",
    impl: Impl = "auto",
) -> Tensor:
    """``log softmax(logits / T)`` at the global token ids, over the sharded vocabulary.

    Args:
        logits: this rank's slice of the logits, ``[..., V_local]``.
        tokens: global token ids, ``[...]``.
        group: process group the vocabulary is split over; ``None`` for full-vocabulary tensors.
        temperature: softmax temperature.
        vocab_size, valid_vocab_size, validate, nan_policy, impl: as in :func:`kl_stats`.

    Returns:
        ``[...]`` log-probabilities, differentiable with respect to ``logits``.
    """
    logits, _, tokens, _, group = local_inputs(logits, None, tokens, group=group, valid_vocab_size=valid_vocab_size)
    p, _, t = _check_inputs(logits, None, tokens, temperature)
    options = _options(vocab_size, validate, nan_policy, impl)
    _, _, logp, _ = ShardedStatsFunction.apply(p, None, t, group, float(temperature), options)
    return logp


def entropy(
    logits: Tensor,
    *,
    group: ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    valid_vocab_size: int | None = None,
    validate: bool = True,
    nan_policy: NanPolicy = "raise",
    impl: Impl = "auto",
) -> Tensor:
    """Entropy of ``softmax(logits / T)`` over the sharded vocabulary.

    Args:
        logits: this rank's slice of the logits, ``[..., V_local]``.
        group: process group the vocabulary is split over; ``None`` for full-vocabulary tensors.
        temperature: softmax temperature.
        vocab_size, valid_vocab_size, validate, nan_policy, impl: as in :func:`kl_stats`.

    Returns:
        ``[...]`` entropies in nats, differentiable with respect to ``logits``.
    """
    logits, _, _, _, group = local_inputs(logits, None, None, group=group, valid_vocab_size=valid_vocab_size)
    p, _, _ = _check_inputs(logits, None, None, temperature)
    options = _options(vocab_size, validate, nan_policy, impl)
    _, ent, _, _ = ShardedStatsFunction.apply(p, None, None, group, float(temperature), options)
    return ent


__all__ = [
    "ESTIMATORS",
    "NAN_POLICIES",
    "Estimator",
    "NanPolicy",
    "KLStats",
    "entropy",
    "exact_kl",
    "kl_stats",
    "sampled_kl",
    "token_logprobs",
]
