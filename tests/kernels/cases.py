"""Inputs shared by the kernel tests: awkward shapes, a padded tail, underflows and the edge rows of every impl."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import shardkl
from shardkl import _stats, kernels
from shardkl.kernels import eager
from tests.reference import reference


def case(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, b, tokens)``: Q close to P, a padded ``-inf`` tail, P underflowing to 0 where Q has mass."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g) * 2
    b = a + 0.3 * torch.randn(*shape, generator=g)
    a[:, -3:] = float("-inf")  # a padded tail
    b[:, -3:] = float("-inf")
    a[0, 5] = -200.0  # P underflows to 0 where Q has mass
    if shape[0] > 1 and shape[1] > 140:
        a[1, 100:140] = -300.0  # a run of such columns
    tokens = torch.randint(0, shape[-1] - 3, shape[:-1], generator=g)
    return a.to(dtype), b.to(dtype), tokens


def dtype_extremes(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, b, tokens)``: ``[5, 50]`` logits in ``dtype`` with rows at the dtype's limits, and tokens P can sample."""
    info = torch.finfo(dtype)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 50, generator=g) * 3
    b = torch.randn(5, 50, generator=g) * 3
    a[0, :10], b[0, -10:] = info.max, info.max  # P and Q concentrated on disjoint extreme columns
    a[1], b[1] = info.max, info.min  # uniform P, Q uniform too (all columns at the same extreme)
    a[2, ::2], b[2] = info.min, info.max
    a[3, 7], b[3, 7] = info.max, info.max
    tokens = torch.tensor([0, 1, 1, 7, 4])  # tokens P can sample (P(x) > 0), as for any on-policy estimator
    return a.to(dtype), b.to(dtype), tokens


def edge_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 2.. of a copy: all -inf, a NaN, a +inf, Q = 0 where P > 0, Q without mass, P without mass."""
    a, b = a.clone(), b.clone()
    a[2] = float("-inf")
    b[2] = float("-inf")
    a[3, 7] = float("nan")
    a[4, 9] = float("inf")
    if a.shape[0] > 5:
        b[5, 11] = float("-inf")
    if a.shape[0] > 7:
        b[6] = float("-inf")
        a[7] = float("-inf")
    return a, b


def check_edge_rows(stats: torch.Tensor, two_inputs: bool) -> None:
    """The stats of :func:`edge_rows`' rows are what the engine expects."""
    assert stats[_stats.LA, 2] == float("-inf") and stats[_stats.ENT, 2] == 0
    assert stats[_stats.LA, 3].isnan() and stats[_stats.LA, 4] == float("inf")
    assert torch.isfinite(stats[:, [0, 1]]).all()
    if two_inputs and stats.shape[1] > 5:
        assert stats[_stats.KL, 5] == float("inf")
    if two_inputs and stats.shape[1] > 7:
        assert stats[_stats.LB, 6] == float("-inf") and stats[_stats.KL, 6] == float("inf")
        # P without mass: the leaf's KL is Q's share (1), a merged row's the masked-row convention (0)
        assert stats[_stats.LA, 7] == float("-inf") and 0 <= stats[_stats.KL, 7] <= 1 + 1e-6


def saved(
    a: torch.Tensor, b: torch.Tensor | None, tokens: torch.Tensor, temperature: float, present: str, seed: int = 2
) -> kernels.GradInputs:
    """Backward inputs from the eager forward of one block; ``present`` picks the incoming gradients: k(l), e(nt),
    p (log P), q (log Q), t(okens, every other row's token in another chunk)."""
    f32 = torch.float32
    scaled_b = None if b is None else kernels.scaled(b, f32, temperature)
    stats = _stats.leaf_stats(kernels.scaled(a, f32, temperature), scaled_b)
    rows = a.shape[0]
    g = torch.Generator().manual_seed(seed)

    def grad(flag: str) -> torch.Tensor | None:
        return torch.randn(rows, generator=g) if flag in present else None

    token_cols = tokens.clone()
    token_cols[::2] = -1
    return kernels.GradInputs(
        lse_a=stats[_stats.LA],
        lse_b=None if b is None else stats[_stats.LB],
        kl=None if b is None else stats[_stats.KL],
        ent=stats[_stats.ENT],
        grad_kl=None if b is None else grad("k"),
        grad_ent=grad("e"),
        grad_logp=grad("p"),
        grad_logq=None if b is None else grad("q"),
        token_cols=token_cols if "t" in present else None,
    )


