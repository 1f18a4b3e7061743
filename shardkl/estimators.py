"""Schulman's sampled KL estimators ("Approximating KL divergence", 2020): the one place their formulas live.

For x ~ P and ``log r = log Q(x) - log P(x)``, each ``k`` is a per-sample estimate of KL(P‖Q):
``k1 = -log r`` (unbiased, high variance, can be negative), ``k2 = (log r)^2 / 2`` (biased, low variance),
``k3 = (r - 1) - log r`` (unbiased, low variance, never negative).
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import Tensor

from shardkl._stats import exp_gap

SampledEstimator = Literal["k1", "k2", "k3"]
SAMPLED_ESTIMATORS: tuple[str, ...] = get_args(SampledEstimator)


def check_estimator(estimator: object) -> None:
    """Raise ``ValueError`` for a name that is not ``"k1"``, ``"k2"`` or ``"k3"``."""
    if estimator not in SAMPLED_ESTIMATORS:
        raise ValueError(f"estimator must be one of {SAMPLED_ESTIMATORS}, got {estimator!r}")


def from_log_ratio(log_ratio: Tensor, estimator: SampledEstimator) -> Tensor:
    """The estimator's per-sample value from ``log r = log Q(x) - log P(x)``.

    Args:
        log_ratio: ``log r`` per sample.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        Per-sample estimates of KL(P‖Q), shaped like ``log_ratio``.
    """
    check_estimator(estimator)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return log_ratio.square() / 2
    # r - 1 - log r: exp(d) - 1 - d loses every digit for small |d|; exp_gap is exact to a few ulp
    return exp_gap(log_ratio)


def _log_ratio(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    for name, value in (("p_logprobs", p_logprobs), ("q_logprobs", q_logprobs)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of per-token log-probabilities, got {type(value).__name__}")
    if p_logprobs.shape != q_logprobs.shape:
        raise ValueError(
            "p_logprobs and q_logprobs must have the same shape, got "
            f"{tuple(p_logprobs.shape)} and {tuple(q_logprobs.shape)}"
        )
    return q_logprobs - p_logprobs


def k1(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """``k1 = -log r = log P(x) - log Q(x)``.

    Args:
        p_logprobs: log-probabilities of the sampled tokens under P, the distribution they were sampled from.
        q_logprobs: log-probabilities of the same tokens under Q.

    Returns:
        Per-sample estimates of KL(P‖Q), shaped like ``p_logprobs``.
    """
    return from_log_ratio(_log_ratio(p_logprobs, q_logprobs), "k1")


def k2(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """``k2 = (log r)^2 / 2``. Args and returns as in :func:`k1`."""
    return from_log_ratio(_log_ratio(p_logprobs, q_logprobs), "k2")


def k3(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """``k3 = (r - 1) - log r``. Args and returns as in :func:`k1`."""
    return from_log_ratio(_log_ratio(p_logprobs, q_logprobs), "k3")


__all__ = ["SAMPLED_ESTIMATORS", "SampledEstimator", "check_estimator", "from_log_ratio", "k1", "k2", "k3"]
