"""Per-token math of the distillation divergences on local tiles of logits. No communication here.

Two divergences that the stats monoid of :mod:`shardkl._stats` cannot merge in one round:

**Generalised Jensen-Shannon.** ``JSD_β = β KL(P‖M) + (1−β) KL(Q‖M)`` with ``M = βP + (1−β)Q``. Each vocabulary
column's term needs ``log M_v``, which needs the *global* log-sum-exps of both inputs; so the sharded forward is two
rounds: the log-sum-exps (:func:`tile_lse`, merged over tiles and ranks), then one local pass
(:func:`jsd_tile_terms`) whose per-token partial sums are summed over the ranks. With ``d = log P_v − log Q_v``:

    x_v = log P_v − log M_v = −log1p((1−β)·expm1(−d))      y_v = log Q_v − log M_v = −log1p(β·expm1(d))

(both exact for tiny ``d``; far out, where ``expm1`` would overflow, the same quantities come from ``logaddexp``),
and each term is written as ``w·g(x)``, ``g(x) = x + expm1(−x) >= 0`` (:func:`gap_term`), so no term is negative
and nothing cancels however small the divergence. The gradient is local to each column:
``∂JSD/∂a_v = β P_v (x_v − KL(P‖M))`` and ``∂JSD/∂b_v = (1−β) Q_v (y_v − KL(Q‖M))`` (:func:`jsd_tile_grads`).

**Top-k teacher with an exact tail bucket.** The teacher gives log-probs ``t_k`` of K ids; the student ``S`` is a
full softmax. The divergence is the KL between the coarse-grained distributions over K + 1 buckets (the K ids,
and the rest of the vocabulary): never negative, a lower bound of the full KL, equal to it when K = V. The
student's buckets need, per token, its log-sum-exp, its logits at the ids, and its log-sum-exp **excluding** the ids
(:func:`topk_tile_stats`), so the tail's mass ``S_tail = exp(lse_excl − lse)`` never comes from ``1 − Σ S_k``.
The teacher's tail is ``−expm1(logsumexp(t))`` (:func:`buckets`). Gradients (:func:`topk_tile_grads`), for
the student logit ``v`` in bucket ``b``: forward KL(T‖S): ``S_v·ΣT − T_b·S_v/S_b`` (``S_v − T_v`` for an id
bucket); reverse KL(S‖T): ``S_v·(r_b − Σ_c S_c r_c)`` with ``r = log S − log T``.

Tiles are ``[rows, cols]`` blocks of scaled logits in the compute dtype; where they come from (a slice of a
logits tensor, or a matmul of hidden states) is the caller's business.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from shardkl._stats import kl_gap

Direction = Literal["forward", "reverse"]

# |d| beyond which expm1(±d) of the mixture's log-ratio form would overflow fp32 (e^88); the logaddexp form is
# exact out there (|x| is large, so its absolute rounding is small relative to it)
_FAR = 30.0


def _finite_or_zero(x: Tensor) -> Tensor:
    # a group without mass has lse = -inf; any finite stand-in keeps -inf - -inf = NaN out of log-probs
    return torch.where(torch.isinf(x) & (x < 0), torch.zeros((), dtype=x.dtype, device=x.device), x)


def log_probs(x: Tensor, lse: Tensor) -> Tensor:
    """``x − lse`` per row (``lse`` is ``[rows]``); ``-inf`` columns stay ``-inf`` also in a row without mass."""
    return x - _finite_or_zero(lse).unsqueeze(-1)


def gap_term(w: Tensor, x: Tensor, m: Tensor) -> Tensor:
    """``w·g(x) = w·x − w + m >= 0`` for ``x = log w − log m``: one term of ``KL(w‖m)`` in its non-negative form.

    ``w = 0`` gives its limit ``m``; where ``m`` is much larger than ``w`` the cheap form ``w·(x + expm1(−x))`` would
    overflow (``w·inf``) and the direct form ``w·x − w + m`` has nothing to cancel; ``m = 0 < w`` gives ``inf``.
    """
    zero_w = w == 0
    far = x < -1.0
    safe_x = torch.where(zero_w | far, torch.zeros((), dtype=x.dtype, device=x.device), x)
    direct = torch.where(zero_w, m, w * torch.where(zero_w, torch.zeros_like(x), x) - w + m)
    return torch.where(zero_w | far, direct, w * kl_gap(safe_x))


# --- generalised JSD ------------------------------------------------------------------------------------------


def tile_lse(x: Tensor) -> Tensor:
    """``[rows]`` log-sum-exp of a tile (``-inf`` for a row without mass, ``+inf``/NaN for bad logits)."""
    return torch.logsumexp(x, dim=-1)


def mixture_log_ratios(d: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``(x, y) = (log P − log M, log Q − log M)`` from ``d = log P − log Q``, ``M = βP + (1−β)Q``, 0 < β < 1.

    ``d = −inf`` (no P mass) gives ``x = −inf``; ``d = +inf`` (no Q mass) gives ``y = −inf``.
    """
    log_beta, log_rest = math.log(beta), math.log1p(-beta)
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    near_x = d >= -_FAR
    near_y = d <= _FAR
    # exact for tiny d: log(M / P) = log1p((1 - beta) * expm1(-d)); far below, logaddexp of the two shares
    x = torch.where(
        near_x,
        -torch.log1p((1 - beta) * torch.expm1(-torch.where(near_x, d, zero))),
        -torch.logaddexp(torch.full_like(d, log_beta), log_rest - d),
    )
    y = torch.where(
        near_y,
        -torch.log1p(beta * torch.expm1(torch.where(near_y, d, zero))),
        -torch.logaddexp(torch.full_like(d, log_rest), log_beta + d),
    )
    return x, y


