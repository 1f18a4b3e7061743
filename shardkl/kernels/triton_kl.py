"""Hand-written Triton kernels for ``impl="triton"`` (CUDA; CPU only under ``TRITON_INTERPRET=1``, for tests).

One launch per call and pass: the grid has one program per row of the whole ``[rows, V_local]`` block, and each
program streams its row's vocabulary in ``BLOCK``-wide tiles, loading the logits in their own dtype
(fp32/bf16/fp16) and accumulating in fp32. ``BLOCK`` and ``num_warps`` come from ``triton.autotune`` (keyed on
the vocabulary width and the variant); tests and the interpreter pass a ``block`` explicitly.

- ``_stats_kernel`` (forward) reads each logit from memory **once**: every tile is a leaf of the stats monoid of
  ``shardkl._stats`` (its max, ``exp(x - max)`` held in registers, their sums, and from those the tile's KL in
  g-form and entropy, with no further transcendental), and is merged into the row's running stats by the chain
  rule (in float64), as the engine merges vocabulary chunks and ranks. Two exponentials per pair of logits, plus a
  few scalar ones per tile for the merge. The KL integrand ``g = e^d - 1 - d`` (``d = log Q - log P``) is a series for
  ``|d| < 0.5`` and ``Q - P - P d`` above, so a tiny KL keeps its digits without ``expm1`` (which Triton lacks).
- ``_grads_kernel`` (backward) makes one pass: P and Q recomputed per element from the saved global
  log-sum-exps, the terms of ``shardkl._stats.chunk_grads`` that are present (``tl.constexpr`` flags) summed,
  scaled by ``1/T`` and stored in the gradient's dtype.

Rows are independent programs, so a row of ``-inf``, NaN or ``+inf`` logits cannot disturb another row; the
lse of a row holding NaN is NaN and of one holding ``+inf`` is ``+inf``, as the engine's checks expect.
Float64 compute and empty blocks use the eager kernels.
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


if triton is not None:
    # The @triton.jit functions carry no type hints except `tl.constexpr`: the Triton compiler evaluates every
    # parameter annotation inside the kernel's scope, where names such as `typing.Any` do not exist.

    @triton.jit
    def _exp_gap(d):
        """``exp(d) - 1 - d >= 0`` in fp32, accurate for small ``|d|`` (Triton has no portable expm1)."""
        # below |d| = 0.5 a Taylor polynomial (truncation < 1e-10 relative at 0.5); above, the plain subtraction
        small = tl.abs(d) < 0.5
        ds = tl.where(small, d, 0.0)
        # Horner form of d^2 (1/2! + d/3! + ... + d^8/10!): no cancellation near d = 0
        series = 2.755731922398589e-07
        series = series * ds + 2.7557319223985893e-06
        series = series * ds + 2.48015873015873e-05
        series = series * ds + 0.0001984126984126984
        series = series * ds + 0.001388888888888889
        series = series * ds + 0.008333333333333333
        series = series * ds + 0.041666666666666664
        series = series * ds + 0.16666666666666666
        series = series * ds + 0.5
        # for |d| >= 0.5 the subtraction exp(d) - 1 - d keeps all but ~1e-6 relative of the result
        large = tl.where(d == float("inf"), d, (tl.exp(d) - 1.0) - d)
        return tl.where(small, ds * ds * series, large)

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
    def _tile_softmax(x):
        """``(lse, log_p, e, inv_s)`` of one tile: ``e = exp(x - max)``, ``P = e * inv_s``, ``log P = x - lse``."""
        m = tl.max(x, axis=0)
        shift = _no_mass_to_zero(m)
        e = tl.exp(x - shift)
        s = tl.sum(e, axis=0)
        log_s = tl.log(s)
        # a tile without mass: lse -inf, log P -inf (shift by +inf, not by -inf)
        lse = shift + log_s
        log_p = x - tl.where(s == 0.0, float("inf"), lse)
        inv_s = 1.0 / tl.where(s == 0.0, 1.0, s)
        return lse, log_p, e, inv_s

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
        BLOCK: tl.constexpr,
    ):
        """Stats ``(la, ent[, lb, kl])`` of one row in one pass: a leaf per tile, merged by the chain rule."""
        row = tl.program_id(0).to(tl.int64)
        a_row = a_ptr + row * stride_a
        b_row = b_ptr + row * stride_b
        # running stats of the columns so far (the empty group: no mass, zero entropy and KL), in float64: a few
        # scalar operations per tile, but in fp32 the rounding of ~100 merges reaches 6e-6 of a KL of 5e-3
        la = tl.full((), float("-inf"), tl.float64)
        lb = tl.full((), float("-inf"), tl.float64)
        ent = tl.full((), 0.0, tl.float64)
        kl = tl.full((), 0.0, tl.float64)
        bad_a = 0  # NaN (1) / +inf (2) seen
        bad_b = 0
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < cols
            a = tl.load(a_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            bad_a = bad_a | _bad(a)
            t_la, log_p, ea, inv_sa = _tile_softmax(a)
            t_la = t_la.to(tl.float64)
            p = ea * inv_sa
            p_zero = ea == 0.0
            # merge of the running group (1) and this tile (2): shares of P's mass, log w = la_i - la
            new_la = tl.maximum(la, t_la) + tl.log(1.0 + tl.exp(-tl.abs(la - t_la)))
            new_la = tl.where(tl.maximum(la, t_la) == float("-inf"), float("-inf"), new_la)
            log_w1 = la - _no_mass_to_zero(new_la)
            log_w2 = t_la - _no_mass_to_zero(new_la)
            w1 = tl.exp(log_w1)
            w2 = tl.exp(log_w2)
            if ENTROPY:
                # 0 log 0 = 0: `where` keeps out the NaN of 0 * -inf
                t_ent = -tl.sum(tl.where(p_zero, 0.0, p * log_p), axis=0).to(tl.float64)
                ent = tl.where(w1 == 0.0, 0.0, w1 * (ent - log_w1)) + tl.where(w2 == 0.0, 0.0, w2 * (t_ent - log_w2))
            if HAS_B:
                b = tl.load(b_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
                bad_b = bad_b | _bad(b)
                t_lb, log_q, eb, inv_sb = _tile_softmax(b)
                t_lb = t_lb.to(tl.float64)
                q = eb * inv_sb
                # P g(x), x = log P - log Q, d = -x: P (e^d - 1 - d) = Q - P - P d, or P d^2 (series) for small
                # |d|, where Q - P - P d would lose a tiny KL's digits; where P is 0 the term's limit is Q
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
                new_lb = tl.maximum(lb, t_lb) + tl.log(1.0 + tl.exp(-tl.abs(lb - t_lb)))
                new_lb = tl.where(tl.maximum(lb, t_lb) == float("-inf"), float("-inf"), new_lb)
                log_v1 = lb - _no_mass_to_zero(new_lb)
                log_v2 = t_lb - _no_mass_to_zero(new_lb)
                # chain rule: w (KL_i + g(log w - log v)); a group where P has no mass contributes its share of Q
                kl1 = tl.where(w1 == 0.0, tl.exp(log_v1), w1 * (kl + _exp_gap(log_v1 - log_w1)))
                kl2 = tl.where(w2 == 0.0, tl.exp(log_v2), w2 * (t_kl + _exp_gap(log_v2 - log_w2)))
                kl = kl1 + kl2
                lb = new_lb
            la = new_la
        # NaN logits make lse NaN and +inf logits +inf, so the engine can report the row; its other stats are NaN
        la = tl.where((bad_a & 1) != 0, float("nan"), tl.where((bad_a & 2) != 0, float("inf"), la))
        tl.store(out_ptr + row, la.to(tl.float32))
        tl.store(out_ptr + rows + row, tl.where(bad_a != 0, float("nan"), ent).to(tl.float32))
        if HAS_B:
            lb = tl.where((bad_b & 1) != 0, float("nan"), tl.where((bad_b & 2) != 0, float("inf"), lb))
            tl.store(out_ptr + 2 * rows + row, lb.to(tl.float32))
            tl.store(out_ptr + 3 * rows + row, tl.where((bad_a | bad_b) != 0, float("nan"), kl).to(tl.float32))

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

    def _autotuned(kernel: Any, key: list[str]) -> Any:
        configs = [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in CONFIGS]
        return triton.autotune(configs=configs, key=key)(kernel)

    _stats_tuned = _autotuned(_stats_kernel, ["cols", "HAS_B", "ENTROPY"])
    _grads_tuned = _autotuned(
        _grads_kernel, ["cols", "HAS_B", "HAS_KL", "HAS_ENT", "HAS_LOGP", "HAS_LOGQ", "WRITE_A", "WRITE_B"]
    )


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
    """KL stats of a ``[rows, cols]`` block in one launch (see :func:`shardkl.kernels.eager.kl_stats`;
    ``kl=False`` is not used yet by this kernel: the KL row is computed anyway).

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
            1.0 / temperature, HAS_B=b is not None, ENTROPY=entropy)
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
        return None if x is None else x.to(torch.float32).contiguous()

    lse_a = vec(inputs.lse_a)
    assert lse_a is not None
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


def kernels(device: torch.device) -> Kernels:
    """The Triton :class:`shardkl.kernels.Kernels` for ``device``.

    Raises:
        ValueError: Triton is not installed, or ``device`` is not CUDA and ``TRITON_INTERPRET=1`` is not set.
    """
    if triton is None:
        raise ValueError("impl='triton' needs the `triton` package, which is not installed")
    if device.type != "cuda" and not _interpreted():
        raise ValueError(f"impl='triton' needs a CUDA device (or TRITON_INTERPRET=1 for testing on CPU), got {device}")
    # the JSD and top-k entries are eager's until their Triton kernels exist
    return Kernels(
        "triton", kl_stats, kl_grads, eager.jsd_terms, eager.jsd_grads, eager.topk_stats, eager.topk_grads
    )


__all__ = ["CONFIGS", "DEFAULT_BLOCK", "exp_gap", "kernels", "kl_grads", "kl_stats"]
