"""The torch.compile graphs (CUDA, and the CPU fallback) give the eager kernels' values and gradients."""

from __future__ import annotations

import pytest
import torch

from shardkl import _stats
from shardkl.kernels import compiled, eager
from tests.kernels.cases import case, check_edge_rows, edge_rows, saved

F32 = torch.float32


@pytest.mark.parametrize(("shape", "dtype", "temperature"), [((9, 1271), F32, 1.0), ((7, 300), torch.bfloat16, 0.7)])
@pytest.mark.parametrize("two_inputs", [True, False])
def test_stats_match_eager(shape, dtype, temperature, two_inputs) -> None:
    a, b, _ = case(shape, dtype)
    a, b = edge_rows(a, b)
    bb = b if two_inputs else None
    got = compiled.kl_stats(a, bb, temperature=temperature, dtype=F32)
    torch.testing.assert_close(got, eager.kl_stats(a, bb, temperature=temperature, dtype=F32), rtol=1e-5, atol=1e-6,
                               equal_nan=True)
    check_edge_rows(got, two_inputs)


def test_row_blocks_and_the_graph_without_entropy(monkeypatch) -> None:
    monkeypatch.setattr(compiled, "GRAPH_ELEMENTS", 3 * 1000)  # 3-row blocks and a 1-row tail
    a, b, _ = case((10, 1000), F32)
    want = eager.kl_stats(a, b, temperature=1.0, dtype=F32)
    torch.testing.assert_close(compiled.kl_stats(a, b, temperature=1.0, dtype=F32), want, rtol=1e-5, atol=1e-6)
    got = compiled.kl_stats(a, b, temperature=1.0, dtype=F32, entropy=False)
    assert (got[_stats.ENT] == 0).all()
    rows = [_stats.LA, _stats.LB, _stats.KL]
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-5, atol=1e-6)


def test_float64_compute() -> None:
    a, b, _ = case((5, 400), torch.float64)
    got = compiled.kl_stats(a, b, temperature=0.7, dtype=torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, eager.kl_stats(a, b, temperature=0.7, dtype=torch.float64))


@pytest.mark.parametrize(("present", "two_inputs"), [("kepqt", True), ("ept", False)])
def test_grads_match_eager(present, two_inputs) -> None:
    a, b, tokens = case((6, 300), F32)
    bb = b if two_inputs else None
    inputs = saved(a, bb, tokens, 0.7, present)
    got_a, got_b = torch.empty_like(a), torch.empty_like(b)
    compiled.kl_grads(a, bb, temperature=0.7, dtype=F32, inputs=inputs, grad_a=got_a, grad_b=got_b)
    want_a, want_b = torch.empty_like(a), torch.empty_like(b)
    eager.kl_grads(a, bb, temperature=0.7, dtype=F32, inputs=inputs, grad_a=want_a, grad_b=want_b)
    torch.testing.assert_close(got_a, want_a, rtol=1e-5, atol=2e-7)
    if two_inputs:
        torch.testing.assert_close(got_b, want_b, rtol=1e-5, atol=2e-7)
