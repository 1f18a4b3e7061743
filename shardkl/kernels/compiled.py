"""The engine's chunk math through ``torch.compile`` (inductor): the eager functions of ``shardkl._stats``,
fused into a few loops that read each input element from memory once per pass.

The temperature travels as a 0-d tensor and the shapes are dynamic, so one graph serves every chunk shape
and temperature; a new graph is built only per input dtype and per set of present arguments (a handful).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from shardkl import _stats


def _leaf(a: Tensor, b: Tensor | None, inv_t: Tensor, dtype: torch.dtype) -> Tensor:
    return _stats.leaf_stats(a.to(dtype) * inv_t, None if b is None else b.to(dtype) * inv_t)


def _grads(
    a: Tensor,
    b: Tensor | None,
    inv_t: Tensor,
    dtype: torch.dtype,
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
    grad_a, grad_b = _stats.chunk_grads(
        a.to(dtype) * inv_t,
        None if b is None else b.to(dtype) * inv_t,
        lse_a=lse_a,
        lse_b=lse_b,
        kl=kl,
        ent=ent,
        grad_kl=grad_kl,
        grad_ent=grad_ent,
        grad_logp=grad_logp,
        grad_logq=grad_logq,
        token_cols=token_cols,
    )
    return grad_a * inv_t, None if grad_b is None else grad_b * inv_t


@functools.cache
def _compiled() -> tuple[Any, Any]:
    # dynamic shapes: one graph for every chunk shape (rows and columns vary between chunks and calls)
    return torch.compile(_leaf, dynamic=True), torch.compile(_grads, dynamic=True)


def _inv_t(temperature: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(1.0 / temperature, dtype=dtype, device=device)


def leaf(a: Tensor, b: Tensor | None, temperature: float, dtype: torch.dtype) -> Tensor:
    """Leaf stats of one raw chunk, compiled."""
    return _compiled()[0](a, b, _inv_t(temperature, dtype, a.device), dtype)


def grads(
    a: Tensor, b: Tensor | None, temperature: float, dtype: torch.dtype, **saved: Any
) -> tuple[Tensor, Tensor | None]:
    """Gradients of one raw chunk with respect to the raw logits (``1/T`` applied), compiled."""
    return _compiled()[1](
        a,
        b,
        _inv_t(temperature, dtype, a.device),
        dtype,
        saved["lse_a"],
        saved["lse_b"],
        saved["kl"],
        saved["ent"],
        saved["grad_kl"],
        saved["grad_ent"],
        saved["grad_logp"],
        saved["grad_logq"],
        saved["token_cols"],
    )


def kernels() -> Any:
    """The compiled :class:`shardkl.kernels.Kernels`; raises if ``torch.compile`` cannot be used here."""
    from shardkl.kernels import Kernels

    if not hasattr(torch, "compile"):
        raise RuntimeError("this torch has no torch.compile")
    return Kernels("compiled", leaf, grads)
