"""Hand-vectorised C++ kernels for CPU (``cpu_kernels.cpp``), the ``"compiled"`` implementation on CPU: all six
entries of :class:`shardkl.kernels.Kernels` (KL stats, JSD terms, top-k stats, and their gradients).

The source is built on first use by ``torch.compile``'s own C++ toolchain (``torch._inductor``'s code cache: the
compiler flags and the ``at::vec`` vector types it picks for this CPU, OpenMP), once per pair of input dtypes (one
module, whose ``mode`` argument picks the op and the pass), and cached on disk by that code cache. This module
records where each build went (keyed by the source, torch, Python and the CPU's vector ISA), so that later
processes load the extension in milliseconds without importing ``torch._inductor`` (which alone takes seconds).
Each call is **one** native call for the whole ``[rows, V_local]`` block, rows in parallel, so there is no per-tile
dispatch.

Why not a ``torch.compile`` graph: inductor's CPU loops recompute ``exp`` in every pass (four per pair of logits
instead of two here), its vectorised ``expm1`` is ``exp(x) - 1`` (which loses the digits of a tiny KL), and its
passes over a row are separate loops whenever a per-row value sits between them. Per row:

- KL stats: three passes (max; ``exp`` into a per-thread scratch row; the g-form terms from that scratch row), the
  last two over data already in cache, with the next row prefetched during them; the log-sum-exps alone (``kl=False,
  entropy=False``, JSD's first round) stop after the second and store nothing.
- JSD terms and gradients: one pass. Where ``|d| < 0.4`` (``d = log P − log Q``, the usual case) one exponential and
  power series in ``d`` whose coefficients depend on β (``Q = P e^−d``; no log, every digit of a tiny divergence);
  beyond, two exponentials and two ``log1p``.
- Top-k stats: one pass around the largest logit at the teacher's ids (two where the student's max lies elsewhere),
  the ids' lanes summed apart from the tail, the tail in double with an unbiased exponential (its log-sum-exp is
  compared with the ids' logits directly); a tail far below the max is summed again around its own. Gradients: one
  exponential per logit, then the K id columns.

See ``docs/performance.md``.

Only fp32 compute (fp32, bf16 and fp16 inputs); the caller routes float64 elsewhere.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
from importlib import resources
from pathlib import Path
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

# what the kernel computes (`mode`), and the bits of its `flags` argument (cpu_kernels.cpp)
_KL_STATS, _KL_GRADS, _JSD_TERMS, _JSD_GRADS, _TOPK_STATS, _TOPK_GRADS = range(6)
_TWO, _WANT_ENT, _SCALE = 2, 4, 8
_HAS_GRAD_KL, _HAS_GRAD_ENT, _HAS_GRAD_LOGP, _HAS_GRAD_LOGQ, _WRITE_A, _WRITE_B = 16, 32, 64, 128, 256, 512
_WANT_KL = 1024

# kernel(mode, a, b, grad_a, grad_b, out, out64, scratch, vecs, index, rows, cols, stride_a, stride_b, k, inv_t,
#        beta, flags, threads)
_ARGTYPES = (
    ["int64_t", "const void*", "const void*", "void*", "void*", "float*", "double*", "float*", "const float*",
     "const int64_t*"]
    + ["int64_t"] * 5
    + ["float", "float", "int64_t", "int64_t"]
)


def source() -> str:
    """The C++ source of the kernels."""
    return resources.files("shardkl.kernels").joinpath("cpu_kernels.cpp").read_text()


def _index_path() -> Path:
    """Where this module records the built extensions: beside inductor's own cache (its default location)."""
    user = getpass.getuser() if hasattr(os, "getuid") else "user"
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    return Path(root) / "shardkl-cpu-kernels.json"


def _build_key(code: str) -> str:
    # everything the built extension depends on that can change under a cache directory
    parts = (code, torch.__version__, sys.version, torch.backends.cpu.get_cpu_capability(), platform.machine())
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _load_built(key: str) -> Any | None:
    """The ``kernel`` function of an extension built earlier for ``key``, loaded without importing
    ``torch._inductor`` (a few seconds on first import), or ``None``."""
    try:
        entry = json.loads(_index_path().read_text())[key]
        name, path = entry["module"], entry["path"]
        if name not in sys.modules:
            # the extension reads this pointer at import, as torch._inductor sets it before loading one
            os.environ["_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"] = str(
                torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr  # type: ignore[attr-defined]
            )
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                return None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[name] = module
        return sys.modules[name].kernel
    except Exception:  # no index, no entry, a removed file, another torch: build (or load) through inductor
        return None


def _record_built(key: str, function: Any) -> None:
    try:
        module = sys.modules[function.__module__]
        path = _index_path()
        index = json.loads(path.read_text()) if path.exists() else {}
        index[key] = {"module": module.__name__, "path": module.__file__}
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole and renamed: a concurrent reader sees the old index or the new one
        scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        scratch.write_text(json.dumps(index))
        os.replace(scratch, path)
    except Exception:  # the index is only a shortcut; inductor's own cache still holds the build
        pass