def check_kl_grads_against_eager(
    kl_grads: Callable[..., None],
    shape: tuple[int, int],
    dtype: torch.dtype,
    temperature: float,
    present: str,
    two_inputs: bool,
    **options: Any,
) -> None:
    """An implementation's ``kl_grads`` (``options``: its own keywords, e.g. a tile size) against the eager one on the
    same backward inputs (:func:`saved`)."""
    a, b, tokens = case(shape, dtype)
    bb = b if two_inputs else None
    inputs = saved(a, bb, tokens, temperature, present)
    f32 = torch.float32
    got_a, got_b = torch.empty_like(a), torch.empty_like(b)
    kl_grads(a, bb, temperature=temperature, dtype=f32, inputs=inputs, grad_a=got_a,
             grad_b=got_b if two_inputs else None, **options)
    want_a, want_b = torch.empty_like(a), torch.empty_like(b)
    eager.kl_grads(a, bb, temperature=temperature, dtype=f32, inputs=inputs, grad_a=want_a, grad_b=want_b)
    tol = 1e-5 if dtype == f32 else 1e-2
    torch.testing.assert_close(got_a, want_a, rtol=tol, atol=tol * 0.02)
    if two_inputs:
        torch.testing.assert_close(got_b, want_b, rtol=tol, atol=tol * 0.02)


def tiny_kl_inputs(eps: float, *, tokens: int = 64, vocab: int = 152_064, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """fp32 ``a`` and ``b = a + eps * noise + 3`` (true KL ~ eps^2 / 2), and the float64 KL of those fp32 values."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(tokens, vocab, generator=g, dtype=torch.float64)
    b = a + eps * torch.randn(tokens, vocab, generator=g, dtype=torch.float64) + 3
    a32, b32 = a.float(), b.float()
    a64, b64 = a32.double(), b32.double()
    want = (torch.softmax(a64, -1) * (torch.log_softmax(a64, -1) - torch.log_softmax(b64, -1))).sum(-1)
    return a32, b32, want


# (true KL per token, eps, worst relative error allowed): the README's bounds for the eager path
TINY_KL_BOUNDS = [(5e-3, 1e-1, 4.5e-6), (5e-5, 1e-2, 2.1e-5), (5e-7, 1e-3, 2e-4), (5e-9, 1e-4, 6e-3)]


def check_public_api_against_eager(impl: str, shape: tuple[int, int], dtype: torch.dtype, temperature: float) -> None:
    """``kl_stats`` with ``impl`` gives eager's values and gradients, and float64's exact KL (on a :func:`case`)."""
    a, b, tokens = case(shape, dtype)
    results = {}
    for name in ("eager", impl):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        stats = shardkl.kl_stats(x, y, tokens, temperature=temperature, options=shardkl.Options(impl=name))
        (stats.exact_kl.sum() + 0.3 * stats.entropy.sum() + stats.k3.sum() + stats.p_logprobs.sum()).backward()
        results[name] = (stats, x.grad, y.grad)
    (s_e, ga_e, gb_e), (s_i, ga_i, gb_i) = results["eager"], results[impl]
    for name in ("exact_kl", "entropy", "p_logprobs", "q_logprobs", "k3"):
        torch.testing.assert_close(getattr(s_i, name), getattr(s_e, name), rtol=1e-5, atol=1e-6, msg=name)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ga_i, ga_e, rtol=tol, atol=tol * 0.2)
    torch.testing.assert_close(gb_i, gb_e, rtol=tol, atol=tol * 0.2)
    ref = reference(a[..., :-3], b[..., :-3], tokens, temperature)["exact_kl"]
    torch.testing.assert_close(s_i.exact_kl.double(), ref, rtol=1e-5, atol=1e-6)
