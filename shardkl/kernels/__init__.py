"""Kernels of the engine's ops: the per-block math of every divergence, behind one contract. No communication here.

Every implementation computes, for each op, two things on one ``[rows, cols]`` block of raw logits (any float
dtype and row stride, not yet divided by the temperature), and **chooses its own tiling** to do so:

=========  ======================================================  ==========================================
op         forward (per-token partials of the block)               backward (writes the block's gradients)
=========  ======================================================  ==========================================
KL stats   ``kl_stats``: ``[LA, ENT(, LB, KL)]`` of :mod:`._stats`  ``kl_grads``: of KL, entropy, log-probs
JSD        ``jsd_terms``: the block's terms of KL(P‖M), KL(Q‖M)     ``jsd_grads``: of ``JSD_β``
top-k      ``topk_stats``: lse, and lse without the teacher's ids   ``topk_grads``: of the bucket KL
=========  ======================================================  ==========================================

The exact signatures are those of :mod:`shardkl.kernels.eager`, the reference every implementation is tested
against; :class:`Kernels` holds one implementation's six entries. A block is this rank's whole slice for logits
given as a tensor (one native call or one launch per block and pass), or one ``[R, C]`` tile of a matmul for a
:class:`shardkl.LinearLogits`. Gradients are written with respect to the raw logits (``1/T`` applied) into
caller-provided contiguous outputs.

Implementations (:mod:`shardkl._dispatch` picks one per call from ``Options.impl``):

- :mod:`~shardkl.kernels.eager`: PyTorch ops on memory-bounded tiles; works everywhere, any dtype.
- :mod:`~shardkl.kernels.cpu`: hand-vectorised C++ for CPU, built on first use with ``torch.compile``'s own C++
  toolchain and cached on disk; fp32 compute (fp32, bf16, fp16 inputs).
- :mod:`~shardkl.kernels.compiled`: ``torch.compile`` graphs of the eager math (CUDA, and CPU float64).
- :mod:`~shardkl.kernels.triton_kl`: Triton kernels for CUDA (on CPU only under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

Impl = Literal["auto", "eager", "compiled", "triton"]
IMPLS: tuple[str, ...] = get_args(Impl)


class GradInputs(NamedTuple):
    """What the KL backward of one ``[rows, cols]`` block needs, each ``[rows]`` or ``None`` where unused.

    Attributes:
        lse_a, lse_b, kl, ent: global per-token results of the forward pass (``lse_b``/``kl`` ``None`` for one input).
        grad_kl, grad_ent, grad_logp, grad_logq: incoming gradients of the four outputs (``None``: no gradient).
        token_cols: column of each token in ``[0, cols)`` of this block, or -1 where the block does not hold it
            (``None`` without tokens).
    """

    lse_a: Tensor
    lse_b: Tensor | None
    kl: Tensor | None
    ent: Tensor
    grad_kl: Tensor | None
    grad_ent: Tensor | None
    grad_logp: Tensor | None
    grad_logq: Tensor | None
    token_cols: Tensor | None

    def rows(self, rows: slice) -> GradInputs:
        """The same inputs for a slice of the rows."""
        return GradInputs(*(None if x is None else x[rows] for x in self))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Kernels:
    """One implementation: its name and the forward and backward entry of every op.

    Signatures (``a``, ``b``, ``s`` are ``[rows, cols]`` views of raw logits; see :mod:`shardkl.kernels.eager`):

    - ``kl_stats(a, b, *, temperature, dtype, entropy=True, kl=True) -> [num_stats, rows]`` in ``dtype``;
    - ``kl_grads(a, b, *, temperature, dtype, inputs, grad_a, grad_b) -> None``;
    - ``jsd_terms(a, b, *, temperature, dtype, lse_a, lse_b, beta) -> [2, rows]`` float64;
    - ``jsd_grads(a, b, *, temperature, dtype, lse_a, lse_b, kl_pm, kl_qm, grad, beta, grad_a, grad_b) -> None``;
    - ``topk_stats(s, *, temperature, dtype, ids) -> [2, rows]`` float64;
    - ``topk_grads(s, *, temperature, dtype, ids, lse_excl, tail_coef, id_coef, grad_s) -> None``.
    """

    name: str
    kl_stats: Callable[..., Tensor]
    kl_grads: Callable[..., None]
    jsd_terms: Callable[..., Tensor]
    jsd_grads: Callable[..., None]
    topk_stats: Callable[..., Tensor]
    topk_grads: Callable[..., None]

    def replace(self, name: str | None = None, **entries: Callable[..., object]) -> Kernels:
        """A copy with some entries (and the name) replaced."""
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        current.update(entries)
        if name is not None:
            current["name"] = name
        return Kernels(**current)


ENTRIES: tuple[str, ...] = tuple(f.name for f in fields(Kernels) if f.name != "name")


def scaled(x: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """``x`` in the compute dtype, divided by the temperature (no copy for fp32 input at T = 1)."""
    x = x.to(dtype)
    return x if temperature == 1.0 else x / temperature


def row_major(x: Tensor) -> Tensor:
    """``x`` itself when its columns are contiguous (any row stride), else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def drop_b_without_lse(
    b: Tensor | None, grad_b: Tensor | None, inputs: GradInputs
) -> tuple[Tensor | None, Tensor | None]:
    """``(b, grad_b)`` for a KL backward; ``(None, None)`` after zeroing ``grad_b`` when no lse of Q was saved,
    since then nothing flows to ``b`` (as in the eager path)."""
    if b is None or inputs.lse_b is not None:
        return b, grad_b
    if grad_b is not None:
        grad_b.zero_()
    return None, None


def check_impl(impl: object) -> None:
    """Raise ``ValueError`` for an unknown ``impl``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


__all__ = [
    "ENTRIES",
    "IMPLS",
    "GradInputs",
    "Impl",
    "Kernels",
    "check_impl",
    "drop_b_without_lse",
    "row_major",
    "scaled",
]
