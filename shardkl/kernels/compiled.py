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
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from shardkl import _divergences, _stats
from shardkl.kernels import GradInputs, Kernels, eager

# Logits per input in one compiled call (4 MiB of fp32): large enough that the per-call cost (Python, guards,
# thread fork/join) is small next to the work, small enough that inductor's temporaries stay cache-sized
# (2^26 was 2x slower than 2^20 in the measurements).
GRAPH_ELEMENTS = 1 << 20


def _leaf(a: Tensor, b: Tensor | None, inv_t: Tensor, dtype: torch.dtype, entropy: bool, kl: bool) -> Tensor:
    return _stats.leaf_stats(
        a.to(dtype) * inv_t, None if b is None else b.to(dtype) * inv_t, entropy=entropy, kl=kl,
        gap=_stats.kl_gap_series,
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


def _jsd_terms(a: Tensor, b: Tensor, inv_t: Tensor, dtype: torch.dtype, lse_a: Tensor, lse_b: Tensor,
               beta: float) -> Tensor:
    return _divergences.jsd_tile_terms(a.to(dtype) * inv_t, b.to(dtype) * inv_t, lse_a, lse_b, beta)


def _jsd_grads(a: Tensor, b: Tensor, inv_t: Tensor, dtype: torch.dtype, lse_a: Tensor, lse_b: Tensor, kl_pm: Tensor,
               kl_qm: Tensor, grad: Tensor, beta: float, need_a: bool, need_b: bool) -> tuple[Tensor | None, ...]:
    ga, gb = _divergences.jsd_tile_grads(
        a.to(dtype) * inv_t, b.to(dtype) * inv_t, lse_a, lse_b, kl_pm, kl_qm, beta, grad, need_a=need_a,
        need_b=need_b,
    )
    return None if ga is None else ga * inv_t, None if gb is None else gb * inv_t


def _topk_stats(s: Tensor, inv_t: Tensor, dtype: torch.dtype, ids: Tensor) -> Tensor:
    return _divergences.topk_tile_stats(s.to(dtype) * inv_t, ids)


def _topk_grads(s: Tensor, inv_t: Tensor, dtype: torch.dtype, ids: Tensor, lse_excl: Tensor, tail_coef: Tensor,
                id_coef: Tensor) -> Tensor:
    return _divergences.topk_tile_grads(s.to(dtype) * inv_t, ids, lse_excl, tail_coef, id_coef) * inv_t


_LIMITS: dict[str, Any] = {"recompile_limit": 128, "fail_on_recompile_limit_hit": True}


@functools.cache
def _graph(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, dynamic=False)  # type: ignore[no-any-return]


def _run(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn`` compiled, on ``args``, with every tensor's rows dynamic."""
    for t in args:
        if isinstance(t, Tensor) and t.dim():
            # the row count varies between blocks and calls; maybe_: a 1-row block is specialised, not an error
            torch._dynamo.maybe_mark_dynamic(t, 0)
    with torch._dynamo.config.patch(_LIMITS):
        return _graph(fn)(*args)


def _inv_t(temperature: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(1.0 / temperature, dtype=dtype, device=device)


def _detached(x: Tensor | None) -> Tensor | None:
    # requires_grad would be one more guard, and one more graph, per family
    return None if x is None else x.detach()


def family(a: Tensor, b: Tensor | None) -> Hashable:
    """The calls that share compiled graphs (for :class:`shardkl._dispatch.Fallback`): device, dtypes, width."""
    return (a.device, a.dtype, None if b is None else b.dtype, a.shape[-1], min(a.shape[0], 2))


def kl_stats(
    a: Tensor, b: Tensor | None, *, temperature: float, dtype: torch.dtype, entropy: bool = True, kl: bool = True
) -> Tensor:
    """KL stats of a ``[rows, cols]`` block (see :func:`shardkl.kernels.eager.kl_stats`)."""
    inv_t = _inv_t(temperature, dtype, a.device)

    def leaf(x: Tensor, y: Tensor | None, temperature: float, dtype: torch.dtype) -> Tensor:
        return _run(_leaf, x, y, inv_t, dtype, entropy, kl)  # type: ignore[no-any-return]

    return eager.tiled_stats(leaf, a.detach(), _detached(b), temperature=temperature, dtype=dtype,
                             elements=GRAPH_ELEMENTS)


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
    inv_t = _inv_t(temperature, dtype, a.device)

    def tile_grads(
        x: Tensor, y: Tensor | None, temperature: float, dtype: torch.dtype, row_inputs: GradInputs
    ) -> tuple[Tensor, Tensor | None]:
        return _run(_grads, x, y, inv_t, dtype, *row_inputs)  # type: ignore[no-any-return]

    eager.tiled_grads(tile_grads, a.detach(), _detached(b), temperature=temperature, dtype=dtype, inputs=inputs,
                      grad_a=grad_a, grad_b=grad_b, elements=GRAPH_ELEMENTS)


def jsd_terms(
    a: Tensor, b: Tensor, *, temperature: float, dtype: torch.dtype, lse_a: Tensor, lse_b: Tensor, beta: float
) -> Tensor:
    """JSD terms of a ``[rows, cols]`` block (see :func:`shardkl.kernels.eager.jsd_terms`)."""
    inv_t = _inv_t(temperature, dtype, a.device)
    a, b = a.detach(), b.detach()
    return eager.tiled_sum(
        lambda rs, cs: _run(_jsd_terms, a[rs, cs], b[rs, cs], inv_t, dtype, lse_a[rs], lse_b[rs], beta),
        a.shape[0], a.shape[1], 2, a.device, GRAPH_ELEMENTS,
    )


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
    """JSD gradients of a ``[rows, cols]`` block (see :func:`shardkl.kernels.eager.jsd_grads`)."""
    inv_t = _inv_t(temperature, dtype, a.device)
    a, b = a.detach(), b.detach()
    for rs, col_slices in eager.tiles(a.shape[0], a.shape[1], GRAPH_ELEMENTS):
        for cs in col_slices:
            ga, gb = _run(_jsd_grads, a[rs, cs], b[rs, cs], inv_t, dtype, lse_a[rs], lse_b[rs], kl_pm[rs],
                          kl_qm[rs], grad[rs], beta, grad_a is not None, grad_b is not None)
            if grad_a is not None:
                grad_a[rs, cs] = ga
            if grad_b is not None:
                grad_b[rs, cs] = gb


def topk_stats(s: Tensor, *, temperature: float, dtype: torch.dtype, ids: Tensor) -> Tensor:
    """Top-k log-sum-exps of a ``[rows, cols]`` block (see :func:`shardkl.kernels.eager.topk_stats`)."""
    inv_t = _inv_t(temperature, dtype, s.device)
    s = s.detach()
    out = torch.full((2, s.shape[0]), float("-inf"), dtype=torch.float64, device=s.device)
    for rs, col_slices in eager.tiles(s.shape[0], s.shape[1], GRAPH_ELEMENTS):
        for cs in col_slices:
            out[:, rs] = torch.logaddexp(out[:, rs], _run(_topk_stats, s[rs, cs], inv_t, dtype, ids[rs] - cs.start))
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
    """Top-k gradients of a ``[rows, cols]`` block (see :func:`shardkl.kernels.eager.topk_grads`)."""
    inv_t = _inv_t(temperature, dtype, s.device)
    s = s.detach()
    for rs, col_slices in eager.tiles(s.shape[0], s.shape[1], GRAPH_ELEMENTS):
        for cs in col_slices:
            grad_s[rs, cs] = _run(_topk_grads, s[rs, cs], inv_t, dtype, ids[rs] - cs.start, lse_excl[rs],
                                  tail_coef[rs], id_coef[rs])


def kernels() -> Kernels:
    """The compiled-graph :class:`shardkl.kernels.Kernels`; raises if ``torch.compile`` cannot be used here."""
    if not hasattr(torch, "compile"):
        raise RuntimeError("this torch has no torch.compile")
    return Kernels("compiled", kl_stats, kl_grads, jsd_terms, jsd_grads, topk_stats, topk_grads)


__all__ = ["GRAPH_ELEMENTS", "family", "jsd_grads", "jsd_terms", "kernels", "kl_grads", "kl_stats", "topk_grads",
           "topk_stats"]
