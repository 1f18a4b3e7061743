"""The engine's chunk math as hand-written Triton kernels (CUDA; CPU only under ``TRITON_INTERPRET=1``).

Both kernels run one program per row of a ``[rows, cols]`` chunk and walk the row in ``BLOCK``-wide column
tiles, loading the logits in their own dtype (fp32/bf16/fp16) and accumulating in fp32:

- ``_leaf_kernel`` (forward) makes two passes over the row. Pass 1 is an online log-sum-exp of ``a`` (and
  ``b``): a running max ``m`` and a running sum ``s`` of ``exp(x - m)``, rescaled by ``exp(m_old - m_new)``
  whenever a tile raises the max (as in flash-attention / Liger). Pass 2 re-reads the row with the final
  ``m`` and ``log s`` and sums the entropy ``-sum P log P`` and the KL in its cancellation-free g-form
  ``sum P_v g(x_v)``, ``g(x) = x + expm1(-x)``, ``x = log P_v - log Q_v``, plus the mass of Q where P
  underflows to 0 (the limit of ``P g(x)`` there). These are exactly the formulas of
  ``shardkl._stats.leaf_stats``, so results agree with the eager path to fp32 rounding.
- ``_grads_kernel`` (backward) makes one pass: P and Q are recomputed per element from the saved global
  log-sum-exps, and the terms of ``shardkl._stats.chunk_grads`` that are present (``tl.constexpr`` flags)
  are summed and scaled by ``1/T``.

Rows are independent programs, so a row of ``-inf``, NaN or ``+inf`` logits cannot disturb another row.
Compute dtypes other than fp32 (fp64) and empty chunks use the eager functions.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from shardkl.kernels import GradInputs, Kernels, eager

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

# widest column tile; a row is walked in tiles of min(next_pow2(cols), MAX_BLOCK) columns
MAX_BLOCK = 2048


def _block(cols: int) -> int:
    return int(min(triton.next_power_of_2(cols), MAX_BLOCK))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


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
    def _online_lse(x_ptr, cols, temperature, BLOCK: tl.constexpr):
        """Pass 1 over one row: ``(m, s, log s, lse, has_nan)``, ``s = sum exp(x - m)``, online across tiles."""
        m = float("-inf")
        s = 0.0
        nans = 0
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < cols, other=float("-inf")).to(tl.float32) / temperature
            nans += tl.sum((x != x).to(tl.int32), axis=0)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # a still-empty row keeps m = -inf; shift by 0 then, not by -inf (-inf - -inf = NaN)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            # online merge: rescale the old sum to the new max, add this tile's exp(x - m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m = m_new
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        log_s = tl.log(s)
        # +inf logits report lse = +inf (their sums are NaN); a row without mass has log s = -inf, lse = -inf
        lse = tl.where(m == float("inf"), m, m_safe + log_s)
        return m_safe, s, log_s, lse, nans > 0

    @triton.jit
    def _leaf_kernel(
        a_ptr,
        b_ptr,
        out_ptr,
        rows,
        cols,
        stride_a,
        stride_b,
        temperature,
        HAS_B: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Stats ``(la, ent[, lb, kl])`` of one row: online lse pass, then the g-form pass."""
        row = tl.program_id(0).to(tl.int64)
        a_row = a_ptr + row * stride_a
        # the logits are divided by T, as the eager a.to(fp32) / T does
        ma, sa, log_sa, la, nan_a = _online_lse(a_row, cols, temperature, BLOCK)
        ent = 0.0
        if HAS_B:
            b_row = b_ptr + row * stride_b
            mb, sb, log_sb, lb, nan_b = _online_lse(b_row, cols, temperature, BLOCK)
            kl = 0.0
            outside = 0.0
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < cols
            a = tl.load(a_row + offs, mask=mask, other=float("-inf")).to(tl.float32) / temperature
            shifted_a = a - ma
            ea = tl.exp(shifted_a)
            # P = exp(a - m) / s, the eager split; a row without mass gets log P = -inf, P = 0
            log_p = tl.where(log_sa == float("-inf"), float("-inf"), shifted_a - log_sa)
            p = ea / tl.where(sa == 0.0, 1.0, sa)
            # 0 log 0 = 0: `where` keeps out the NaN of 0 * -inf (a NaN input still gets through)
            ent -= tl.sum(tl.where(ea == 0.0, 0.0, p * log_p), axis=0)
            if HAS_B:
                b = tl.load(b_row + offs, mask=mask, other=float("-inf")).to(tl.float32) / temperature
                shifted_b = b - mb
                eb = tl.exp(shifted_b)
                log_q = tl.where(log_sb == float("-inf"), float("-inf"), shifted_b - log_sb)
                x = log_p - log_q
                # P g(x) = P x - P + Q >= 0, g(x) = x + expm1(-x) = exp_gap(-x): no cancellation for tiny KL
                kl += tl.sum(tl.where(ea == 0.0, 0.0, p * _exp_gap(-x)), axis=0)
                # where P underflows to 0 the term's limit is Q_v: sum exp(b - m_b) there, divide by s_b below
                outside += tl.sum(tl.where(ea == 0.0, eb, 0.0), axis=0)
        # NaN logits make lse NaN, so the engine can report the row
        la = tl.where(nan_a, float("nan"), la)
        tl.store(out_ptr + row, la)
        tl.store(out_ptr + rows + row, ent)
        if HAS_B:
            lb = tl.where(nan_b, float("nan"), lb)
            kl += outside / tl.where(sb == 0.0, 1.0, sb)
            tl.store(out_ptr + 2 * rows + row, lb)
            tl.store(out_ptr + 3 * rows + row, kl)

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
        temperature,
        inv_t,
        HAS_B: tl.constexpr,
        HAS_KL: tl.constexpr,
        HAS_ENT: tl.constexpr,
        HAS_LOGP: tl.constexpr,
        HAS_LOGQ: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Gradients of one row with respect to the raw logits, one pass, P and Q recomputed from the lse."""
        row = tl.program_id(0).to(tl.int64)
        lse_a = tl.load(lse_a_ptr + row)
        # a row without mass: shift by 0 (its P is 0 everywhere), not by -inf
        lse_a = tl.where(lse_a == float("-inf"), 0.0, lse_a)
        if HAS_ENT:
            ent = tl.load(ent_ptr + row)
            g_ent = tl.load(grad_ent_ptr + row)
        if HAS_LOGP or HAS_LOGQ:
            token = tl.load(token_cols_ptr + row)
        if HAS_LOGP:
            g_logp = tl.load(grad_logp_ptr + row)
        if HAS_B:
            lse_b = tl.load(lse_b_ptr + row)
            lse_b = tl.where(lse_b == float("-inf"), 0.0, lse_b)
            if HAS_KL:
                kl = tl.load(kl_ptr + row)
                g_kl = tl.load(grad_kl_ptr + row)
            if HAS_LOGQ:
                g_logq = tl.load(grad_logq_ptr + row)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < cols
            a = tl.load(a_ptr + row * stride_a + offs, mask=mask, other=float("-inf")).to(tl.float32) / temperature
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
                b = tl.load(b_ptr + row * stride_b + offs, mask=mask, other=float("-inf")).to(tl.float32) / temperature
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
                tl.store(grad_b_ptr + row * cols + offs, grad_b * inv_t, mask=mask)
            tl.store(grad_a_ptr + row * cols + offs, grad_a * inv_t, mask=mask)


def _row_major(x: Tensor) -> Tensor:
    """``x`` itself when its columns are contiguous (any row stride), else a contiguous copy of the chunk."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _kernel_ok(a: Tensor, dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and a.dim() == 2 and a.shape[0] > 0 and a.shape[1] > 0