class JSDTile(NamedTuple):
    """What one tile needs for both the JSD terms and their gradients."""

    p: Tensor
    q: Tensor
    x: Tensor
    y: Tensor


def _jsd_tile(a: Tensor, b: Tensor, lse_a: Tensor, lse_b: Tensor, beta: float) -> JSDTile:
    log_p, log_q = log_probs(a, lse_a), log_probs(b, lse_b)
    x, y = mixture_log_ratios(log_p - log_q, beta)
    return JSDTile(torch.exp(log_p), torch.exp(log_q), x, y)


def jsd_tile_terms(a: Tensor, b: Tensor, lse_a: Tensor, lse_b: Tensor, beta: float) -> Tensor:
    """``[2, rows]``: this tile's partial sums of KL(P‖M) and KL(Q‖M), each term non-negative.

    Args:
        a, b: ``[rows, cols]`` scaled logits of P and Q.
        lse_a, lse_b: ``[rows]`` global log-sum-exps.
        beta: mixture weight, 0 < β < 1.
    """
    t = _jsd_tile(a, b, lse_a, lse_b, beta)
    m = beta * t.p + (1 - beta) * t.q
    # a column where both P and Q are 0 has d = NaN; both of its terms take the w = 0 branch, m = 0
    return torch.stack((gap_term(t.p, t.x, m).sum(-1), gap_term(t.q, t.y, m).sum(-1)))


