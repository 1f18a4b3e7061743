"""Tensor-parallel building blocks a trainer needs around shardkl: a column-parallel output layer.

The layout is Megatron's for the output layer: the transformer trunk is replicated on every rank of the
tensor-parallel group, and the ``lm_head`` is split by vocabulary rows of its weight, padded so the vocabulary
divides evenly, so each rank produces only its ``[..., V_padded / world]`` slice of the logits.

:class:`CopyToTensorParallelRegion` is Megatron's ``copy_to_tensor_model_parallel_region``: the identity in forward,
and in backward the sum over the group of the hidden states' gradient (each rank's slice of the head only sees its
part of ∂loss/∂h). ``group=None`` runs the same code on one process with the full vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from shardkl.distributed import ProcessGroup, all_reduce_sum, rank_and_size
from shardkl.layout import VocabLayout
from shardkl.linear import LinearLogits


def padded_vocab_size(vocab_size: int, world_size: int, multiple: int = 8) -> int:
    """Megatron's padding: the smallest size ``>= vocab_size`` divisible by ``multiple * world_size``."""
    step = multiple * world_size
    return -(-vocab_size // step) * step


class CopyToTensorParallelRegion(torch.autograd.Function):
    """Identity in forward; sums the gradient over the group in backward (Megatron's ``f`` operator)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # each rank's slice of the head contributes part of dloss/dh
        return all_reduce_sum(grad, ctx.group), None


def copy_to_tensor_parallel_region(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """``x`` itself in forward; in backward, its gradient summed over ``group``.

    Put it where hidden states replicated over the vocabulary group enter this rank's slice of the output layer,
    e.g. before :class:`shardkl.LinearLogits`: each rank's gradient of ``hidden`` is a partial sum over its vocabulary
    rows, and this sum makes it the full gradient on every rank.
    """
    return CopyToTensorParallelRegion.apply(x, group)


class ColumnParallelLMHead(nn.Module):
    """This rank's rows of an output layer: ``hidden [..., H] -> logits [..., V_padded / world]``.

    Rank ``r`` holds global vocabulary ids ``[r * V_local, (r + 1) * V_local)`` (Megatron's equal split, recorded in
    ``self.layout``, a :class:`shardkl.VocabLayout` to pass to shardkl as ``layout=``); ids at or beyond
    ``valid_vocab_size`` are zero padding rows.

    Args:
        weight: this rank's ``[V_local, H]`` slice (padding rows included).
        valid_vocab_size: the real vocabulary size.
        group: tensor-parallel group (``None``: one process holds the whole vocabulary).
    """

    def __init__(self, weight: Tensor, *, valid_vocab_size: int, group: ProcessGroup | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.valid_vocab_size = valid_vocab_size
        self.group = group
        self.layout = VocabLayout.equal(weight.shape[0], group, valid_vocab_size=valid_vocab_size)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, group: ProcessGroup | None, pad_multiple: int = 8
    ) -> ColumnParallelLMHead:
        """Split a full ``nn.Linear(H, V, bias=False)`` head; every rank must pass the same weights."""
        if linear.bias is not None:
            raise ValueError("ColumnParallelLMHead supports heads without bias (as in Llama), got a bias")
        vocab, hidden = linear.weight.shape
        _, world = rank_and_size(group)
        padded = padded_vocab_size(vocab, world, pad_multiple)
        layout = VocabLayout.split(padded, group, "equal", valid_vocab_size=vocab)
        weight = torch.zeros(layout.local_size, hidden, dtype=linear.weight.dtype, device=linear.weight.device)
        weight[: layout.kept_size] = linear.weight.detach()[layout.start : layout.start + layout.kept_size]
        return cls(weight, valid_vocab_size=vocab, group=group)

    def forward(self, hidden: Tensor) -> Tensor:
        """This rank's logits ``[..., V_local]`` (padding columns included)."""
        return nn.functional.linear(copy_to_tensor_parallel_region(hidden, self.group), self.weight)

    def linear_logits(self, hidden: Tensor) -> LinearLogits:
        """This rank's logits as a :class:`shardkl.LinearLogits`, for shardkl to reduce without materialising them;
        pass ``layout=self.layout`` with it. ``hidden``'s gradient is summed over the group, as in :meth:`forward`."""
        return LinearLogits(copy_to_tensor_parallel_region(hidden, self.group), self.weight, hidden_grad="partial")


__all__ = ["ColumnParallelLMHead", "CopyToTensorParallelRegion", "copy_to_tensor_parallel_region", "padded_vocab_size"]
