"""The one front door: every public function turns its arguments into a :class:`Call` here, then runs the engine.

Resolving a call is local (no collective, no copy of the logits) and raises before any collective, so no rank is
left waiting on one that raised:

1. DTensor logits (or a :class:`shardkl.LinearLogits` with a DTensor weight) are unwrapped differentiably with
   ``to_local()``; the layout and group come from the mesh.
2. Otherwise the layout is the one the caller passed, or Megatron's equal split over ``group`` (an assumption the
   engine checks in its one all-gather whenever offsets matter), or the whole vocabulary for ``group=None``.
3. ``valid_vocab_size`` drops the padded tail by slicing the last dimension (a view): the engine never sees those
   columns, so they count exactly as ``-inf`` logits and get zero gradient.
4. Types, shapes, devices, tokens, mask, other per-token tensors, temperature and options are checked, and so is
   the one choice a trainable :class:`shardkl.LinearLogits` under tensor parallelism must make (its hidden states'
   partial or full gradient).
5. A call without a group in an environment that launched several ranks (``WORLD_SIZE > 1``) but never initialised
   ``torch.distributed`` warns once: each rank would compute over its own slice as if it were the whole vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from shardkl import _validation
from shardkl._dtensor import is_dtensor, to_local_like, unwrap_linear, unwrap_logits
from shardkl.distributed import ProcessGroup, rank_and_size
from shardkl.layout import VocabLayout
from shardkl.linear import LinearLogits, check_linear, trimmed
from shardkl.options import Options, check_options


class Call(NamedTuple):
    """A call in the engine's terms.

    Attributes:
        p, q: local logits (tensors or :class:`shardkl.LinearLogits`) of this rank's real (non-padding) columns;
            ``q`` is ``None`` for one input.
        tokens: int64 global token ids on ``p``'s device, or ``None``.
        mask: the per-token mask (any dtype, shape checked), or ``None``.
        layout: this rank's slice, padding included, with the valid size.
        layout_given: whether the layout came from the caller or a DTensor (always checked in the gather) rather
            than the default equal-split assumption (checked only where offsets matter).
        temperature: the softmax temperature.
        options: how the call runs.
        names: the public names of the two inputs, for messages.
        per_token: other per-token tensors of the call by name (a top-k teacher's ids, advantages), local parts of
            DTensors replicated over the vocabulary mesh dimension.
        no_process_group: ``WORLD_SIZE`` of a multi-rank environment without a process group, else 0.
    """

    p: Tensor | LinearLogits
    q: Tensor | LinearLogits | None
    tokens: Tensor | None
    mask: Tensor | None
    layout: VocabLayout
    layout_given: bool
    temperature: float
    options: Options
    names: tuple[str, str] = ("p_logits", "q_logits")
    per_token: dict[str, Any] = {}  # a shared default, never mutated
    no_process_group: int = 0


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


def _check_tokens(tokens: object, shape: torch.Size, device: torch.device, *, several: bool) -> Tensor:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must have an integer dtype, got {tokens.dtype}")
    per_position = several and tokens.dim() == len(shape) + 1 and tokens.shape[:-1] == shape
    if tokens.shape != shape and not per_position:
        also = f", or that shape and a number of ids per position, {(*shape, 'K')}" if several else ""
        raise ValueError(
            f"tokens must have the logits' shape without the vocabulary dimension, {tuple(shape)}{also}; "
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


Source = Tensor | LinearLogits


def _is_dtensor_side(x: object) -> bool:
    return is_dtensor(x) or (isinstance(x, LinearLogits) and is_dtensor(x.weight))


def _check_side(name: str, x: object) -> Source:
    if isinstance(x, LinearLogits):
        check_linear(name, x)
        return x
    return _check_logits(name, x)


def _device(x: Source) -> torch.device:
    return x.hidden.device if isinstance(x, LinearLogits) else x.device


def _check_hidden_grad(name: str, x: Source, world: int) -> None:
    differentiated = torch.is_grad_enabled() and isinstance(x, LinearLogits) and x.hidden.requires_grad
    if not differentiated or world <= 1 or x.hidden_grad is not None:  # type: ignore[union-attr]
        return
    raise ValueError(
        f"{name} is a LinearLogits whose hidden states require grad under a group of {world} ranks: each rank's "
        "gradient of hidden is then its partial sum over its vocabulary rows. Say which one you want: "
        f"LinearLogits(hidden, weight, hidden_grad='partial') if your trainer sums it over the group (as Megatron's "
        "copy_to_tensor_parallel_region does), or hidden_grad='full' to have shardkl all-reduce it in backward "
        "(one collective)"
    )


def _trim(x: Source, keep: int) -> Source:
    if isinstance(x, LinearLogits):
        return trimmed(x, keep)
    # a view, not a copy: the padded columns are never read and their gradient is zero
    return x if keep == x.shape[-1] else x[..., :keep]


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
    q_name: str = "q_logits",
    per_token: dict[str, Any] | None = None,
    tokens_per_position: bool = False,
) -> Call:
    """Unwrap, lay out, trim and check one public call's arguments (see the module docstring).

    Args:
        p_logits, q_logits: logits (local shards, DTensors, or :class:`shardkl.LinearLogits`); ``q_logits`` is
            ignored unless ``two_inputs``.
        tokens, mask: per-token tensors or ``None``; as DTensors they must be replicated over the vocabulary mesh
            dimension.
        group, layout, valid_vocab_size, temperature, options: as the public functions take them.
        two_inputs: whether the function takes ``q_logits``.
        p_name, q_name: the public names of the two arguments, for messages.
        per_token: other per-token tensors by name, returned in :attr:`Call.per_token` (DTensors: their local parts,
            which must be replicated over the vocabulary mesh dimension); their shapes are the caller's to check.
        tokens_per_position: ``tokens`` may also hold several ids per position, ``[..., K]``.

    Returns:
        :class:`Call`.
    """
    options = check_options(options)
    temperature = _check_temperature(temperature)
    sides = [(p_name, p_logits)] + ([(q_name, q_logits)] if two_inputs else [])
    if two_inputs and q_logits is None:
        raise TypeError(f"{q_name} must be a torch.Tensor or shardkl.LinearLogits, got None")
    distributed_sides = [_is_dtensor_side(x) for _, x in sides]
    if any(distributed_sides):
        if not all(distributed_sides):
            plain = sides[distributed_sides.index(False)][0]
            raise TypeError(
                f"{sides[distributed_sides.index(True)][0]} is a DTensor (or has a DTensor weight), so {plain} must "
                "be one too, on the same mesh"
            )
        if layout is not None:
            raise ValueError("layout must be None for DTensor inputs: it comes from their mesh and placements")
        unwrapped = [
            unwrap_linear(name, x, group) if isinstance(x, LinearLogits) else unwrap_logits(name, x, group)
            for name, x in sides
        ]
        first = unwrapped[0]
        for (name, _), other in zip(sides[1:], unwrapped[1:], strict=True):
            if other.mesh != first.mesh or other.mesh_dim != first.mesh_dim or other.layout != first.layout:
                raise ValueError(
                    f"{p_name} and {name} must be sharded over the same mesh dimension with the same vocabulary, got "
                    f"{first.mesh} dim {first.mesh_dim} {first.layout} and {other.mesh} dim {other.mesh_dim} "
                    f"{other.layout}"
                )
        locals_ = [side.local for side in unwrapped]
        tokens = to_local_like("tokens", tokens, first.mesh_dim)
        mask = to_local_like("mask", mask, first.mesh_dim)
        per_token = {name: to_local_like(name, x, first.mesh_dim) for name, x in (per_token or {}).items()}
        resolved, given = first.layout.with_valid_vocab_size(valid_vocab_size), True
        checked = [_check_side(name, x) for (name, _), x in zip(sides, locals_, strict=True)]
    else:
        checked = [_check_side(name, x) for name, x in sides]
        resolved, given = _resolve_layout(checked[0].shape[-1], group, layout, valid_vocab_size)
        world = rank_and_size(resolved.group)[1]
        for (name, _), x in zip(sides, checked, strict=True):
            _check_hidden_grad(name, x, world)
    p = checked[0]
    q = checked[1] if two_inputs else None
    if q is not None:
        if q.shape != p.shape:
            what = " (of their logits: hidden rows and weight rows)" if LinearLogits in map(type, checked) else ""
            raise ValueError(
                f"{p_name} and {q_name} must have the same shape{what}, got {tuple(p.shape)} and {tuple(q.shape)}"
            )
        if _device(q) != _device(p):
            raise ValueError(f"{p_name} and {q_name} must be on one device, got {_device(p)} and {_device(q)}")
    lead = p.shape[:-1]
    t = None if tokens is None else _check_tokens(tokens, lead, _device(p), several=tokens_per_position)
    mask = check_mask_shape(mask, lead)
    keep = resolved.kept_size
    p = _trim(p, keep)
    q = None if q is None else _trim(q, keep)
    no_group = 0 if resolved.group is not None or any(distributed_sides) else _validation.no_process_group_world()
    _validation.warn_if_no_process_group(no_group)
    return Call(p, q, t, mask, resolved, given, temperature, options, (p_name, q_name), per_token or {}, no_group)


__all__ = ["Call", "check_mask_shape", "resolve"]