def exp_gap(d: Tensor) -> Tensor:
    """``exp(d) - 1 - d`` of an fp32 tensor through the kernels' Triton helper (for accuracy tests)."""
    d = d.to(torch.float32).contiguous()
    out = torch.empty_like(d)
    block = 1024
    _exp_gap_kernel[(triton.cdiv(d.numel(), block),)](d, out, d.numel(), BLOCK=block)
    return out


def leaf(a: Tensor, b: Tensor | None, temperature: float, dtype: torch.dtype, *, block: int | None = None) -> Tensor:
    """Leaf stats of one raw chunk with the Triton kernel.

    Args:
        a: ``[rows, cols]`` raw logits of P (not divided by the temperature), any float dtype.
        b: ``[rows, cols]`` raw logits of Q, or ``None``.
        temperature: the logits are divided by it.
        dtype: compute dtype; fp32 runs the kernel, others (fp64) the eager path.
        block: column tile width (a power of two); default ``min(next_pow2(cols), MAX_BLOCK)``.

    Returns:
        ``[4, rows]`` ``(la, ent, lb, kl)``, or ``[2, rows]`` ``(la, ent)`` when ``b`` is ``None``, in ``dtype``.
    """
    if not _kernel_ok(a, dtype):
        return eager.leaf(a, b, temperature, dtype)
    rows, cols = a.shape
    a = _row_major(a)
    b = None if b is None else _row_major(b)
    out = torch.empty(4 if b is not None else 2, rows, dtype=torch.float32, device=a.device)
    block = _block(cols) if block is None else block
    _leaf_kernel[(rows,)](
        a,
        a if b is None else b,
        out,
        rows,
        cols,
        a.stride(0),
        a.stride(0) if b is None else b.stride(0),
        float(temperature),
        HAS_B=b is not None,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return out


def grads(
    a: Tensor,
    b: Tensor | None,
    temperature: float,
    dtype: torch.dtype,
    *,
    block: int | None = None,
    **saved: Any,
) -> tuple[Tensor, Tensor | None]:
    """Gradients of one raw chunk with respect to the raw logits (``1/T`` applied), with the Triton kernel.

    Args:
        a, b: ``[rows, cols]`` raw logits (``b`` may be ``None``).
        temperature: the logits were divided by it.
        dtype: compute dtype; fp32 runs the kernel, others the eager path.
        block: column tile width (a power of two); default ``min(next_pow2(cols), MAX_BLOCK)``.
        **saved: ``lse_a, lse_b, kl, ent, grad_kl, grad_ent, grad_logp, grad_logq, token_cols`` as for
            :func:`shardkl._stats.chunk_grads` (``[rows]`` tensors or ``None``).

    Returns:
        ``(grad_a, grad_b)``, ``[rows, cols]`` in ``dtype``; ``grad_b`` is ``None`` when ``b`` is.
    """
    if not _kernel_ok(a, dtype):
        return eager.tile_grads(a, b, temperature, dtype, GradInputs(**saved))
    rows, cols = a.shape
    a = _row_major(a)
    b = None if b is None else _row_major(b)
    lse_a: Tensor = saved["lse_a"]

    def vec(name: str) -> Tensor | None:
        x = saved.get(name)
        return None if x is None else x.to(torch.float32).contiguous()

    lse_b, kl, ent = vec("lse_b"), vec("kl"), vec("ent")
    grad_kl, grad_ent, grad_logp, grad_logq = vec("grad_kl"), vec("grad_ent"), vec("grad_logp"), vec("grad_logq")
    token_cols = saved.get("token_cols")
    token_cols = None if token_cols is None else token_cols.to(torch.int64).contiguous()
    lse_a = lse_a.to(torch.float32).contiguous()
    has_b = b is not None and lse_b is not None
    has_tokens = token_cols is not None
    grad_a = torch.empty(rows, cols, dtype=torch.float32, device=a.device)
    grad_b = None if b is None else torch.empty(rows, cols, dtype=torch.float32, device=a.device)
    if b is not None and not has_b and grad_b is not None:
        # no saved lse of Q: nothing flows to b (as in the eager path)
        grad_b.zero_()

    def ptr(x: Tensor | None) -> Tensor:
        # absent arguments are never read (constexpr flags); any tensor stands in for the pointer
        return lse_a if x is None else x

    block = _block(cols) if block is None else block
    _grads_kernel[(rows,)](
        a,
        a if not has_b or b is None else b,
        grad_a,
        grad_a if not has_b or grad_b is None else grad_b,
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
        a.stride(0) if not has_b or b is None else b.stride(0),
        float(temperature),
        # the eager path multiplies by the fp32 rounding of the python float 1/T
        1.0 / temperature,
        HAS_B=has_b,
        HAS_KL=has_b and grad_kl is not None and kl is not None,
        HAS_ENT=grad_ent is not None and ent is not None,
        HAS_LOGP=has_tokens and grad_logp is not None,
        HAS_LOGQ=has_b and has_tokens and grad_logq is not None,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return grad_a, grad_b


def _tile_grads(
    a: Tensor, b: Tensor | None, temperature: float, dtype: torch.dtype, inputs: GradInputs
) -> tuple[Tensor, Tensor | None]:
    return grads(a, b, temperature, dtype, **inputs._asdict())


def block_stats(
    a: Tensor, b: Tensor | None, *, temperature: float, dtype: torch.dtype, entropy: bool = True
) -> Tensor:
    """Stats of a ``[rows, V_local]`` block (see :class:`shardkl.kernels.Kernels`)."""
    return eager.tiled_stats(leaf, a, b, temperature=temperature, dtype=dtype)


def block_grads(
    a: Tensor,
    b: Tensor | None,
    *,
    temperature: float,
    dtype: torch.dtype,
    inputs: GradInputs,
    grad_a: Tensor | None,
    grad_b: Tensor | None,
) -> None:
    """Gradients of a ``[rows, V_local]`` block (see :class:`shardkl.kernels.Kernels`)."""
    eager.tiled_grads(_tile_grads, a, b, temperature=temperature, dtype=dtype, inputs=inputs, grad_a=grad_a,
                      grad_b=grad_b)


def kernels(device: torch.device) -> Kernels:
    """The Triton :class:`shardkl.kernels.Kernels` for ``device``.

    Raises:
        ValueError: Triton is not installed, or ``device`` is not CUDA and ``TRITON_INTERPRET=1`` is not set.
    """
    if triton is None:
        raise ValueError("impl='triton' needs the `triton` package, which is not installed")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"impl='triton' needs a CUDA device (or TRITON_INTERPRET=1 for testing on CPU), got {device}")
    return Kernels("triton", block_stats, block_grads)


__all__ = ["MAX_BLOCK", "exp_gap", "grads", "kernels", "leaf"]
