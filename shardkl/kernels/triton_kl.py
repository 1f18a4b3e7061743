"""Hand-written Triton kernels for ``impl="triton"`` (CUDA; CPU only under ``TRITON_INTERPRET=1``, for tests).

Every entry of :class:`shardkl.kernels.Kernels` is **one launch per block and pass**: the grid has one program per
row of the ``[rows, cols]`` block, and each program streams its row in ``BLOCK``-wide tiles, loading the logits in
their own dtype (fp32/bf16/fp16) and computing in fp32. ``BLOCK`` and ``num_warps`` come from ``triton.autotune``
(keyed on the width and the variant); tests and the interpreter pass a ``block`` explicitly. Float64 compute, empty
blocks and a top-k call without ids use the eager kernels.

KL statistics (``kl_stats``, ``kl_grads``):

- ``_stats_kernel`` reads each logit **once**: every tile is a leaf of the stats monoid of ``shardkl._stats`` (its
  max, ``exp(x - max)`` held in registers, their sums, and from those the tile's KL in g-form and entropy, with no
  further transcendental), merged into the row's running stats by the chain rule in float64, as the engine merges
  vocabulary chunks and ranks (each log-sum-exp held as its maximum and the log of the sum relative to it, so a
  tile's share keeps its digits at logits near the dtype's maximum, where ``max + log s`` rounds to ``max``). The
  KL integrand ``g = e^d - 1 - d`` (``d = log Q - log P``) is a series for ``|d| < 0.5`` and ``Q - P - P d`` above,
  so a tiny KL keeps its digits without ``expm1`` (which Triton lacks); the merge's gap term takes the direct form
  ``w x - w + v`` where ``x = log w - log v < -1``, where ``g`` would overflow. With ``kl=False`` and no entropy
  (the JSD's first round) only the log-sum-exps are computed, the way the kernels below do it.
- ``_grads_kernel``: P and Q recomputed per element from the saved global log-sum-exps, the terms of
  ``shardkl._stats.chunk_grads`` that are present (``tl.constexpr`` flags) summed, scaled by ``1/T``.

Generalised JSD (``jsd_terms``, ``jsd_grads``) and top-k buckets (``topk_stats``, ``topk_grads``) keep **per-lane**
running results (each lane of the ``BLOCK``-wide vector owns the columns ``start + lane`` of every tile) and reduce
across lanes once per row, so no cross-warp reduction of a sum sits on a tile's critical path:

- a log-sum-exp (also ``kl_stats``' lse-only variant) keeps the row's running maximum (one ``max`` per tile) and
  per-lane float64 sums of ``exp(x - max)``: one fp32 exponential per element, rescaled by one float64 factor per
  tile when the maximum grows, so it is as accurate as eager's float64 sum of the same exponentials (the top-k
  divergence moves by ``~δ·sqrt(KL)`` for an error ``δ`` of the tail's log-sum-exp);
- the JSD's per-column log-ratios ``x = log P - log M``, ``y = log Q - log M`` come from ``d = log P - log Q``: the
  side with the larger probability has the bounded one, ``u = -log1p(c·expm1(-|d|))`` (``c`` the other side's
  weight), the other is ``u - |d|``. ``expm1`` and ``log1p`` are series for small arguments, so a JSD of 1e-9
  keeps its digits, and nothing overflows at any ``d``. Each term ``w·g(x)`` is a series for ``|x| < 0.5`` and
  ``w·x - w + m`` elsewhere: no exponential; the terms are summed per lane in fp32, the lanes in float64. Four
  transcendentals per pair of logits (``P``, ``Q``, ``e^-|d|``, one ``log``); the backward writes both gradients in
  the same pass.
- the top-k tail's log-sum-exp excludes the ids **before** accumulating (its own maximum, never ``1 - Σ``): the
  ids arrive sorted (one ``torch.sort`` of ``[rows, K]`` per call), so a tile's ids are the next ones of a walk of
  ``K + tiles`` steps per row, each id a compare of one tile. The block's full log-sum-exp is the tail's merged
  with the ids' own logits (``K`` gathered loads), so the forward takes one exponential per column. The backward
  writes every column's tail share (one exponential per element), then, after a barrier, the ids' factors over it.

Rows are independent programs, so a row of ``-inf``, NaN or ``+inf`` logits cannot disturb another row; the lse of a
row holding NaN is NaN and of one holding ``+inf`` is ``+inf``, as the engine's checks expect.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from shardkl import _stats
from shardkl.kernels import GradInputs, Kernels, drop_b_without_lse, eager, row_major

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

# (BLOCK, num_warps) tried by the autotuner; every one is compiled ahead of time for sm_80 and sm_90 in the tests
CONFIGS: tuple[tuple[int, int], ...] = ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 16))
# tile width when no autotuner runs (the interpreter)
DEFAULT_BLOCK = 1024
# widest vector of top-k ids handled at once (the ids' logits and the backward's scatter loop over chunks of it)
MAX_IDS_BLOCK = 128


if triton is not None:
    # The @triton.jit functions carry no type hints except `tl.constexpr`: the Triton compiler evaluates every
    # parameter annotation inside the kernel's scope, where names such as `typing.Any` do not exist.

    @triton.jit
    def _exp_gap_series(ds):
        """``(exp(d) - 1 - d) / d^2`` for ``|d| <= 0.5``: Horner form of ``1/2! + d/3! + ... + d^8/10!``."""
        series = 2.755731922398589e-07
        series = series * ds + 2.7557319223985893e-06
        series = series * ds + 2.48015873015873e-05
        series = series * ds + 0.0001984126984126984
        series = series * ds + 0.001388888888888889
        series = series * ds + 0.008333333333333333
        series = series * ds + 0.041666666666666664
        series = series * ds + 0.16666666666666666
        series = series * ds + 0.5
        return series

    @triton.jit
    def _exp_gap(d):
        """``exp(d) - 1 - d >= 0``, accurate for small ``|d|`` (Triton has no portable expm1); fp32 or float64."""
        # below |d| = 0.5 a Taylor polynomial (truncation < 1e-10 relative at 0.5); above, the plain subtraction
        small = tl.abs(d) < 0.5
        ds = tl.where(small, d, 0.0)
        # for |d| >= 0.5 the subtraction exp(d) - 1 - d keeps all but ~1e-6 relative of the result
        large = tl.where(d == float("inf"), d, (tl.exp(d) - 1.0) - d)
        return tl.where(small, ds * ds * _exp_gap_series(ds), large)

    @triton.jit
    def _exp_gap_kernel(d_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """Elementwise :func:`_exp_gap` (for testing its accuracy)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, _exp_gap(d), mask=mask)

    @triton.jit
    def _no_mass_to_zero(x):
        # a group without mass has lse -inf; shift by 0 instead (-inf - -inf would be NaN)
        return tl.where(x == float("-inf"), 0.0, x)

    @triton.jit
    def _bad(x):
        """Bit 1: the tile holds a NaN; bit 2: a +inf."""
        nan = tl.max(tl.where(x != x, 1, 0), axis=0)
        pos_inf = tl.max(tl.where(x == float("inf"), 2, 0), axis=0)
        return nan | pos_inf

    @triton.jit
    def _lane_flags(x):
        """Per lane, bit 1: a NaN; bit 2: a +inf (reduced once per row by :func:`_lanes_lse`)."""
        return tl.where(x != x, 1, 0) | tl.where(x == float("inf"), 2, 0)

    @triton.jit
    def _lse_update(top, total, x):
        """Fold a tile ``x`` into a running log-sum-exp: the maximum so far ``top`` (a scalar) and per-lane float64
        sums of ``exp(x - top)``; one exponential per element, as accurate as a float64 sum of them.

        A new maximum rescales the lanes' sums by one float64 factor per tile (never an fp32 factor per element:
        its rounding would multiply whole partial sums).
        """
        new_top = tl.maximum(top, tl.max(x, axis=0))
        shift = _no_mass_to_zero(new_top)
        # exp(-inf) = 0 rescales the empty sums of a row without mass so far
        total = total * tl.exp(top.to(tl.float64) - shift.to(tl.float64))
        total += tl.exp(x - shift).to(tl.float64)
        return new_top, total

    @triton.jit
    def _lanes_lse(top, total, flags):
        """float64 log-sum-exp from :func:`_lse_update`'s running ``(max, per-lane sums)``: NaN if a lane saw a NaN,
        else +inf if one saw a +inf, ``-inf`` without mass."""
        lse = _no_mass_to_zero(top).to(tl.float64) + tl.log(tl.sum(total, axis=0))
        nan = tl.max(flags & 1, axis=0)
        pos_inf = tl.max(flags & 2, axis=0)
        return tl.where(nan != 0, float("nan"), tl.where(pos_inf != 0, float("inf"), lse))

    @triton.jit
    def _row_lse(row_ptr, cols, inv_t, BLOCK: tl.constexpr):
        """float64 log-sum-exp of one row of raw logits divided by the temperature."""
        top = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK,), tl.float64)
        flags = tl.zeros((BLOCK,), tl.int32)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + offs, mask=offs < cols, other=float("-inf")).to(tl.float32) * inv_t
            flags = flags | _lane_flags(x)
            top, total = _lse_update(top, total, x)
        return _lanes_lse(top, total, flags)

    @triton.jit
    def _logaddexp64(x, y):
        """``log(e^x + e^y)`` of float64 scalars: NaN if either is NaN, ``+inf`` if either is, ``-inf`` if both are."""
        hi = tl.maximum(x, y)
        lo = tl.minimum(x, y)
        # log(1 + e^-gap): nothing cancels; an infinite end is its own result (inf - inf would be NaN)
        out = tl.where((lo == float("-inf")) | (hi == float("inf")), hi, hi + tl.log(1.0 + tl.exp(lo - hi)))
        return tl.where((x != x) | (y != y), float("nan"), out)

    @triton.jit
    def _tile_softmax(x):
        """``(max, log_s, log_p, e, inv_s)`` of one tile: ``e = exp(x - max)``, its sum ``s``, ``P = e * inv_s``,
        ``log P = (x - max) - log s``; a tile without mass has max ``-inf``, ``log_s = -inf`` and ``log P = -inf``."""
        m = tl.max(x, axis=0)
        shift = _no_mass_to_zero(m)
        e = tl.exp(x - shift)
        s = tl.sum(e, axis=0)
        log_s = tl.log(s)
        # (x - max) - log s, not x - lse: at logits near the dtype's maximum, lse = max + log s rounds to max; a tile
        # without mass has log P -inf (not -inf - -inf)
        log_p = tl.where(s == 0.0, float("-inf"), (x - shift) - log_s)
        inv_s = 1.0 / tl.where(s == 0.0, 1.0, s)
        return m, log_s, log_p, e, inv_s

    @triton.jit
    def _merge_shares(m1, r1, m2, r2):
        """Merge two groups' log-sum-exps, each held as ``(max, log of the sum relative to that max)`` (float64;
        ``(-inf, -inf)`` for no mass): the merged pair and each group's log-share of the merged mass.

        Maxima are subtracted first, so logits near the dtype's maximum keep their offsets (``max + log s`` would
        round to ``max``, and every share to 1).
        """
        m = tl.maximum(m1, m2)
        shift = _no_mass_to_zero(m)
        l1 = (m1 - shift) + r1
        l2 = (m2 - shift) + r2
        top = tl.maximum(l1, l2)
        r = tl.where(top == float("-inf"), float("-inf"), top + tl.log(1.0 + tl.exp(-tl.abs(l1 - l2))))
        r_shift = _no_mass_to_zero(r)
        return m, r, l1 - r_shift, l2 - r_shift

    @triton.jit
    def _chain_rule_term(w, log_w, log_v, kl):
        """One group's part of a merged KL, float64: ``w (KL_i + g(x))``, ``x = log w - log v``; ``v`` where the
        group has no P mass (and ``+inf`` where it has P mass but no Q mass)."""
        v = tl.exp(log_v)
        x = log_w - log_v
        far = x < -1.0
        # where v > e w the gap is written w x - w + v: v dominates, nothing cancels, and g(x) = e^-x - 1 + x would
        # overflow (w ~ 1e-310 next to v ~ 1: w * inf instead of ~v)
        direct = w * tl.where(far, x, 0.0) - w + v
        gap = tl.where(far, direct, w * _exp_gap(-tl.where(far, 0.0, x)))
        return tl.where(w == 0.0, v, w * kl + gap)

    @triton.jit
    def _stats_kernel(
        a_ptr,
        b_ptr,
        out_ptr,
        rows,
        cols,
        stride_a,
        stride_b,
        inv_t,
        HAS_B: tl.constexpr,
        ENTROPY: tl.constexpr,
        KL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Stats ``(la, ent[, lb, kl])`` of one row in one pass: a leaf per tile, merged by the chain rule; only the
        log-sum-exps (per-lane running sums) when neither the entropy nor the KL is wanted."""
        row = tl.program_id(0).to(tl.int64)
        a_row = a_ptr + row * stride_a
        b_row = b_ptr + row * stride_b
        # running stats of the columns so far (the empty group: no mass, zero entropy and KL), in float64: a few
        # scalar operations per tile, but in fp32 the rounding of ~100 merges reaches 6e-6 of a KL of 5e-3
        # each input's log-sum-exp held as (max, log-sum relative to it), see _merge_shares
        ma = tl.full((), float("-inf"), tl.float64)
        ra = tl.full((), float("-inf"), tl.float64)
        mb = tl.full((), float("-inf"), tl.float64)
        rb = tl.full((), float("-inf"), tl.float64)
        ent = tl.full((), 0.0, tl.float64)
        kl = tl.full((), 0.0, tl.float64)
        if ENTROPY or (HAS_B and KL):
            bad_a = 0  # NaN (1) / +inf (2) seen
            bad_b = 0
            for start in range(0, cols, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < cols
                a = tl.load(a_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
                bad_a = bad_a | _bad(a)
                t_ma, t_ra, log_p, ea, inv_sa = _tile_softmax(a)
                p = ea * inv_sa
                p_zero = ea == 0.0
                # merge of the running group (1) and this tile (2): log w_i, the log-shares of P's mass
                ma, ra, log_w1, log_w2 = _merge_shares(ma, ra, t_ma.to(tl.float64), t_ra.to(tl.float64))
                w1 = tl.exp(log_w1)
                w2 = tl.exp(log_w2)
                if ENTROPY:
                    # 0 log 0 = 0: `where` keeps out the NaN of 0 * -inf
                    t_ent = -tl.sum(tl.where(p_zero, 0.0, p * log_p), axis=0).to(tl.float64)
                    ent = tl.where(w1 == 0.0, 0.0, w1 * (ent - log_w1)) + tl.where(
                        w2 == 0.0, 0.0, w2 * (t_ent - log_w2)
                    )
                if HAS_B:
                    b = tl.load(b_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
                    bad_b = bad_b | _bad(b)
                    t_mb, t_rb, log_q, eb, inv_sb = _tile_softmax(b)
                    mb, rb, log_v1, log_v2 = _merge_shares(mb, rb, t_mb.to(tl.float64), t_rb.to(tl.float64))
                    if KL:
                        q = eb * inv_sb
                        # P g(x), x = log P - log Q, d = -x: P (e^d - 1 - d) = Q - P - P d, or P d^2 (series) for
                        # small |d|, where Q - P - P d would lose a tiny KL's digits; where P is 0 the limit is Q
                        d = log_q - log_p
                        small = tl.abs(d) < 0.5
                        ds = tl.where(small, d, 0.0)
                        series = 1.0 / 40320.0
                        series = series * ds + 1.0 / 5040.0
                        series = series * ds + 1.0 / 720.0
                        series = series * ds + 1.0 / 120.0
                        series = series * ds + 1.0 / 24.0
                        series = series * ds + 1.0 / 6.0
                        series = series * ds + 0.5
                        term = tl.where(small, p * ds * ds * series, (q - p) - p * d)
                        t_kl = tl.sum(tl.where(p_zero, q, term), axis=0).to(tl.float64)
                        # chain rule: w (KL_i + g(log w - log v)); a group without P mass contributes its share of Q
                        kl = _chain_rule_term(w1, log_w1, log_v1, kl) + _chain_rule_term(w2, log_w2, log_v2, t_kl)
            la = ma + ra
            lb = mb + rb
            # NaN logits make lse NaN and +inf logits +inf, so the engine can report the row; its other stats NaN
            la = tl.where((bad_a & 1) != 0, float("nan"), tl.where((bad_a & 2) != 0, float("inf"), la))
            if ENTROPY:
                ent = tl.where(bad_a != 0, float("nan"), ent)
            if HAS_B:
                lb = tl.where((bad_b & 1) != 0, float("nan"), tl.where((bad_b & 2) != 0, float("inf"), lb))
                if KL:
                    kl = tl.where((bad_a | bad_b) != 0, float("nan"), kl)
        else:
            # only the log-sum-exps: per-lane running sums, one exponential per logit, lanes merged once per row
            la = _row_lse(a_row, cols, inv_t, BLOCK)
            if HAS_B:
                lb = _row_lse(b_row, cols, inv_t, BLOCK)
        tl.store(out_ptr + row, la.to(tl.float32))
        # a statistic that was not asked for is 0, as in the eager kernels
        tl.store(out_ptr + rows + row, ent.to(tl.float32))
        if HAS_B:
            tl.store(out_ptr + 2 * rows + row, lb.to(tl.float32))
            tl.store(out_ptr + 3 * rows + row, kl.to(tl.float32))

    @triton.jit
    def _grads_kernel(
        a_ptr,
        b_ptr,
        grad_a_ptr,
        grad_b_ptr,
        lse_a_ptr,
        lse_b_ptr,
        kl_ptr,
        ent_ptr,
        grad_kl_ptr,
        grad_ent_ptr,
        grad_logp_ptr,
        grad_logq_ptr,
        token_cols_ptr,
        cols,
        stride_a,
        stride_b,
        inv_t,
        HAS_B: tl.constexpr,
        HAS_KL: tl.constexpr,
        HAS_ENT: tl.constexpr,
        HAS_LOGP: tl.constexpr,
        HAS_LOGQ: tl.constexpr,
        WRITE_A: tl.constexpr,
        WRITE_B: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Gradients of one row with respect to the raw logits, one pass, P and Q recomputed from the lse."""
        row = tl.program_id(0).to(tl.int64)
        # a row without mass: shift by 0 (its P is 0 everywhere), not by -inf
        lse_a = _no_mass_to_zero(tl.load(lse_a_ptr + row))
        if HAS_ENT:
            ent = tl.load(ent_ptr + row)
            g_ent = tl.load(grad_ent_ptr + row)
        if HAS_LOGP or HAS_LOGQ:
            token = tl.load(token_cols_ptr + row)
        if HAS_LOGP:
            g_logp = tl.load(grad_logp_ptr + row)
        if HAS_B:
            lse_b = _no_mass_to_zero(tl.load(lse_b_ptr + row))
            if HAS_KL:
                kl = tl.load(kl_ptr + row)
                g_kl = tl.load(grad_kl_ptr + row)
            if HAS_LOGQ:
                g_logq = tl.load(grad_logq_ptr + row)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < cols
            a = tl.load(a_ptr + row * stride_a + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            log_p = a - lse_a
            p = tl.exp(log_p)
            grad_a = tl.zeros((BLOCK,), dtype=tl.float32)
            if HAS_LOGP or HAS_LOGQ:
                one_hot = (offs == token).to(tl.float32)
            if HAS_ENT:
                # dH/da = -P (log P + H); P = 0 contributes 0, not 0 * -inf
                grad_a -= g_ent * tl.where(p == 0.0, 0.0, p * (log_p + ent))
            if HAS_LOGP:
                grad_a += g_logp * (one_hot - p)
            if HAS_B:
                b = tl.load(b_ptr + row * stride_b + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
                log_q = b - lse_b
                q = tl.exp(log_q)
                grad_b = tl.zeros((BLOCK,), dtype=tl.float32)
                if HAS_KL:
                    term = tl.where(p == 0.0, 0.0, p * (log_p - log_q - kl))
                    # an infinite-KL row with no incoming gradient gets 0, not 0 * inf
                    grad_a += tl.where(g_kl == 0.0, 0.0, g_kl * term)
                    grad_b += g_kl * (q - p)
                if HAS_LOGQ:
                    grad_b += g_logq * (one_hot - q)
                if WRITE_B:
                    grad_b_row = grad_b_ptr + row * cols
                    tl.store(grad_b_row + offs, (grad_b * inv_t).to(grad_b_row.dtype.element_ty), mask=mask)
            if WRITE_A:
                grad_a_row = grad_a_ptr + row * cols
                tl.store(grad_a_row + offs, (grad_a * inv_t).to(grad_a_row.dtype.element_ty), mask=mask)

    # --- generalised JSD ------------------------------------------------------------------------------------

    @triton.jit
    def _log1p(z):
        """``log(1 + z)`` for ``z > -1`` without ``log1p``: a Taylor polynomial for ``|z| < 0.25``."""
        small = tl.abs(z) < 0.25
        zs = tl.where(small, z, 0.0)
        # Horner form of z (1 - z/2 + z^2/3 - ... - z^11/12): truncation < 5e-9 relative at |z| = 0.25
        poly = -0.08333333333333333
        poly = poly * zs + 0.09090909090909091
        poly = poly * zs - 0.1
        poly = poly * zs + 0.1111111111111111
        poly = poly * zs - 0.125
        poly = poly * zs + 0.14285714285714285
        poly = poly * zs - 0.16666666666666666
        poly = poly * zs + 0.2
        poly = poly * zs - 0.25
        poly = poly * zs + 0.3333333333333333
        poly = poly * zs - 0.5
        poly = poly * zs + 1.0
        # |log(1 + z)| >= 0.28 above: the rounding of 1 + z is small next to it
        return tl.where(small, zs * poly, tl.log(1.0 + z))

    @triton.jit
    def _mixture_log_ratios(d, beta, rest):
        """``(x, y) = (log P - log M, log Q - log M)`` from ``d = log P - log Q``, ``M = beta P + rest Q``.

        The side with the larger probability has the bounded ratio ``u = -log1p(c·expm1(-|d|))`` (``c`` the other
        side's weight: ``x = u`` for ``d >= 0``, ``y = u`` below); the other is ``u - |d|``. Exact for tiny ``d``
        (series), finite for any finite ``d``; ``d = -inf`` (no P) gives ``x = -inf``, ``d = +inf`` gives
        ``y = -inf``.
        """
        gap = tl.abs(d)
        c = tl.where(d >= 0.0, rest, beta)
        small = gap < 0.5
        gs = tl.where(small, gap, 0.0)
        # expm1(-|d|) in (-1, 0]: -g + g^2 (1/2 - g/6 + ...) near 0, exp(-g) - 1 (no cancellation) above
        em1 = tl.where(small, gs * gs * _exp_gap_series(-gs) - gs, tl.exp(-gap) - 1.0)
        u = -_log1p(c * em1)
        x = tl.where(d >= 0.0, u, u - gap)
        y = tl.where(d >= 0.0, u - gap, u)
        return x, y

    @triton.jit
    def _gap_term(w, x, m):
        """``w·g(x) = w·x - w + m >= 0`` for ``x = log w - log m``, with no exponential; ``m`` where ``w = 0``."""
        small = tl.abs(x) < 0.5
        xs = tl.where(small, x, 0.0)
        # g(x) = exp_gap(-x) = x^2 (1/2 - x/6 + ...): nothing cancels near x = 0 (a JSD of 1e-9 keeps its digits)
        series = w * xs * xs * _exp_gap_series(-xs)
        # the direct form for |x| >= 0.5: the cancellation costs at most ~15 ulp there
        term = tl.where(w == 0.0, m, tl.where(small, series, w * x - w + m))
        # the rounding of m (e.g. beta P flushed to 0) must not make a term negative
        return tl.maximum(term, 0.0)

    @triton.jit
    def _jsd_tile(a_row, b_row, offs, mask, inv_t, lse_a, lse_b, beta, rest):
        """``(P, Q, x, y)`` of one tile of a row, from the global log-sum-exps (``-inf`` already shifted to 0)."""
        a = tl.load(a_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        b = tl.load(b_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        log_p = a - lse_a
        log_q = b - lse_b
        # a column with neither P nor Q mass has d = NaN; its terms take the w = 0 branch (m = 0)
        x, y = _mixture_log_ratios(log_p - log_q, beta, rest)
        return tl.exp(log_p), tl.exp(log_q), x, y

    @triton.jit
    def _jsd_terms_kernel(
        a_ptr,
        b_ptr,
        lse_a_ptr,
        lse_b_ptr,
        out_ptr,
        rows,
        cols,
        stride_a,
        stride_b,
        inv_t,
        beta,
        rest,
        BLOCK: tl.constexpr,
    ):
        """One row's sums of the terms of KL(P‖M) and KL(Q‖M): per-lane fp32 sums, lanes merged in float64."""
        row = tl.program_id(0).to(tl.int64)
        a_row = a_ptr + row * stride_a
        b_row = b_ptr + row * stride_b
        lse_a = _no_mass_to_zero(tl.load(lse_a_ptr + row))
        lse_b = _no_mass_to_zero(tl.load(lse_b_ptr + row))
        sum_p = tl.zeros((BLOCK,), tl.float32)
        sum_q = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            p, q, x, y = _jsd_tile(a_row, b_row, offs, offs < cols, inv_t, lse_a, lse_b, beta, rest)
            m = beta * p + rest * q
            sum_p += _gap_term(p, x, m)
            sum_q += _gap_term(q, y, m)
        tl.store(out_ptr + row, tl.sum(sum_p.to(tl.float64), axis=0))
        tl.store(out_ptr + rows + row, tl.sum(sum_q.to(tl.float64), axis=0))

    @triton.jit
    def _jsd_grads_kernel(
        a_ptr,
        b_ptr,
        grad_a_ptr,
        grad_b_ptr,
        lse_a_ptr,
        lse_b_ptr,
        kl_pm_ptr,
        kl_qm_ptr,
        grad_ptr,
        cols,
        stride_a,
        stride_b,
        inv_t,
        beta,
        rest,
        WRITE_A: tl.constexpr,
        WRITE_B: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """``beta g P (x - KL(P‖M)) / T`` and ``rest g Q (y - KL(Q‖M)) / T`` of one row, both in one pass."""
        row = tl.program_id(0).to(tl.int64)
        a_row = a_ptr + row * stride_a
        b_row = b_ptr + row * stride_b
        lse_a = _no_mass_to_zero(tl.load(lse_a_ptr + row))
        lse_b = _no_mass_to_zero(tl.load(lse_b_ptr + row))
        kl_pm = tl.load(kl_pm_ptr + row)
        kl_qm = tl.load(kl_qm_ptr + row)
        g = tl.load(grad_ptr + row)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < cols
            p, q, x, y = _jsd_tile(a_row, b_row, offs, mask, inv_t, lse_a, lse_b, beta, rest)
            if WRITE_A:
                # 0 where P is 0 (x = -inf) or no gradient comes in, not 0 * inf
                grad_a = tl.where(p == 0.0, 0.0, (beta * g) * p * (x - kl_pm) * inv_t)
                grad_a = tl.where(g == 0.0, 0.0, grad_a)
                grad_a_row = grad_a_ptr + row * cols
                tl.store(grad_a_row + offs, grad_a.to(grad_a_row.dtype.element_ty), mask=mask)
            if WRITE_B:
                grad_b = tl.where(q == 0.0, 0.0, (rest * g) * q * (y - kl_qm) * inv_t)
                grad_b = tl.where(g == 0.0, 0.0, grad_b)
                grad_b_row = grad_b_ptr + row * cols
                tl.store(grad_b_row + offs, grad_b.to(grad_b_row.dtype.element_ty), mask=mask)

    # --- top-k teacher --------------------------------------------------------------------------------------

    @triton.jit
    def _topk_stats_kernel(
        s_ptr,
        ids_ptr,
        out_ptr,
        rows,
        cols,
        stride_s,
        K,
        inv_t,
        BLOCK: tl.constexpr,
        IDS_BLOCK: tl.constexpr,
    ):
        """One row's log-sum-exp over the block and over its columns that are not among the (sorted) ids."""
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * stride_s
        ids_row = ids_ptr + row * K
        top = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK,), tl.float64)
        flags = tl.zeros((BLOCK,), tl.int32)
        # the walk over the sorted ids: `nxt` is the first id not yet placed (past every column once they end)
        j = tl.full((), 0, tl.int32)
        nxt = tl.load(ids_row, mask=K > 0, other=2**62)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(s_row + offs, mask=offs < cols, other=float("-inf")).to(tl.float32) * inv_t
            hit = offs < 0
            # the ids inside this tile are the next ones of the walk (ids below 0 match no column)
            while nxt < start + BLOCK:
                hit = hit | (offs == nxt)
                j += 1
                nxt = tl.load(ids_row + j, mask=j < K, other=2**62)
            # the tail: the ids' columns excluded before accumulating, so it has its own maximum (never 1 - sum)
            x = tl.where(hit, float("-inf"), x)
            flags = flags | _lane_flags(x)
            top, total = _lse_update(top, total, x)
        tail = _lanes_lse(top, total, flags)
        # the ids' own logits, gathered: the block's log-sum-exp is the tail's merged with theirs
        id_top = tl.full((), float("-inf"), tl.float32)
        id_total = tl.zeros((IDS_BLOCK,), tl.float64)
        id_flags = tl.zeros((IDS_BLOCK,), tl.int32)
        for k0 in range(0, K, IDS_BLOCK):
            k = k0 + tl.arange(0, IDS_BLOCK)
            col = tl.load(ids_row + k, mask=k < K, other=-1)
            held = (k < K) & (col >= 0) & (col < cols)
            v = tl.load(s_row + col, mask=held, other=float("-inf")).to(tl.float32) * inv_t
            id_flags = id_flags | _lane_flags(v)
            id_top, id_total = _lse_update(id_top, id_total, v)
        tl.store(out_ptr + row, _logaddexp64(tail, _lanes_lse(id_top, id_total, id_flags)))
        tl.store(out_ptr + rows + row, tail)

    @triton.jit
    def _topk_grads_kernel(
        s_ptr,
        ids_ptr,
        grad_ptr,
        lse_excl_ptr,
        tail_coef_ptr,
        id_coef_ptr,
        cols,
        stride_s,
        K,
        inv_t,
        BLOCK: tl.constexpr,
        IDS_BLOCK: tl.constexpr,
    ):
        """One row's top-k gradient: every column's tail share times the tail factor, then the ids' factors."""
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * stride_s
        grad_row = grad_ptr + row * cols
        lse_excl = tl.load(lse_excl_ptr + row)
        # an empty tail (lse -inf) has no gradient; its shift is 0, not -inf
        empty = lse_excl == float("-inf")
        shift = _no_mass_to_zero(lse_excl)
        tail_coef = tl.load(tail_coef_ptr + row) * inv_t
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < cols
            x = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            # one exponential per element: the column's share of the tail, exp(s_v - lse_excl), never S_v / S_tail
            grad = tl.where(empty, 0.0, tl.exp(x - shift) * tail_coef)
            tl.store(grad_row + offs, grad.to(grad_row.dtype.element_ty), mask=mask)
        # every thread's tail stores land before the ids' factors are written over them
        tl.debug_barrier()
        for k0 in range(0, K, IDS_BLOCK):
            k = k0 + tl.arange(0, IDS_BLOCK)
            col = tl.load(ids_ptr + row * K + k, mask=k < K, other=-1)
            held = (k < K) & (col >= 0) & (col < cols)
            coef = tl.load(id_coef_ptr + row * K + k, mask=held, other=0.0) * inv_t
            tl.store(grad_row + col, coef.to(grad_row.dtype.element_ty), mask=held)

    def _autotuned(kernel: Any, key: list[str]) -> Any:
        configs = [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in CONFIGS]
        return triton.autotune(configs=configs, key=key)(kernel)

    _stats_tuned = _autotuned(_stats_kernel, ["cols", "HAS_B", "ENTROPY", "KL"])
    _grads_tuned = _autotuned(
        _grads_kernel, ["cols", "HAS_B", "HAS_KL", "HAS_ENT", "HAS_LOGP", "HAS_LOGQ", "WRITE_A", "WRITE_B"]
    )
    _jsd_terms_tuned = _autotuned(_jsd_terms_kernel, ["cols"])
    _jsd_grads_tuned = _autotuned(_jsd_grads_kernel, ["cols", "WRITE_A", "WRITE_B"])
    _topk_stats_tuned = _autotuned(_topk_stats_kernel, ["cols", "IDS_BLOCK"])
    _topk_grads_tuned = _autotuned(_topk_grads_kernel, ["cols", "IDS_BLOCK"])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch(tuned: Any, raw: Any, grid: tuple[int], block: int | None, *args: Any, **flags: Any) -> None:
    """The autotuned kernel on a GPU; the plain one with a fixed tile in the interpreter or when ``block`` is set."""
    if block is None and not _interpreted():
        tuned[grid](*args, **flags)
        return
    block = DEFAULT_BLOCK if block is None else block
    raw[grid](*args, **flags, BLOCK=block)


def _kernel_ok(a: Tensor, dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and a.dim() == 2 and a.shape[0] > 0 and a.shape[1] > 0


def _vector(x: Tensor) -> Tensor:
    """A per-token input as the kernels read it: contiguous fp32."""
    return x.to(torch.float32).contiguous()


def _ids_block(k: int) -> int:
    """Width of the vector of ids handled at once (a power of two, at least 16)."""
    return min(max(triton.next_power_of_2(k), 16), MAX_IDS_BLOCK)


def exp_gap(d: Tensor) -> Tensor:
    """``exp(d) - 1 - d`` of an fp32 tensor through the kernels' Triton helper (for accuracy tests)."""
    d = d.to(torch.float32).contiguous()
    out = torch.empty_like(d)
    block = 1024
    _exp_gap_kernel[(triton.cdiv(d.numel(), block),)](d, out, d.numel(), BLOCK=block)
    return out


def kl_stats(
    a: Tensor,
    b: Tensor | None,
    *,
    temperature: float,
    dtype: torch.dtype,
    entropy: bool = True,
    kl: bool = True,
    block: int | None = None,
) -> Tensor:
    """KL stats of a ``[rows, cols]`` block in one launch (see :func:`shardkl.kernels.eager.kl_stats`).

    With ``entropy=False`` and (for two inputs) ``kl=False`` only the log-sum-exps are computed; the rows not asked
    for hold 0.

    Args:
        block: column tile width (a power of two); default: autotuned on a GPU, ``DEFAULT_BLOCK`` interpreted.
    """
    if not _kernel_ok(a, dtype):
        return eager.kl_stats(a, b, temperature=temperature, dtype=dtype, entropy=entropy, kl=kl)
    rows, cols = a.shape
    a = row_major(a)
    b = None if b is None else row_major(b)
    out = torch.empty(_stats.num_stats(b is not None), rows, dtype=torch.float32, device=a.device)
    other = a if b is None else b
    _launch(_stats_tuned, _stats_kernel, (rows,), block, a, other, out, rows, cols, a.stride(0), other.stride(0),
            1.0 / temperature, HAS_B=b is not None, ENTROPY=entropy, KL=kl)
    return out


def kl_grads(
    a: Tensor,
    b: Tensor | None,
    *,
    temperature: float,
    dtype: torch.dtype,
    inputs: GradInputs,
    grad_a: Tensor | None,
    grad_b: Tensor | None,
    block: int | None = None,
) -> None:
    """KL gradients of a ``[rows, cols]`` block in one launch (see :func:`shardkl.kernels.eager.kl_grads`).

    Args:
        block: column tile width (a power of two); default: autotuned on a GPU, ``DEFAULT_BLOCK`` interpreted.
    """
    if not _kernel_ok(a, dtype):
        eager.kl_grads(a, b, temperature=temperature, dtype=dtype, inputs=inputs, grad_a=grad_a, grad_b=grad_b)
        return
    b, grad_b = drop_b_without_lse(b, grad_b, inputs)
    if grad_a is None and grad_b is None:
        return
    rows, cols = a.shape
    a = row_major(a)
    b = None if b is None else row_major(b)
    has_b = b is not None

    def vec(x: Tensor | None) -> Tensor | None:
        return None if x is None else _vector(x)

    lse_a = _vector(inputs.lse_a)
    lse_b, kl, ent = vec(inputs.lse_b), vec(inputs.kl), vec(inputs.ent)
    grad_kl, grad_ent = vec(inputs.grad_kl), vec(inputs.grad_ent)
    grad_logp, grad_logq = vec(inputs.grad_logp), vec(inputs.grad_logq)
    token_cols = None if inputs.token_cols is None else inputs.token_cols.to(torch.int64).contiguous()
    has_tokens = token_cols is not None

    def ptr(x: Tensor | None) -> Tensor:
        # absent arguments are never read (constexpr flags); any tensor stands in for the pointer
        return lse_a if x is None else x

    other = a if b is None else b
    _launch(
        _grads_tuned,
        _grads_kernel,
        (rows,),
        block,
        a,
        other,
        a if grad_a is None else grad_a,
        other if grad_b is None else grad_b,
        lse_a,
        ptr(lse_b),
        ptr(kl),
        ptr(ent),
        ptr(grad_kl),
        ptr(grad_ent),
        ptr(grad_logp),
        ptr(grad_logq),
        lse_a if token_cols is None else token_cols,
        cols,
        a.stride(0),
        other.stride(0),
        1.0 / temperature,
        HAS_B=has_b,
        HAS_KL=has_b and grad_kl is not None and kl is not None,
        HAS_ENT=grad_ent is not None and ent is not None,
        HAS_LOGP=has_tokens and grad_logp is not None,
        HAS_LOGQ=has_b and has_tokens and grad_logq is not None,
        WRITE_A=grad_a is not None,
        WRITE_B=grad_b is not None,
    )


def jsd_terms(
    a: Tensor,
    b: Tensor,
    *,
    temperature: float,
    dtype: torch.dtype,
    lse_a: Tensor,
    lse_b: Tensor,
    beta: float,
    block: int | None = None,
) -> Tensor:
    """The block's sums of the terms of KL(P‖M) and KL(Q‖M) in one launch: ``[2, rows]`` float64 (see
    :func:`shardkl.kernels.eager.jsd_terms`).

    Args:
        block: column tile width (a power of two); default: autotuned on a GPU, ``DEFAULT_BLOCK`` interpreted.
    """
    if not _kernel_ok(a, dtype):
        return eager.jsd_terms(a, b, temperature=temperature, dtype=dtype, lse_a=lse_a, lse_b=lse_b, beta=beta)
    rows, cols = a.shape
    a, b = row_major(a), row_major(b)
    out = torch.empty(2, rows, dtype=torch.float64, device=a.device)
    _launch(_jsd_terms_tuned, _jsd_terms_kernel, (rows,), block, a, b, _vector(lse_a), _vector(lse_b), out, rows,
            cols, a.stride(0), b.stride(0), 1.0 / temperature, beta, 1.0 - beta)
    return out


def jsd_grads(
    a: Tensor,
    b: Tensor,
    *,
    temperature: float,
    dtype: torch.dtype,
    lse_a: Tensor,
    lse_b: Tensor,
    kl_pm: Tensor,
    kl_qm: Tensor,
    grad: Tensor,
    beta: float,
    grad_a: Tensor | None,
    grad_b: Tensor | None,
    block: int | None = None,
) -> None:
    """Both JSD gradients of a ``[rows, cols]`` block in one launch (see :func:`shardkl.kernels.eager.jsd_grads`).

    Args:
        block: column tile width (a power of two); default: autotuned on a GPU, ``DEFAULT_BLOCK`` interpreted.
    """
    if not _kernel_ok(a, dtype):
        eager.jsd_grads(a, b, temperature=temperature, dtype=dtype, lse_a=lse_a, lse_b=lse_b, kl_pm=kl_pm,
                        kl_qm=kl_qm, grad=grad, beta=beta, grad_a=grad_a, grad_b=grad_b)
        return
    if grad_a is None and grad_b is None:
        return
    rows, cols = a.shape
    a, b = row_major(a), row_major(b)
    # an output that is not wanted is never written (constexpr flag); its input stands in for the pointer
    _launch(_jsd_grads_tuned, _jsd_grads_kernel, (rows,), block, a, b, a if grad_a is None else grad_a,
            b if grad_b is None else grad_b, _vector(lse_a), _vector(lse_b), _vector(kl_pm), _vector(kl_qm),
            _vector(grad), cols, a.stride(0), b.stride(0), 1.0 / temperature, beta, 1.0 - beta,
            WRITE_A=grad_a is not None, WRITE_B=grad_b is not None)


def topk_stats(
    s: Tensor, *, temperature: float, dtype: torch.dtype, ids: Tensor, block: int | None = None
) -> Tensor:
    """``[2, rows]`` float64 log-sum-exps of the block and of its tail (columns not among ``ids``) in one launch
    (see :func:`shardkl.kernels.eager.topk_stats`).

    Args:
        block: column tile width (a power of two); default: autotuned on a GPU, ``DEFAULT_BLOCK`` interpreted.
    """
    if not _kernel_ok(s, dtype) or ids.shape[-1] == 0:
        return eager.topk_stats(s, temperature=temperature, dtype=dtype, ids=ids)
    rows, cols = s.shape
    k = ids.shape[-1]
    s = row_major(s)
    # sorted, each tile's ids are the next ones of one walk per row ([rows, K]: negligible next to the block)
    sorted_ids = torch.sort(ids.to(torch.int64), dim=-1).values.contiguous()
    out = torch.empty(2, rows, dtype=torch.float64, device=s.device)
    _launch(_topk_stats_tuned, _topk_stats_kernel, (rows,), block, s, sorted_ids, out, rows, cols, s.stride(0), k,
            1.0 / temperature, IDS_BLOCK=_ids_block(k))
    return out


def topk_grads(
    s: Tensor,
    *,
    temperature: float,
    dtype: torch.dtype,
    ids: Tensor,
    lse_excl: Tensor,
    tail_coef: Tensor,
    id_coef: Tensor,
    grad_s: Tensor,
    block: int | None = None,
) -> None:
    """The top-k gradient of a ``[rows, cols]`` block in one launch (see :func:`shardkl.kernels.eager.topk_grads`).

    Args:
        block: column tile width (a power of two); default: autotuned on a GPU, ``DEFAULT_BLOCK`` interpreted.
    """
    if not _kernel_ok(s, dtype) or ids.shape[-1] == 0:
        eager.topk_grads(s, temperature=temperature, dtype=dtype, ids=ids, lse_excl=lse_excl, tail_coef=tail_coef,
                         id_coef=id_coef, grad_s=grad_s)
        return
    rows, cols = s.shape
    k = ids.shape[-1]
    s = row_major(s)
    _launch(_topk_grads_tuned, _topk_grads_kernel, (rows,), block, s, ids.to(torch.int64).contiguous(), grad_s,
            _vector(lse_excl), _vector(tail_coef), _vector(id_coef), cols, s.stride(0), k, 1.0 / temperature,
            IDS_BLOCK=_ids_block(k))


def kernels(device: torch.device) -> Kernels:
    """The Triton :class:`shardkl.kernels.Kernels` for ``device``.

    Raises:
        ValueError: Triton is not installed, or ``device`` is not CUDA and ``TRITON_INTERPRET=1`` is not set.
    """
    if triton is None:
        raise ValueError("impl='triton' needs the `triton` package, which is not installed")
    if device.type != "cuda" and not _interpreted():
        raise ValueError(f"impl='triton' needs a CUDA device (or TRITON_INTERPRET=1 for testing on CPU), got {device}")
    return Kernels("triton", kl_stats, kl_grads, jsd_terms, jsd_grads, topk_stats, topk_grads)


__all__ = [
    "CONFIGS",
    "DEFAULT_BLOCK",
    "MAX_IDS_BLOCK",
    "exp_gap",
    "jsd_grads",
    "jsd_terms",
    "kernels",
    "kl_grads",
    "kl_stats",
    "topk_grads",
    "topk_stats",
]