def jsd_tile_grads(
    a: Tensor,
    b: Tensor,
    lse_a: Tensor,
    lse_b: Tensor,
    kl_pm: Tensor,
    kl_qm: Tensor,
    beta: float,
    grad: Tensor,
    *,
    need_a: bool = True,
    need_b: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``grad · JSD_β`` with respect to the scaled logits of one tile (no ``1/T`` yet).

    ``∂JSD/∂a_v = β P_v (x_v − KL(P‖M))``, ``∂JSD/∂b_v = (1−β) Q_v (y_v − KL(Q‖M))``; a column without mass on
    its side gets 0 (its ``x`` is ``−inf``).

    Args:
        a, b: ``[rows, cols]`` scaled logits.
        lse_a, lse_b, kl_pm, kl_qm: ``[rows]`` global results of the forward pass.
        beta: mixture weight, 0 < β < 1.
        grad: ``[rows]`` incoming gradient of the per-token JSD.
        need_a, need_b: which of the two to compute.
    """
    t = _jsd_tile(a, b, lse_a, lse_b, beta)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    g = grad.unsqueeze(-1)
    grad_a = grad_b = None
    if need_a:
        grad_a = torch.where((t.p == 0) | (g == 0), zero, (beta * g) * t.p * (t.x - kl_pm.unsqueeze(-1)))
    if need_b:
        grad_b = torch.where((t.q == 0) | (g == 0), zero, ((1 - beta) * g) * t.q * (t.y - kl_qm.unsqueeze(-1)))
    return grad_a, grad_b


# --- top-k teacher with a tail bucket -------------------------------------------------------------------------


def held_columns(local_ids: Tensor, cols: int) -> tuple[Tensor, Tensor]:
    """``(inside, index)`` for ids relative to a tile of ``cols`` columns: ``index`` is the column where ``inside``,
    else ``cols`` (one spare column past the tile, so gathers and scatters need no data-dependent shapes)."""
    inside = (local_ids >= 0) & (local_ids < cols)
    return inside, torch.where(inside, local_ids, torch.full_like(local_ids, cols))


def accurate_lse(x: Tensor) -> Tensor:
    """``[rows]`` float64 log-sum-exp of a tile: ``exp`` in the tile's dtype, the sum accumulated in float64.

    The top-k buckets compare the tail's log-mass with the ids' logits directly, so an absolute error ``δ`` of the
    tail's log-sum-exp moves the divergence by ``~ δ · sqrt(KL)``: 1e-6 (fp32 accumulation over 32k columns) would
    be 1% at KL = 1e-9. Accumulated in float64, the sum's error is the per-element ``exp`` rounding, random in sign.
    """
    m = torch.amax(x, dim=-1, keepdim=True) if x.shape[-1] else torch.full_like(x[..., :1], float("-inf"))
    m_safe = _finite_or_zero(m)
    total = torch.exp(x - m_safe).sum(dim=-1, dtype=torch.float64)
    lse = m_safe.squeeze(-1).to(torch.float64) + torch.log(total)
    # a +inf logit reads as +inf (not NaN), so the checks name it
    return torch.where(m.squeeze(-1) == float("inf"), m.squeeze(-1).to(torch.float64), lse)


def topk_tile_stats(s: Tensor, local_ids: Tensor) -> Tensor:
    """``[2, rows]`` float64 ``(lse, lse_excl)`` of one tile of student logits: the log-sum-exp over the tile, and
    over the tile's columns that are not among the ids.

    Args:
        s: ``[rows, cols]`` scaled student logits.
        local_ids: ``[rows, K]`` the teacher's ids relative to the tile's first column (any value outside
            ``[0, cols)`` is not in this tile).
    """
    rows, cols = s.shape
    _, index = held_columns(local_ids, cols)
    padded = torch.cat([s, torch.full((rows, 1), float("-inf"), dtype=s.dtype, device=s.device)], dim=-1)
    # the ids' columns (and the spare one) set to -inf: the tail's own log-sum-exp, with nothing subtracted
    excluded = padded.scatter(-1, index, float("-inf"))
    return torch.stack((accurate_lse(s), accurate_lse(excluded)))


class Buckets(NamedTuple):
    """Per-token coarse-grained distributions over K + 1 buckets (the ids, then the tail), float64.

    Attributes:
        log_s: ``[rows, K + 1]`` the student's bucket log-masses.
        log_t: ``[rows, K + 1]`` the teacher's bucket log-masses (the tail clamped at 0 mass).
        t_total: ``[rows]`` the sum of the teacher's bucket masses (1 up to the rounding of its log-probs).
    """

    log_s: Tensor
    log_t: Tensor
    t_total: Tensor


def buckets(lse_excl: Tensor, s_ids: Tensor, teacher_logprobs: Tensor, tail_tolerance: float) -> Buckets:
    """Both sides' buckets from the student's global tail log-sum-exp and logits at the ids, and the teacher's
    log-probs.

    The student's log-sum-exp is the merge of its buckets, ``logaddexp(lse_excl, logsumexp(s_ids))``, so its bucket
    masses sum to 1 to float64 rounding whatever the rounding of ``lse_excl``. The teacher's tail is
    ``−expm1(logsumexp(t))``, clamped at 0 (probabilities summing to 1 or, within rounding, above). Where the
    student's tail is empty (K = V, or every other logit ``-inf``) a teacher tail no larger than ``tail_tolerance``
    is rounding of a sum that is 1, and is taken as empty too; otherwise an empty student bucket facing teacher mass
    is an infinite forward KL, as it should be.

    Args:
        lse_excl: ``[rows]`` the student's log-sum-exp over the vocabulary without the ids.
        s_ids: ``[rows, K]`` the student's logits at the ids.
        teacher_logprobs: ``[rows, K]``.
        tail_tolerance: the rounding of the teacher's probabilities (see ``shardkl._teacher_checks``).

    Returns:
        :class:`Buckets`, float64.
    """
    logits = torch.cat([s_ids, lse_excl.unsqueeze(-1)], dim=-1)
    log_s = logits - _finite_or_zero(torch.logsumexp(logits, dim=-1)).unsqueeze(-1)
    lse_t = torch.logsumexp(teacher_logprobs, dim=-1)
    # the tail's mass 1 - sum_k exp(t_k), exact for a tail much smaller than 1 (no 1 - 0.999... cancellation)
    tail = (-torch.expm1(lse_t)).clamp(min=0)
    tail = torch.where((log_s[:, -1] == float("-inf")) & (tail <= tail_tolerance), torch.zeros_like(tail), tail)
    log_t = torch.cat([teacher_logprobs, torch.log(tail).unsqueeze(-1)], dim=-1)
    return Buckets(log_s, log_t, torch.exp(lse_t) + tail)


def student_lse(lse_excl: Tensor, s_ids: Tensor) -> Tensor:
    """``[rows]`` the student's global log-sum-exp, merged from its buckets (as :func:`buckets` normalises them)."""
    return torch.logsumexp(torch.cat([s_ids, lse_excl.unsqueeze(-1)], dim=-1), dim=-1)


def topk_divergence(buckets: Buckets, direction: Direction) -> Tensor:
    """``[rows]`` KL(T‖S) (``"forward"``) or KL(S‖T) (``"reverse"``) over the buckets, a sum of non-negative terms.

    A zero-mass teacher bucket gives its limit (``S_b`` forward, ``+inf`` reverse if ``S_b > 0``); a bucket empty on
    both sides gives 0.
    """
    log_s, log_t = buckets.log_s, buckets.log_t
    log_w, log_m = (log_t, log_s) if direction == "forward" else (log_s, log_t)
    w, m = torch.exp(log_w), torch.exp(log_m)
    both_empty = (w == 0) & (m == 0)
    x = torch.where(both_empty, torch.zeros_like(log_w), log_w - log_m)
    return gap_term(w, x, m).sum(-1)


def topk_grad_coefs(buckets: Buckets, direction: Direction) -> tuple[Tensor, Tensor]:
    """``(tail_coef [rows], id_coef [rows, K])``, float64: the per-token factors of the top-k gradient.

    For a student logit ``v`` in bucket ``b`` the gradient of KL(T‖S) is ``S_v·ΣT − T_b·S_v/S_b`` and that of
    KL(S‖T) is ``S_v·(r_b − Σ_c S_c r_c)`` with ``r = log S − log T``. An id column is its own bucket, so its
    gradient is ``id_coef``; a tail column's is ``S_v/S_tail`` times ``tail_coef`` (``S_v = S_tail·S_v/S_tail``):
    ``S_tail·ΣT − T_tail`` forward, ``S_tail·(r_tail − Σ S r)`` reverse.
    """
    s = torch.exp(buckets.log_s)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if direction == "forward":
        t = torch.exp(buckets.log_t)
        total = buckets.t_total.unsqueeze(-1)
        return s[:, -1] * buckets.t_total - t[:, -1], s[:, :-1] * total - t[:, :-1]
    r = buckets.log_s - buckets.log_t
    # sum_b S_b r_b, the textbook KL(S‖T): a bucket without student mass adds nothing (its r may be -inf or NaN)
    mean_r = torch.where(s == 0, zero, s * r).sum(-1, keepdim=True)
    centred = torch.where(s == 0, zero, s * (r - mean_r))
    return centred[:, -1], centred[:, :-1]


def topk_tile_grads(
    s: Tensor, local_ids: Tensor, lse_excl: Tensor, tail_coef: Tensor, id_coef: Tensor
) -> Tensor:
    """Gradient of the top-k divergence with respect to one tile of scaled student logits (no ``1/T`` yet).

    A tail column gets ``exp(s_v − lse_excl) · tail_coef``: its share of the tail, ``S_v / S_tail``, computed
    directly (never as ``S_v / S_tail`` with an ``S_v`` that may underflow where the tail does not), times the
    per-token factor; an id column gets its ``id_coef``.

    Args:
        s: ``[rows, cols]`` scaled student logits.
        local_ids: ``[rows, K]`` ids relative to the tile (values outside ``[0, cols)`` are not in it).
        lse_excl: ``[rows]`` the student's global log-sum-exp of the tail; ``-inf``: an empty tail (no gradient).
        tail_coef: ``[rows]``; id_coef: ``[rows, K]`` (see :func:`topk_grad_coefs`, incoming gradient included).
    """
    rows, cols = s.shape
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    empty = (lse_excl == float("-inf")).unsqueeze(-1)
    share = torch.exp(log_probs(s, lse_excl))
    tail = torch.where(empty, zero, share * tail_coef.unsqueeze(-1).to(s.dtype))
    _, index = held_columns(local_ids, cols)
    padded = torch.cat([tail, torch.zeros(rows, 1, dtype=s.dtype, device=s.device)], dim=-1)
    # ids outside this tile all land in the spare column, which is dropped
    padded = padded.scatter(-1, index, id_coef.to(s.dtype))
    return padded[:, :cols]


__all__ = [
    "Buckets",
    "accurate_lse",
    "buckets",
    "Direction",
    "JSDTile",
    "gap_term",
    "held_columns",
    "jsd_tile_grads",
    "jsd_tile_terms",
    "log_probs",
    "mixture_log_ratios",
    "student_lse",
    "tile_lse",
    "topk_divergence",
    "topk_grad_coefs",
    "topk_tile_grads",
    "topk_tile_stats",
]
