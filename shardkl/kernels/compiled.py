"""The engine's chunk math through ``torch.compile`` (inductor): the eager functions of ``shardkl._stats``,
fused into a few loops that read each input element from memory once per pass.

Only the number of rows is dynamic: inductor does not vectorise a reduction over a dynamic vocabulary width on
CPU (measured 3-9x slower), so each vocabulary chunk width, input dtype and set of present arguments is its own
graph (a handful in practice). The temperature travels as a 0-d tensor, so it never causes a recompile.
Dynamo's default limit of 8 graphs per function would silently run later ones uncompiled; the limit is raised
and hitting it raises (``impl="auto"`` then falls back to eager with its one warning).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from shardkl import _stats
from shardkl.kernels import GradInputs, Kernels, eager


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


_LIMITS: dict[str, Any] = {"recompile_limit": 128, "fail_on_recompile_limit_hit": True}


@functools.cache
def _compiled() -> tuple[Any, Any]:
    return torch.compile(_leaf, dynamic=False), torch.compile(_grads, dynamic=False)


def _rows_dynamic(*tensors: Tensor | None) -> None:
    for t in tensors:
        if t is not None:
            # the row count varies between chunks and calls; maybe_: a 1-row chunk is specialised, not an error
            torch._dynamo.maybe_mark_dynamic(t, 0)


def _inv_t(temperature: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(1.0 / temperature, dtype=dtype, device=device)


def leaf(a: Tensor, b: Tensor | None, temperature: float, dtype: torch.dtype) -> Tensor:
    """Leaf stats of one raw tile, compiled."""
    # detached: requires_grad would be one more guard, and one more graph, per family
    a, b = a.detach(), None if b is None else b.detach()
    _rows_dynamic(a, b)
    with torch._dynamo.config.patch(_LIMITS):
        return _compiled()[0](a, b, _inv_t(temperature, dtype, a.device), dtype)


def tile_grads(
    a: Tensor, b: Tensor | None, temperature: float, dtype: torch.dtype, inputs: GradInputs
) -> tuple[Tensor, Tensor | None]:
    """Gradients of one raw tile with respect to the raw logits (``1/T`` applied), compiled."""
    a, b = a.detach(), None if b is None else b.detach()
    _rows_dynamic(a, b, *inputs)
    with torch._dynamo.config.patch(_LIMITS):
        return _compiled()[1](a, b, _inv_t(temperature, dtype, a.device), dtype, *inputs)


def stats(a: Tensor, b: Tensor | None, *, temperature: float, dtype: torch.dtype, entropy: bool = True) -> Tensor:
    """Stats of a ``[rows, V_local]`` block (see :class:`shardkl.kernels.Kernels`)."""
    return eager.tiled_stats(leaf, a, b, temperature=temperature, dtype=dtype)


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
    eager.tiled_grads(tile_grads, a, b, temperature=temperature, dtype=dtype, inputs=inputs, grad_a=grad_a,
                      grad_b=grad_b)


def kernels() -> Kernels:
    """The compiled :class:`shardkl.kernels.Kernels`; raises if ``torch.compile`` cannot be used here."""
    if not hasattr(torch, "compile"):
        raise RuntimeError("this torch has no torch.compile")
    return Kernels("compiled", stats, grads)
