"""Tiny-KL accuracy of every CPU implementation against float64 (the Triton kernels: test_triton_kl.py).

RL starts with policy = reference, so per-token KL values of 1e-7 are the common case; the bound is the README's
(fp32, V = 152,064, 64 tokens, b = a + eps * noise + 3), and no value may be negative.
"""

from __future__ import annotations

import pytest
import torch

import shardkl
from shardkl.kernels import compiled
from tests.kernels.cases import TINY_KL_BOUNDS, tiny_kl_inputs


def _compiled_graphs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return compiled.kl_stats(a, b, temperature=1.0, dtype=torch.float32)[3]


IMPLS = {
    "eager": lambda a, b: shardkl.exact_kl(a, b, options=shardkl.Options(impl="eager")),
    # on CPU: the C++ kernels
    "compiled": lambda a, b: shardkl.exact_kl(a, b, options=shardkl.Options(impl="compiled")),
    "compiled graphs": _compiled_graphs,
}


@pytest.mark.parametrize(("true_kl", "eps", "bound"), TINY_KL_BOUNDS)
def test_tiny_kl_is_accurate_and_never_negative(true_kl, eps, bound) -> None:
    a, b, want = tiny_kl_inputs(eps)
    assert ((want / true_kl - 1).abs() < 0.5).all()  # the inputs are what the bound is about
    for name, impl in IMPLS.items():
        got = impl(a, b).double()
        assert (got > 0).all(), name
        worst = ((got - want).abs() / want).max().item()
        assert worst < bound, f"{name}: worst relative error {worst:.2e} at KL {true_kl:g} (bound {bound:g})"


def test_identical_inputs_give_exactly_zero() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(16, 40_000, generator=g) * 3
    a[:, :5] = float("-inf")
    for name, impl in IMPLS.items():
        assert (impl(a, a.clone()) == 0).all(), name
