"""Aggregation modes of RL trainers in ``shardkl.reduction``."""

from __future__ import annotations

import pytest
import torch

import shardkl


def test_seq_mean_token_sum_norm_divides_by_the_horizon() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    got = shardkl.reduce_tokens(values, mask, reduction="seq_mean_token_sum_norm")
    # verl: sum(seq token sums) / mask.shape[-1]
    assert got.item() == pytest.approx((3.0 + 18.0) / 4)
    # a constant divisor: doubling one sequence's length doubles its weight (no per-length normalisation)
    longer = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert shardkl.reduce_tokens(values, longer, reduction="seq_mean_token_sum_norm").item() == pytest.approx(
        (10.0 + 18.0) / 4
    )
    assert shardkl.reduce_tokens(values, reduction="seq_mean_token_sum_norm").item() == pytest.approx(36 / 4)
    assert "seq_mean_token_sum_norm" in shardkl.REDUCTIONS


def test_seq_mean_token_sum_norm_gradient() -> None:
    values = torch.randn(3, 5, requires_grad=True)
    mask = torch.rand(3, 5) > 0.4
    shardkl.reduce_tokens(values, mask, reduction="seq_mean_token_sum_norm").backward()
    torch.testing.assert_close(values.grad, mask.float() / 5)
