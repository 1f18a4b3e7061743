"""The one front door: every public function turns its arguments into a :class:`Call` here, then runs the engine.

Resolving a call is local (no collective, no copy of the logits) and raises before any collective, so no rank is
left waiting on one that raised:

1. DTensor logits are unwrapped differentiably with ``to_local()``; the layout and group come from the mesh.
2. Otherwise the layout is the one the caller passed, or Megatron's equal split over ``group`` (an assumption the
   engine checks in its one all-gather whenever offsets matter), or the whole vocabulary for ``group=None``.
3. ``valid_vocab_size`` drops the padded tail by slicing the last dimension (a view): the engine never sees those
   columns, so they count exactly as ``-inf`` logits and get zero gradient.
4. Types, shapes, devices, tokens, mask, temperature and options are checked.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from shardkl._dtensor import is_dtensor, to_local_like, unwrap_logits
from shardkl.distributed import ProcessGroup, rank_and_size
from shardkl.layout import VocabLayout
from shardkl.options import Options, check_options


class Call(NamedTuple):
    """A call in the engine's terms.

    Attributes:
        p, q: local logits of this rank's real (non-padding) columns; ``q`` is ``None`` for one input.
        tokens: int64 global token ids on ``p``'s device, or ``None``.
        mask: the per-token mask (any dtype, shape checked), or ``None``.
        layout: this rank's slice, padding included, with the valid size.
        layout_given: whether the layout came from the caller or a DTensor (always checked in the gather) rather
            than the default equal-split assumption (checked only where offsets matter).
        temperature: the softmax temperature.
        options: how the call runs.
    """

    p: Tensor
    q: Tensor | None
    tokens: Tensor | None
    mask: Tensor | None
    layout: VocabLayout
    layout_given: bool
    temperature: float
    options: Options


def _check_logits(name: str, logits: object) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension (at least 1-D), got a 0-d tensor")
    return logits


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive number, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def _check_tokens(tokens: object, shape: torch.Size, device: torch.device) -> Tensor:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must have an integer dtype, got {tokens.dtype}")
    if tokens.shape != shape:
        raise ValueError(
            f"tokens must have the logits' shape without the vocabulary dimension, {tuple(shape)}, "
            f"got {tuple(tokens.shape)}"
        )
    return tokens.to(device=device, dtype=torch.long)


def check_mask_shape(mask: object, shape: torch.Size) -> Tensor | None:
    """``mask`` if it is ``None`` or a tensor shaped like the per-token results; raise otherwise (no host sync:
    its values are checked in the engine's gather)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"mask must have the per-token shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask


def _resolve_layout(
    local_size: int, group: ProcessGroup | None, layout: object, valid_vocab_size: object
) -> tuple[VocabLayout, bool]:
    if valid_vocab_size is not None and (isinstance(valid_vocab_size, bool) or not isinstance(valid_vocab_size, int)):
        raise TypeError(f"valid_vocab_size must be an int or None, got {type(valid_vocab_size).__name__}")
    if valid_vocab_size is not None and valid_vocab_size < 1:
        raise ValueError(f"valid_vocab_size must be >= 1, got {valid_vocab_size}")
    if layout is None:
        if group is None:
            resolved = VocabLayout(0, local_size, None, None, valid_vocab_size)
        else:
            # Megatron's equal split, assumed; no global size here: the gather checks the ranks' sizes together
            start = rank_and_size(group)[0] * local_size
            resolved = VocabLayout(start, start + local_size, group, None, valid_vocab_size)
        return resolved, False
    if not isinstance(layout, VocabLayout):
        raise TypeError(f"layout must be a shardkl.VocabLayout or None, got {type(layout).__name__}")
    if group is not None and group is not layout.group:
        raise ValueError("pass the group once: either group= or layout=VocabLayout(..., group=...), not both")
    if layout.local_size != local_size:
        raise ValueError(
            f"the layout says this rank holds ids [{layout.start}, {layout.stop}) ({layout.local_size} columns), "
            f"but the logits have {local_size} columns in their last dimension"
        )
    return layout.with_valid_vocab_size(valid_vocab_size), True


def resolve(
    p_logits: Any,
    q_logits: Any = None,
    tokens: Any = None,
    mask: Any = None,
    *,
    group: ProcessGroup | None,
    layout: VocabLayout | None,
    valid_vocab_size: int | None,
    temperature: float,
    options: Options | None,
    two_inputs: bool,
    p_name: str = "p_logits",
) -> Call:
    """Unwrap, lay out, trim and check one public call's arguments (see the module docstring).

    Args:
        p_logits, q_logits: logits (local shards or DTensors); ``q_logits`` is ignored unless ``two_inputs``.
        tokens, mask: per-token tensors or ``None``; as DTensors they must be replicated over the vocabulary mesh
            dimension.
        group, layout, valid_vocab_size, temperature, options: as the public functions take them.
        two_inputs: whether the function takes ``q_logits``.
        p_name: the public name of the first argument, for messages.

    Returns:
        :class:`Call`.
    """
    options = check_options(options)
    temperature = _check_temperature(temperature)
    if is_dtensor(p_logits):
        if layout is not None:
            raise ValueError("layout must be None for DTensor logits: it comes from their mesh and placements")
        shards = unwrap_logits(p_logits, q_logits if two_inputs else None, group)
        p_logits, q_logits = shards.p_local, shards.q_local
        tokens = to_local_like("tokens", tokens, shards.mesh_dim)
        mask = to_local_like("mask", mask, shards.mesh_dim)
        resolved, given = shards.layout.with_valid_vocab_size(valid_vocab_size), True
    elif two_inputs and is_dtensor(q_logits):
        raise TypeError(f"q_logits is a DTensor, so {p_name} must be one too (same mesh and placements)")
    else:
        _check_logits(p_name, p_logits)
        resolved, given = _resolve_layout(p_logits.shape[-1], group, layout, valid_vocab_size)
    p = _check_logits(p_name, p_logits)
    q = None
    if two_inputs:
        if q_logits is None:
            raise TypeError("q_logits must be a torch.Tensor, got None")
        q = _check_logits("q_logits", q_logits)
        if q.shape != p.shape:
            raise ValueError(
                f"{p_name} and q_logits must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}"
            )
        if q.device != p.device:
            raise ValueError(f"{p_name} and q_logits must be on one device, got {p.device} and {q.device}")
    lead = p.shape[:-1]
    t = None if tokens is None else _check_tokens(tokens, lead, p.device)
    mask = check_mask_shape(mask, lead)
    keep = resolved.kept_size
    if keep < p.shape[-1]:
        # a view, not a copy: the padded columns are never read and their gradient is zero
        p = p[..., :keep]
        q = None if q is None else q[..., :keep]
    return Call(p, q, t, mask, resolved, given, temperature, options)


__all__ = ["Call", "check_mask_shape", "resolve"]
