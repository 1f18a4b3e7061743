"""Logits given by their linear layer instead of as a tensor: ``hidden @ weight.T (+ bias)``.

A :class:`LinearLogits` stands wherever shardkl takes logits. The engine then never materialises the
``[N, V_local]`` logits: it asks for one ``[rows, C]`` tile at a time (a matmul), reduces it to per-token stats and
drops it; backward recomputes each tile and turns its logit gradient into ``grad_hidden``, ``grad_weight`` and
``grad_bias`` with two more matmuls.

Tensor-parallel semantics: ``hidden`` holds the full rows, replicated over the vocabulary group; ``weight`` holds
this rank's rows of the output layer (``[V_local, H]``). Each rank's gradient of ``hidden`` is then its partial sum
over its vocabulary rows, and the caller says which gradient it wants (``hidden_grad``) whenever ``hidden`` requires
grad under a group of more than one rank:

- ``"partial"``: that partial sum, exactly what a column-parallel layer's input gradient always is; the layer that
  replicated ``hidden`` sums it over the group in backward (Megatron's ``copy_to_tensor_model_parallel_region``,
  :func:`shardkl.parallel.copy_to_tensor_parallel_region`, or a DTensor ``Partial`` gradient);
- ``"full"``: shardkl sums it over the group in backward (one all-reduce of ``[N, H]``, the only collective of a
  backward), so every rank gets the gradient one process would compute.

Unsaid, such a call raises ``ValueError`` naming both: a partial gradient taken for the full one is a silent error
of the size of the gradient itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

HiddenGrad = Literal["partial", "full"]
HIDDEN_GRADS: tuple[str, ...] = get_args(HiddenGrad)


@dataclass(frozen=True)
class LinearLogits:
    """The logits ``hidden @ weight.T (+ bias)`` of one policy, never materialised.

    Args:
        hidden: ``[..., H]`` hidden states (after the final norm), the same on every rank of the vocabulary group.
        weight: ``[V_local, H]`` this rank's rows of the output layer (``lm_head``), or a DTensor sharded
            ``Shard(0)`` on the vocabulary mesh dimension (then ``hidden`` is a DTensor too, replicated there).
        bias: ``[V_local]`` this rank's entries of the output bias, or ``None``.
        hidden_grad: under a group of more than one rank with ``hidden`` requiring grad, which gradient of
            ``hidden`` to return: ``"partial"`` (this rank's partial sum over its vocabulary rows; the caller sums it
            over the group, as a column-parallel layer's input does) or ``"full"`` (shardkl all-reduces it in
            backward). Ignored on one rank and for DTensors (whose ``Partial`` gradient says it).

    Example:
        >>> # student and teacher may have different hidden sizes, never a different vocabulary layout
        >>> kl = shardkl.exact_kl(
        ...     shardkl.LinearLogits(student_hidden, student_head.weight),
        ...     shardkl.LinearLogits(teacher_hidden, teacher_head.weight),
        ...     group=tp_group,
        ... )
        >>> # a trainable hidden state under tensor parallelism: say which gradient you want
        >>> shardkl.LinearLogits(hidden, head_rows, hidden_grad="full")
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    hidden_grad: HiddenGrad | None = None

    @property
    def shape(self) -> torch.Size:
        """The shape of the logits it stands for, ``[..., V_local]``."""
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    def __getitem__(self, index: object) -> LinearLogits:
        """Select tokens: ``index`` applies to the leading (token) dimensions of ``hidden``, as it would to the
        logits' leading dimensions; e.g. ``source[:, prompt_len - 1 : -1]`` for the response positions."""
        hidden = self.hidden[index]  # type: ignore[index]
        if hidden.dim() < 1 or hidden.shape[-1] != self.hidden.shape[-1]:
            raise IndexError("LinearLogits can only be indexed in its token dimensions, not in the hidden size")
        return LinearLogits(hidden, self.weight, self.bias, self.hidden_grad)


Logits = Tensor | LinearLogits
"""What every public function takes as logits: this rank's slice as a tensor, or a :class:`LinearLogits`."""


def check_linear(name: str, source: LinearLogits) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` for a malformed :class:`LinearLogits` (no collective)."""
    for part in ("hidden", "weight"):
        value = getattr(source, part)
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}.{part} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name}.{part} must have a floating dtype, got {value.dtype}")
    hidden, weight, bias = source.hidden, source.weight, source.bias
    if source.hidden_grad is not None and source.hidden_grad not in HIDDEN_GRADS:
        raise ValueError(f"{name}.hidden_grad must be one of {HIDDEN_GRADS} or None, got {source.hidden_grad!r}")
    if hidden.dim() < 1:
        raise ValueError(f"{name}.hidden must be [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{name}.weight must be [V_local, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{name}: hidden size mismatch, hidden is {tuple(hidden.shape)} (H = {hidden.shape[-1]}) but weight is "
            f"{tuple(weight.shape)} (H = {weight.shape[1]})"
        )
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"{name}.bias must be a floating-point torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{name}.bias must have one entry per weight row, ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
    devices = {hidden.device, weight.device} | ({bias.device} if bias is not None else set())
    if len(devices) > 1:
        raise ValueError(f"{name}: hidden, weight and bias must be on one device, got {sorted(map(str, devices))}")


def trimmed(source: LinearLogits, keep: int) -> LinearLogits:
    """The first ``keep`` vocabulary rows of ``source`` (views: the rest get zero gradient)."""
    if keep == source.weight.shape[0]:
        return source
    bias = None if source.bias is None else source.bias[:keep]
    return LinearLogits(source.hidden, source.weight[:keep], bias, source.hidden_grad)


_HALF = (torch.bfloat16, torch.float16)


def operand_dtype(x: Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype the tiles' matmuls read ``x`` in, for results in ``dtype``: half inputs on CUDA stay half (tensor
    cores, fp32 accumulation and output); everywhere else the compute dtype itself."""
    return x.dtype if x.is_cuda and x.dtype in _HALF and dtype == torch.float32 else dtype


def matmul(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ b`` returned in ``dtype``; half operands accumulate in fp32 and are never rounded to half on the way."""
    if a.dtype == dtype and b.dtype == dtype:
        return torch.matmul(a, b)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=dtype)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm(..., out_dtype)
            pass
    return torch.matmul(a.to(dtype), b.to(dtype))


def logits_tile(hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``hidden @ weight.T + bias`` in ``dtype`` for a ``[rows, H]`` block of hidden states and ``[C, H]`` weight
    rows (``weight`` already in :func:`operand_dtype`); half inputs accumulate in fp32 and the tile stays fp32."""
    out = matmul(hidden.to(weight.dtype), weight.t(), dtype)
    return out if bias is None else out.add_(bias.to(dtype))


__all__ = [
    "HIDDEN_GRADS",
    "HiddenGrad",
    "LinearLogits",
    "Logits",
    "check_linear",
    "logits_tile",
    "matmul",
    "operand_dtype",
    "trimmed",
]
