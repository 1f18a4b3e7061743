"""Schulman's sampled KL estimators ("Approximating KL divergence", 2020).

For x ~ P and ``log r = log Q(x) - log P(x)``, each ``k`` is a per-sample estimate of KL(P‖Q):
``k1 = -log r`` (unbiased, high variance, can be negative), ``k2 = (log r)^2 / 2`` (biased, low variance),
``k3 = (r - 1) - log r`` (unbiased, low variance, never negative).
"""

from __future__ import annotations

from torch import Tensor

from shardkl._stats import exp_gap


def _log_ratio(logp: Tensor, logq: Tensor) -> Tensor:
    if logp.shape != logq.shape:
        raise ValueError(f"logp and logq must have the same shape, got {tuple(logp.shape)} and {tuple(logq.shape)}")
    return logq - logp


def k1(logp: Tensor, logq: Tensor) -> Tensor:
    """``k1 = -log r = log P(x) - log Q(x)``.

    Args:
        logp: log-probabilities of the sampled tokens under P, the distribution they were sampled from.
        logq: log-probabilities of the same tokens under Q.

    Returns:
        Per-sample estimates of KL(P‖Q), shaped like ``logp``.
    """
    return -_log_ratio(logp, logq)


def k2(logp: Tensor, logq: Tensor) -> Tensor:
    """``k2 = (log r)^2 / 2``. Args and returns as in :func:`k1`."""
    return _log_ratio(logp, logq).square() / 2


def k3(logp: Tensor, logq: Tensor) -> Tensor:
    """``k3 = (r - 1) - log r``. Args and returns as in :func:`k1`."""
    # exp(d) - 1 - d loses every digit for small |d|; exp_gap is exact to a few ulp (expm1 + a series)
    return exp_gap(_log_ratio(logp, logq))
