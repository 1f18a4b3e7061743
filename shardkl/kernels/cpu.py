"""Hand-vectorised C++ kernels for CPU (``cpu_kernels.cpp``), the ``"compiled"`` implementation on CPU.

The source is built on first use by ``torch.compile``'s own C++ toolchain (``torch._inductor``'s code cache: the
compiler flags and the ``at::vec`` vector types it picks for this CPU, OpenMP), once per pair of input dtypes,
and cached on disk by that code cache: later processes load it in milliseconds. Each call is **one** native call
for the whole ``[rows, V_local]`` block, rows in parallel, so there is no per-tile dispatch.

Why not a ``torch.compile`` graph: inductor's CPU loops recompute ``exp`` in every pass (four per pair of logits
instead of two here), its vectorised ``expm1`` is ``exp(x) - 1`` (which loses the digits of a tiny KL), and its
passes over a row are separate loops whenever a per-row value sits between them. The kernels here make three
passes per row (max; ``exp`` into a per-thread scratch row; the g-form terms from that scratch row), the last two
over data already in cache, and prefetch the next row during them. See ``docs/performance.md``.

Only fp32 compute (fp32, bf16 and fp16 inputs); the caller routes float64 elsewhere.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import torch
from torch import Tensor

from shardkl import _stats
from shardkl.kernels import GradInputs, Kernels, drop_b_without_lse, row_major

# Columns per leaf: as the eager tiling's vocabulary chunk, so both group a long row the same way. A leaf's
# scratch (2 x 128 KiB per thread) and its inputs stay in a core's L2 cache between passes.
MAX_CHUNK = 1 << 15
# scratch rows are padded to a multiple of the widest vector (64 floats covers every at::vec width)
_PAD = 64

_CTYPES = {torch.float32: "float", torch.bfloat16: "at::BFloat16", torch.float16: "at::Half"}
DTYPES: tuple[torch.dtype, ...] = tuple(_CTYPES)

# bits of the kernel's `flags` argument (cpu_kernels.cpp)
_BACKWARD, _TWO, _WANT_ENT, _SCALE = 1, 2, 4, 8
_HAS_GRAD_KL, _HAS_GRAD_ENT, _HAS_GRAD_LOGP, _HAS_GRAD_LOGQ, _WRITE_A, _WRITE_B = 16, 32, 64, 128, 256, 512

_ARGTYPES = (
    ["const void*", "const void*", "void*", "void*", "float*", "float*", "const float*", "const int64_t*"]
    + ["int64_t"] * 4
    + ["float", "int64_t", "int64_t"]
)


def source() -> str:
    """The C++ source of the kernels."""
    return resources.files("shardkl.kernels").joinpath("cpu_kernels.cpp").read_text()


@functools.cache
def _kernel(p_dtype: torch.dtype, q_dtype: torch.dtype) -> Any:
    # private API of torch: any failure here (no compiler, another torch version) is reported by the caller
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    header = (
        f"#define SHARDKL_TA {_CTYPES[p_dtype]}\n#define SHARDKL_TB {_CTYPES[q_dtype]}\n"
        f"#define SHARDKL_MAX_CHUNK {MAX_CHUNK}\n"
    )
    return CppPythonBindingsCodeCache.load_pybinding(_ARGTYPES, header + source())


def build(p_dtype: torch.dtype, q_dtype: torch.dtype | None = None) -> None:
    """Build (or load from the disk cache) the kernels for these input dtypes; raises if that is impossible here."""
    for dtype in (p_dtype, q_dtype):
        if dtype is not None and dtype not in _CTYPES:
            raise TypeError(f"the CPU kernels take {', '.join(map(str, DTYPES))} logits, got {dtype}")
    _kernel(p_dtype, p_dtype if q_dtype is None else q_dtype)


def _threads(rows: int) -> int:
    return max(1, min(torch.get_num_threads(), rows))


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype != torch.float32:
        raise TypeError(f"the CPU kernels compute in float32, got compute dtype {dtype}")


def stats(a: Tensor, b: Tensor | None, *, temperature: float, dtype: torch.dtype, entropy: bool = True) -> Tensor:
    """Stats of a ``[rows, V_local]`` block (see :class:`shardkl.kernels.Kernels`)."""
    _check_dtype(dtype)
    rows, cols = a.shape
    out = torch.empty(_stats.num_stats(b is not None), rows, dtype=torch.float32, device=a.device)
    if rows == 0:
        return out
    a = row_major(a)
    b = None if b is None else row_major(b)
    threads = _threads(rows)
    padded = -(-min(cols, MAX_CHUNK) // _PAD) * _PAD
    scratch = torch.empty(threads, 2, padded, dtype=torch.float32, device=a.device)
    flags = (_TWO if b is not None else 0) | (_WANT_ENT if entropy else 0) | (_SCALE if temperature != 1.0 else 0)
    other = a if b is None else b
    kernel = _kernel(a.dtype, other.dtype)
    kernel(a, other, a, a, out, scratch, out, out, rows, cols, a.stride(0), other.stride(0), 1.0 / temperature,
           flags, threads)
    return out


def grads(
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
    _check_dtype(dtype)
    rows, cols = a.shape
    b, grad_b = drop_b_without_lse(b, grad_b, inputs)
    if rows == 0 or (grad_a is None and grad_b is None):
        return
    for grad in (grad_a, grad_b):
        if grad is not None and not grad.is_contiguous():
            raise ValueError("gradient outputs must be contiguous")
    a = row_major(a)
    b = None if b is None else row_major(b)
    two = b is not None
    vecs = torch.zeros(8, rows, dtype=torch.float32, device=a.device)
    present = {
        0: inputs.lse_a, 1: inputs.lse_b, 2: inputs.kl, 3: inputs.ent,
        4: inputs.grad_kl, 5: inputs.grad_ent, 6: inputs.grad_logp, 7: inputs.grad_logq,
    }
    for i, value in present.items():
        if value is not None:
            vecs[i] = value
    has_kl = two and inputs.grad_kl is not None and inputs.kl is not None
    has_ent = inputs.grad_ent is not None
    tokens = inputs.token_cols
    has_logp = tokens is not None and inputs.grad_logp is not None
    has_logq = two and tokens is not None and inputs.grad_logq is not None
    flags = (
        _BACKWARD
        | (_TWO if two else 0)
        | (_SCALE if temperature != 1.0 else 0)
        | (_HAS_GRAD_KL if has_kl else 0)
        | (_HAS_GRAD_ENT if has_ent else 0)
        | (_HAS_GRAD_LOGP if has_logp else 0)
        | (_HAS_GRAD_LOGQ if has_logq else 0)
        | (_WRITE_A if grad_a is not None else 0)
        | (_WRITE_B if grad_b is not None else 0)
    )
    token_cols = vecs if tokens is None else tokens.to(torch.int64).contiguous()
    other = a if b is None else b
    kernel = _kernel(a.dtype, other.dtype)
    kernel(a, other, a if grad_a is None else grad_a, other if grad_b is None else grad_b, vecs, vecs, vecs,
           token_cols, rows, cols, a.stride(0), other.stride(0), 1.0 / temperature, flags, _threads(rows))


KERNELS = Kernels("compiled", stats, grads)

__all__ = ["DTYPES", "KERNELS", "MAX_CHUNK", "build", "grads", "source", "stats"]