@functools.cache
def _kernel(p_dtype: torch.dtype, q_dtype: torch.dtype) -> Any:
    header = (
        f"#define SHARDKL_TA {_CTYPES[p_dtype]}\n#define SHARDKL_TB {_CTYPES[q_dtype]}\n"
        f"#define SHARDKL_MAX_CHUNK {MAX_CHUNK}\n"
    )
    code = header + source()
    key = _build_key(code)
    loaded = _load_built(key)
    if loaded is not None:
        return loaded
    # private API of torch: any failure here (no compiler, another torch version) is reported by the caller
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    function = CppPythonBindingsCodeCache.load_pybinding(_ARGTYPES, code)
    _record_built(key, function)
    return function


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


def _writable(grad: Tensor | None, like: Tensor, name: str) -> Tensor | None:
    """Where the kernel writes a gradient: ``grad`` itself when it is contiguous and in the input's dtype (every
    output the engine passes), else a temporary that :func:`_copy_back` copies into ``grad``."""
    if grad is None:
        return None
    if grad.shape != like.shape:
        raise ValueError(f"{name} must have the shape of its input {tuple(like.shape)}, got {tuple(grad.shape)}")
    if grad.is_contiguous() and grad.dtype == like.dtype:
        return grad
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def _copy_back(grad: Tensor | None, written: Tensor | None) -> None:
    if grad is not None and written is not None and written is not grad:
        grad.copy_(written)


def _scratch(threads: int, per_thread: int, cols: int, device: torch.device) -> Tensor:
    """``per_thread`` fp32 scratch rows per thread, each as wide as one leaf (``min(cols, MAX_CHUNK)``) rounded up
    to a multiple of every vector width."""
    padded = -(-min(cols, MAX_CHUNK) // _PAD) * _PAD
    return torch.empty(threads, per_thread, padded, dtype=torch.float32, device=device)


def _run(
    mode: int,
    a: Tensor,
    b: Tensor | None = None,
    *,
    grad_a: Tensor | None = None,
    grad_b: Tensor | None = None,
    out: Tensor | None = None,
    out64: Tensor | None = None,
    scratch: Tensor | None = None,
    vecs: Tensor | None = None,
    index: Tensor | None = None,
    k: int = 0,
    temperature: float = 1.0,
    beta: float = 0.0,
    flags: int = 0,
) -> None:
    """One call of the native kernel on a ``[rows, cols]`` block (``a`` and ``b`` with contiguous columns);
    unused pointer arguments get ``a``, which the kernel does not read for them."""
    other = a if b is None else b
    rows, cols = a.shape
    kernel = _kernel(a.dtype, other.dtype)
    flags |= _SCALE if temperature != 1.0 else 0
    kernel(
        mode, a, other,
        a if grad_a is None else grad_a, other if grad_b is None else grad_b,
        a if out is None else out, a if out64 is None else out64, a if scratch is None else scratch,
        a if vecs is None else vecs, a if index is None else index,
        rows, cols, a.stride(0), other.stride(0), k, 1.0 / temperature, beta, flags, _threads(rows),
    )


def _row_vectors(*vectors: Tensor) -> Tensor:
    """The per-row vectors of a pass as one contiguous fp32 tensor, one after the other."""
    return torch.cat([v.reshape(-1).to(torch.float32) for v in vectors])


def kl_stats(
    a: Tensor, b: Tensor | None, *, temperature: float, dtype: torch.dtype, entropy: bool = True, kl: bool = True
) -> Tensor:
    """KL stats of a ``[rows, cols]`` block (see :func:`shardkl.kernels.eager.kl_stats`). ``kl=False`` and
    ``entropy=False`` together (only the log-sum-exps) skip the third pass and store nothing in the scratch rows."""
    _check_dtype(dtype)
    rows, cols = a.shape
    two = b is not None
    out = torch.empty(_stats.num_stats(two), rows, dtype=torch.float32, device=a.device)
    if rows == 0:
        return out
    if cols == 0:
        # no columns: the identity of the merge (no mass, nothing to diverge)
        identity = [float("-inf"), 0.0, float("-inf"), 0.0][: out.shape[0]]
        return out.copy_(torch.tensor(identity).unsqueeze(-1).expand_as(out))
    a = row_major(a)
    b = None if b is None else row_major(b)
    # the third pass reads the exponentials back from per-thread scratch rows; without it none are needed
    third_pass = entropy or (kl and two)
    scratch = _scratch(_threads(rows), 2, cols, a.device) if third_pass else None
    flags = (_TWO if two else 0) | (_WANT_ENT if entropy else 0) | (_WANT_KL if kl and two else 0)
    _run(_KL_STATS, a, b, out=out, scratch=scratch, temperature=temperature, flags=flags)
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
) -> None:
    """KL gradients of a ``[rows, cols]`` block (see :func:`shardkl.kernels.eager.kl_grads`)."""
    _check_dtype(dtype)
    rows, cols = a.shape
    b, grad_b = drop_b_without_lse(b, grad_b, inputs)
    if rows == 0 or cols == 0 or (grad_a is None and grad_b is None):
        return
    out_a = _writable(grad_a, a, "grad_a")
    out_b = None if b is None else _writable(grad_b, b, "grad_b")
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
        (_TWO if two else 0)
        | (_HAS_GRAD_KL if has_kl else 0)
        | (_HAS_GRAD_ENT if has_ent else 0)
        | (_HAS_GRAD_LOGP if has_logp else 0)
        | (_HAS_GRAD_LOGQ if has_logq else 0)
        | (_WRITE_A if grad_a is not None else 0)
        | (_WRITE_B if grad_b is not None else 0)
    )
    index = None if tokens is None else tokens.to(torch.int64).contiguous()
    _run(_KL_GRADS, a, b, grad_a=out_a, grad_b=out_b, vecs=vecs, index=index, temperature=temperature, flags=flags)
    _copy_back(grad_a, out_a)
    _copy_back(grad_b, out_b)


