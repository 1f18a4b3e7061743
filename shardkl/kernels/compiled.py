"""``torch.compile`` graphs of the engine's math (:mod:`shardkl._stats`): ``impl="compiled"`` on CUDA, and on CPU
for float64 or where the C++ kernels of :mod:`shardkl.kernels.cpu` cannot be built.

Tiling: a block is cut into row blocks of about ``GRAPH_ELEMENTS`` logits per input (so the dispatch and guard
cost of a compiled call is paid per row block, 32 calls for 2048 x 32k, not per 8-row tile, while inductor's
temporaries stay a few MiB), with vocabulary chunks of at most ``eager.MAX_VOCAB_CHUNK`` columns merged by the
stats monoid. Graph variants compute only what the call needs: one or two inputs, the entropy row only when it is
asked for, and in the backward only the incoming gradients that are present.

Only the number of rows is dynamic: inductor does not vectorise a reduction over a dynamic vocabulary width on
CPU (measured 3-9x slower), so each vocabulary chunk width, input dtype and variant is its own graph (a handful in
practice). The temperature travels as a 0-d tensor, so it never causes a recompile. Dynamo's default limit of 8
graphs per function would silently run later ones uncompiled; the limit is raised and hitting it raises.

Numerics: inductor's vectorised CPU ``expm1`` is ``exp(x) - 1``, which loses every digit of a tiny KL (92% error
at KL = 5e-9), so the graphs take the KL integrand from :func:`shardkl._stats.kl_gap_series`.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor

from shardkl import _stats
from shardkl.kernels import GradInputs, Kernels, eager

# Logits per input in one compiled call (4 MiB of fp32): large enough that the per-call cost (Python, guards,
# thread fork/join) is small next to the work, small enough that inductor's temporaries stay cache-sized
# (2^26 was 2x slower than 2^20 in the measurements).
GRAPH_ELEMENTS = 1 << 20


def _leaf(a: Tensor, b: Tensor | None, inv_t: Tensor, dtype: torch.dtype, entropy: bool) -> Tensor:
    return _stats.leaf_stats(
        a.to(dtype) * inv_t, None if b is None else b.to(dtype) * inv_t, entropy=entropy, gap=_stats.kl_gap_series
    )


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
            # the row count varies between blocks and calls; maybe_: a 1-row block is specialised, not an error
            torch._dynamo.maybe_mark_dynamic(t, 0)


def _inv_t(temperature: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(1.0 / temperature, dtype=dtype, device=device)


def family(a: Tensor, b: Tensor | None) -> Hashable:
    """The calls that share compiled graphs (for :class:`shardkl.kernels.Fallback`): device, dtypes, width."""
    return (a.device, a.dtype, None if b is None else b.dtype, a.shape[-1], min(a.shape[0], 2))


def stats(a: Tensor, b: Tensor | None, *, temperature: float, dtype: torch.dtype, entropy: bool = True) -> Tensor:
    """Stats of a ``[rows, V_local]`` block (see :class:`shardkl.kernels.Kernels`)."""
    inv_t = _inv_t(temperature, dtype, a.device)
    # detached: requires_grad would be one more guard, and one more graph, per family
    a, b = a.detach(), None if b is None else b.detach()

    def leaf(x: Tensor, y: Tensor | None, temperature: float, dtype: torch.dtype) -> Tensor:
        _rows_dynamic(x, y)
        with torch._dynamo.config.patch(_LIMITS):
            return _compiled()[0](x, y, inv_t, dtype, entropy)  # type: ignore[no-any-return]

    return eager.tiled_stats(leaf, a, b, temperature=temperature, dtype=dtype, elements=GRAPH_ELEMENTS)


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
    inv_t = _inv_t(temperature, dtype, a.device)
    a, b = a.detach(), None if b is None else b.detach()

    def tile_grads(
        x: Tensor, y: Tensor | None, temperature: float, dtype: torch.dtype, row_inputs: GradInputs
    ) -> tuple[Tensor, Tensor | None]:
        _rows_dynamic(x, y, *row_inputs)
        with torch._dynamo.config.patch(_LIMITS):
            return _compiled()[1](x, y, inv_t, dtype, *row_inputs)  # type: ignore[no-any-return]

    eager.tiled_grads(tile_grads, a, b, temperature=temperature, dtype=dtype, inputs=inputs, grad_a=grad_a,
                      grad_b=grad_b, elements=GRAPH_ELEMENTS)


def kernels() -> Kernels:
    """The compiled-graph :class:`shardkl.kernels.Kernels`; raises if ``torch.compile`` cannot be used here."""
    if not hasattr(torch, "compile"):
        raise RuntimeError("this torch has no torch.compile")
    return Kernels("compiled", stats, grads)


__all__ = ["GRAPH_ELEMENTS", "family", "grads", "kernels", "stats"]
