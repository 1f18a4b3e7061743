"""Per-token statistics of a group of vocabulary columns, as a merge monoid. No communication here.

A group of columns (a chunk, a shard, a whole row) is summarised per token by a few floats:

    la   log-sum-exp of ``a`` over the group          (``a = p_logits / T``)
    ent  entropy of P restricted to the group and renormalised
    lb   log-sum-exp of ``b`` over the group          (``b = q_logits / T``; only with two inputs)
    kl   KL(P‖Q) restricted to the group, each side renormalised (only with two inputs)

Two groups merge by the chain rule of KL and of entropy, in which every term is non-negative, so nothing
cancels even when the KL is 1e-9 (the textbook ``E_P[a - b] - (la - lb)`` loses all digits there). The merge
folds vocabulary chunks inside a rank and, after one all-gather, the ranks. A group with no mass (no columns,
or all ``-inf``) is an identity of the merge. ``docs/design.md`` has the derivation.

Rows of a stats tensor, shape ``[F, rows]``: ``LA, ENT`` and, with two inputs, ``LB, KL``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

LA, ENT, LB, KL = 0, 1, 2, 3


def num_stats(two_inputs: bool) -> int:
    """Number of stat rows for one or two logits inputs."""
    return 4 if two_inputs else 2


def _no_mass_to_zero(x: Tensor) -> Tensor:
    # A group with no mass has lse = -inf; subtracting it would give -inf - -inf = NaN. Its terms are all
    # guarded to 0 below, so any finite stand-in works. NaN and +inf (invalid logits) pass through as NaN.
    return torch.where(x == float("-inf"), torch.zeros((), dtype=x.dtype, device=x.device), x)


# Taylor coefficients 1/n! of exp(d) - 1 - d = d^2 (1/2! + d/3! + ... + d^8/10!), highest first
_SERIES = tuple(1.0 / math.factorial(n) for n in range(10, 1, -1))
# below this |d| the series (truncation error < 1e-16 relative) replaces expm1(d) - d, whose cancellation
# costs ~2 eps/|d| relative: 10% of the value at d = 1e-6 in fp32
_SERIES_BELOW = 0.1


def exp_gap(d: Tensor, *, series_below: float = _SERIES_BELOW) -> Tensor:
    """``exp(d) - 1 - d >= 0``, accurate to a few ulp for every ``d`` (``inf`` at ``d = inf``).

    ``series_below``: the series replaces ``expm1(d) - d`` where ``|d|`` is below it (at most 0.5, where the
    series' truncation is still < 1e-9 relative). 0.5 keeps the result accurate where ``expm1`` itself is only
    ``exp(d) - 1`` (inductor's vectorised CPU code): the subtraction then loses at most 6e-7 relative.
    """
    small = d.abs() < series_below
    ds = torch.where(small, d, torch.zeros((), dtype=d.dtype, device=d.device))
    series = torch.full_like(ds, _SERIES[0])
    for c in _SERIES[1:]:
        series = series * ds + c
    return torch.where(small, ds * ds * series, torch.expm1(d) - d)


def kl_gap(x: Tensor) -> Tensor:
    """``g(x) = x + expm1(-x) >= 0``, the per-term KL integrand in ``x = log P_v - log Q_v``.

    The hot path keeps the cheap form: its cancellation for tiny ``x`` is random across the vocabulary and
    stays below the rounding error of ``x`` itself (measured: 2e-4 relative at KL = 5e-7 in fp32, the same
    as with :func:`exp_gap`, at 0.64x the time). It needs an accurate ``expm1``: where that is ``exp(x) - 1``
    (inductor's vectorised CPU code), use :func:`kl_gap_series`.
    """
    return x + torch.expm1(-x)


def kl_gap_series(x: Tensor) -> Tensor:
    """:func:`kl_gap` that stays accurate when ``expm1`` is computed as ``exp(x) - 1``: a series for ``|x| < 0.5``."""
    return exp_gap(-x, series_below=0.5)


def _softmax_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(lse, e, s, log_probs)`` of the rows of ``x``: ``e = exp(x - max)`` (one ``exp`` per element), its row
    sums ``s``, so that the probabilities are ``e / s``.

    A row without mass (all ``-inf``) gets ``lse = -inf``, ``e = 0`` and log-probabilities ``-inf``; a row holding
    ``+inf`` gets ``lse = +inf`` (so it can be reported) and NaN elsewhere.
    """
    m = torch.amax(x, dim=-1, keepdim=True)
    m_safe = _no_mass_to_zero(m)
    shifted = x - m_safe
    e = torch.exp(shifted)
    s = e.sum(dim=-1, keepdim=True)
    log_s = torch.log(s)
    lse = torch.where(m == float("inf"), m, m_safe + log_s)
    # -inf, not -inf - -inf = NaN, for the log-probabilities of a row without mass
    log_probs = torch.where(s == 0, torch.full_like(s, float("-inf")), shifted - log_s)
    return lse.squeeze(-1), e, s, log_probs


def leaf_stats(
    a: Tensor, b: Tensor | None, *, entropy: bool = True, kl: bool = True, gap: Callable[[Tensor], Tensor] = kl_gap
) -> Tensor:
    """Stats of one chunk held in fast memory: a max pass, then one fused pass, over the chunk.

    Args:
        a: ``[rows, cols]`` scaled logits of P in the compute dtype.
        b: ``[rows, cols]`` scaled logits of Q, or ``None`` for P alone.
        entropy: compute the entropy row; ``False`` leaves zeros there (a KL-only call).
        kl: compute the KL row; ``False`` leaves zeros there (only the log-sum-exps are wanted).
        gap: the KL integrand ``g(x) = x + expm1(-x)`` (:func:`kl_gap`, or :func:`kl_gap_series` for compilers
            whose ``expm1`` is ``exp(x) - 1``).

    Returns:
        ``[num_stats, rows]`` stats of the chunk.
    """
    la, ea, sa, log_p = _softmax_parts(a)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    p = ea / torch.where(sa == 0, torch.ones_like(sa), sa)
    if entropy:
        # 0 * log 0 is 0: `where` keeps the NaN of 0 * -inf out of the sum (and lets the NaN of a NaN input through)
        ent = -torch.where(ea == 0, zero, p * log_p).sum(dim=-1)
    else:
        ent = torch.zeros_like(la)
    if b is None:
        return torch.stack((la, ent))
    lb, eb, sb, log_q = _softmax_parts(b)
    if not kl:
        return torch.stack((la, ent, lb, torch.zeros_like(lb)))
    # x = log P_v - log Q_v, the design's (a - la) - (b - lb): 2e-4 relative error at KL = 5e-7 in fp32, and
    # exact when |a| and |b| differ by many orders (unlike (a - b) - (la - lb)).
    x = log_p - log_q
    # Each term is P_v x_v - P_v + Q_v = P_v g(x_v) >= 0. Where P_v is 0 (a -inf logit, or exp underflow) its
    # limit is Q_v, not 0: that mass of Q outside P's support is summed from exp(b - max) already at hand, so
    # no Q_v = exp(b - lb) has to be recomputed per element.
    inv_sb = 1 / torch.where(sb == 0, torch.ones_like(sb), sb)
    outside = torch.where(ea == 0, eb, zero).sum(dim=-1, keepdim=True) * inv_sb
    # Where P_v < Q_v / e, the term is written P x - P + Q: Q dominates (no cancellation), and g(x) itself would
    # overflow in fp32 below x = -88 (P = 5e-42, Q = 1 gives P * inf = inf instead of ~Q).
    term = torch.where(x < -1, p * x - p + eb * inv_sb, p * gap(x))
    divergence = torch.where(ea == 0, zero, term).sum(dim=-1) + outside.squeeze(-1)
    return torch.stack((la, ent, lb, divergence))


def merge_stats(stats: Tensor) -> Tensor:
    """Merge the stats of disjoint groups of columns.

    Args:
        stats: ``[groups, num_stats, rows]``.

    Returns:
        ``[num_stats, rows]``, the stats of the union of the groups.
    """
    la_i = stats[:, LA]
    la = torch.logsumexp(la_i, dim=0)
    # log of the share of P's mass in each group; -inf for a group without mass
    log_wa = la_i - _no_mass_to_zero(la)
    wa = torch.exp(log_wa)
    zero = torch.zeros((), dtype=stats.dtype, device=stats.device)
    ent = torch.where(wa == 0, zero, wa * (stats[:, ENT] - log_wa)).sum(dim=0)
    if stats.shape[1] == 2:
        return torch.stack((la, ent))
    lb_i = stats[:, LB]
    lb = torch.logsumexp(lb_i, dim=0)
    log_wb = lb_i - _no_mass_to_zero(lb)
    # chain rule: KL = sum_i [w_i KL_i + w_i g(x_i)], x_i = log w_i - log v_i, and v_i for a group where P has no
    # mass; P mass in a group where Q has none gives +inf. Where x_i < -1 (v_i > e w_i) the gap term is written
    # w x - w + v, as in the leaf: v dominates (nothing cancels) and g(x) = x + e^-x - 1 would overflow (fp32 below
    # x = -88: a finite KL reported as inf)
    x = log_wa - log_wb
    far = x < -1
    direct = wa * torch.where(far, x, zero) - wa + torch.exp(log_wb)
    gap = torch.where(far, direct, wa * kl_gap(torch.where(far, zero, x)))
    kl = torch.where(wa == 0, torch.exp(log_wb), wa * stats[:, KL] + gap).sum(dim=0)
    # convention: a row where P has no mass at all (every logit -inf) is an empty, masked row with KL 0
    kl = torch.where(la == float("-inf"), zero, kl)
    return torch.stack((la, ent, lb, kl))


def chunk_grads(
    a: Tensor,
    b: Tensor | None,
    *,
    lse_a: Tensor,
    lse_b: Tensor | None,
    kl: Tensor | None,
    ent: Tensor,
    grad_kl: Tensor | None,
    grad_ent: Tensor | None,
    grad_logp: Tensor | None,
    grad_logq: Tensor | None,
    token_cols: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Gradients of the weighted outputs with respect to the scaled logits of one chunk (no ``1/T`` yet).

    With P, Q recomputed from the saved global log-sum-exps, every term is local to the chunk:
    ``dKL/db = Q - P``, ``dKL/da = P (log P - log Q - KL)``, ``dH/da = -P (log P + H)``,
    ``d log P(x)/da = 1[v = x] - P``.

    Args:
        a, b: ``[rows, cols]`` scaled logits in the compute dtype (``b`` may be ``None``).
        lse_a, lse_b, kl, ent: ``[rows]`` global per-token results of the forward pass.
        grad_kl, grad_ent, grad_logp, grad_logq: ``[rows]`` incoming gradients, ``None`` where unused.
        token_cols: ``[rows]`` column of the token inside this chunk, or -1 where the chunk does not hold it.

    Returns:
        ``(grad_a, grad_b)`` in the compute dtype; ``grad_b`` is ``None`` when ``b`` is.
    """
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    log_p = a - _no_mass_to_zero(lse_a).unsqueeze(-1)
    p = torch.exp(log_p)
    grad_a = torch.zeros_like(a)
    grad_b = None if b is None else torch.zeros_like(b)
    one_hot = None
    if token_cols is not None and (grad_logp is not None or grad_logq is not None):
        # a dense compare, not a scatter: no data-dependent shapes, so it fuses under torch.compile
        cols = torch.arange(a.shape[-1], device=a.device)
        one_hot = (cols == token_cols.unsqueeze(-1)).to(a.dtype)
    if grad_ent is not None:
        grad_a -= grad_ent.unsqueeze(-1) * torch.where(p == 0, zero, p * (log_p + ent.unsqueeze(-1)))
    if grad_logp is not None and one_hot is not None:
        grad_a += grad_logp.unsqueeze(-1) * (one_hot - p)
    if b is not None and grad_b is not None and lse_b is not None:
        log_q = b - _no_mass_to_zero(lse_b).unsqueeze(-1)
        q = torch.exp(log_q)
        if grad_kl is not None and kl is not None:
            g = grad_kl.unsqueeze(-1)
            term = torch.where(p == 0, zero, p * (log_p - log_q - kl.unsqueeze(-1)))
            # a token with an infinite KL (P mass where Q has none) and no incoming gradient gets 0, not 0 * inf
            grad_a += torch.where(g == 0, zero, g * term)
            grad_b += g * (q - p)
        if grad_logq is not None and one_hot is not None:
            grad_b += grad_logq.unsqueeze(-1) * (one_hot - q)
    return grad_a, grad_b