def jsd_terms(
    a: Tensor,
    b: Tensor,
    *,
    temperature: float,
    dtype: torch.dtype,
    lse_a: Tensor,
    lse_b: Tensor,
    beta: float,
) -> Tensor:
    """This block's per-token sums of the terms of KL(P‖M) and KL(Q‖M): ``[2, rows]`` float64 (see
    :func:`shardkl.kernels.eager.jsd_terms`). One pass per row: two exponentials per pair, and two ``log1p`` only
    where ``|log P − log Q| >= 0.4`` (below, power series in it)."""
    _check_dtype(dtype)
    rows, cols = a.shape
    out = torch.zeros(2, rows, dtype=torch.float64, device=a.device)
    if rows == 0 or cols == 0:
        return out
    _run(_JSD_TERMS, row_major(a), row_major(b), out64=out, vecs=_row_vectors(lse_a, lse_b),
         temperature=temperature, beta=beta)
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
) -> None:
    """Write ``grad · ∂JSD_β`` with respect to the raw logits into ``grad_a`` / ``grad_b`` (each skipped if
    ``None``; see :func:`shardkl.kernels.eager.jsd_grads`). One pass per row."""
    _check_dtype(dtype)
    rows, cols = a.shape
    if rows == 0 or cols == 0 or (grad_a is None and grad_b is None):
        return
    out_a, out_b = _writable(grad_a, a, "grad_a"), _writable(grad_b, b, "grad_b")
    flags = (_WRITE_A if grad_a is not None else 0) | (_WRITE_B if grad_b is not None else 0)
    _run(_JSD_GRADS, row_major(a), row_major(b), grad_a=out_a, grad_b=out_b,
         vecs=_row_vectors(lse_a, lse_b, kl_pm, kl_qm, grad), temperature=temperature, beta=beta, flags=flags)
    _copy_back(grad_a, out_a)
    _copy_back(grad_b, out_b)


def topk_stats(s: Tensor, *, temperature: float, dtype: torch.dtype, ids: Tensor) -> Tensor:
    """``[2, rows]`` float64: the log-sum-exp of the block and of its columns not among ``ids`` (see
    :func:`shardkl.kernels.eager.topk_stats`). Per leaf of at most ``MAX_CHUNK`` columns: the max, then ``exp``
    with the ids' lanes summed apart from the tail's (the tail is a sum, never ``1 − Σ``); a tail below ``1e-20``
    of the row's max is summed again around its own max."""
    _check_dtype(dtype)
    rows, cols = s.shape
    out = torch.full((2, rows), float("-inf"), dtype=torch.float64, device=s.device)
    if rows == 0 or cols == 0:
        return out
    k = ids.shape[-1]
    _run(_TOPK_STATS, row_major(s), out64=out, index=ids.to(torch.int64).contiguous() if k else None, k=k,
         temperature=temperature)
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
) -> None:
    """Write the top-k gradient with respect to the raw student logits into ``grad_s`` (see
    :func:`shardkl.kernels.eager.topk_grads`): one exponential per logit, then the ids' columns."""
    _check_dtype(dtype)
    rows, cols = s.shape
    if rows == 0 or cols == 0:
        return
    out = _writable(grad_s, s, "grad_s")
    k = ids.shape[-1]
    _run(_TOPK_GRADS, row_major(s), grad_a=out, vecs=_row_vectors(lse_excl, tail_coef, id_coef),
         index=ids.to(torch.int64).contiguous() if k else None, k=k, temperature=temperature)
    _copy_back(grad_s, out)


KERNELS = Kernels("compiled", kl_stats, kl_grads, jsd_terms, jsd_grads, topk_stats, topk_grads)

__all__ = [
    "DTYPES",
    "KERNELS",
    "MAX_CHUNK",
    "build",
    "jsd_grads",
    "jsd_terms",
    "kl_grads",
    "kl_stats",
    "source",
    "topk_grads",
    "topk_stats",
]
