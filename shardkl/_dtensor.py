"""DTensor inputs: logits sharded on the vocabulary dimension of a ``DeviceMesh``, turned into local shards.

A DTensor with placement ``Shard(ndim - 1)`` (``Shard(-1)`` is stored normalised) on one mesh dimension holds,
on the rank with coordinate ``c`` along that dimension, the global columns ``[c * chunk, min((c + 1) * chunk, V))``
with ``chunk = ceil(V / mesh_size)`` (``torch.chunk``'s layout: trailing ranks may hold fewer or no columns).
That is :meth:`shardkl.VocabLayout.chunked` (contiguous slices in rank order) provided the mesh dimension's process
group numbers its ranks in mesh order, which :func:`unwrap_logits` checks. Unwrapping uses ``to_local()``, which
is differentiable, so gradients flow back to the DTensor inputs as DTensors with the same placements.

Other mesh dimensions may be ``Replicate()`` or shard a non-vocabulary dimension (e.g. the batch, for data
parallelism); the results then describe this rank's local rows. ``Partial`` logits are rejected.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch.distributed as dist
from torch import Tensor

from shardkl.distributed import ProcessGroup
from shardkl.layout import VocabLayout
from shardkl.linear import LinearLogits

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover - torch 2.4 keeps DTensor private
    try:
        from torch.distributed._tensor import DTensor, Partial, Replicate, Shard  # type: ignore[no-redef]
    except ImportError:
        DTensor = Partial = Replicate = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(x: object) -> bool:
    """True if ``x`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(x, DTensor)


def _describe(placements: tuple[Any, ...]) -> str:
    return "(" + ", ".join(repr(p) for p in placements) + ")"


def _vocab_mesh_dim(name: str, x: Any, vocab_dim: int = -1) -> int:
    """The one mesh dimension whose placement is ``Shard`` of the vocabulary dimension; raise otherwise."""
    ndim = x.dim()
    vocab_dim %= ndim
    what = "last" if vocab_dim == ndim - 1 else "first"
    placements = tuple(x.placements)
    vocab_dims = []
    for mesh_dim, placement in enumerate(placements):
        if type(placement) is Shard and placement.dim % ndim == vocab_dim:
            vocab_dims.append(mesh_dim)
        elif type(placement) is Shard and placement.dim % ndim != vocab_dim:
            continue  # a non-vocabulary dimension (e.g. the batch): the result holds the local rows
        elif type(placement) is Replicate:
            continue
        else:
            raise ValueError(
                f"{name} must be a DTensor sharded on the vocabulary ({what}) dimension, Shard({vocab_dim}), on one "
                f"mesh dimension, with Replicate() or Shard of another dimension elsewhere; got placements "
                f"{_describe(placements)}, which holds {placement!r} on mesh dimension {mesh_dim}"
            )
    if len(vocab_dims) != 1:
        raise ValueError(
            f"{name} must be a DTensor sharded on the vocabulary ({what}) dimension, Shard({vocab_dim}), on exactly "
            f"one mesh dimension; got placements {_describe(placements)}"
        )
    return vocab_dims[0]


def _mesh_group(mesh: Any, mesh_dim: int) -> tuple[ProcessGroup, int]:
    """The process group of ``mesh_dim`` and this rank's coordinate along it, checked to be in mesh order."""
    group = mesh.get_group(mesh_dim)
    coordinate = mesh.get_local_rank(mesh_dim)
    if mesh.size(mesh_dim) > 1:
        # global ranks along mesh_dim through this rank, in mesh order; the engine orders shards by group rank
        ranks = mesh.mesh
        coords = mesh.get_coordinate()
        index = tuple(slice(None) if d == mesh_dim else c for d, c in enumerate(coords))
        in_mesh_order = [int(r) for r in ranks[index].tolist()]
        in_group_order = list(dist.get_process_group_ranks(group))
        if in_mesh_order != in_group_order:
            raise ValueError(
                f"the process group of mesh dimension {mesh_dim} orders its ranks {in_group_order}, but the mesh "
                f"orders the vocabulary shards {in_mesh_order}; shardkl needs shards in group-rank order "
                f"(build the DeviceMesh with ranks increasing along the vocabulary-parallel dimension)"
            )
    return group, coordinate


class LocalSide(NamedTuple):
    """One unwrapped DTensor input: its local part, this rank's layout, and the mesh it came from."""

    local: Any
    layout: VocabLayout
    mesh: Any
    mesh_dim: int


def _local_layout(name: str, mesh: Any, mesh_dim: int, vocab: int, local_size: int, group: Any) -> VocabLayout:
    mesh_group, coordinate = _mesh_group(mesh, mesh_dim)
    if group is not None and group is not mesh_group:
        raise ValueError(
            "group must be None for DTensor inputs (it comes from the mesh dimension that shards the vocabulary), "
            f"got a different group than device_mesh.get_group({mesh_dim})"
        )
    # torch.chunk's layout: ceil-sized chunks in mesh order, trailing ranks shorter or empty
    layout = VocabLayout.chunked(vocab, mesh_group)
    if local_size != layout.local_size:
        raise ValueError(
            f"{name}: DTensor of global vocabulary {vocab} sharded over {mesh.size(mesh_dim)} ranks should hold "
            f"ceil-chunk rows [{layout.start}, {layout.stop}) on mesh coordinate {coordinate}, i.e. "
            f"{layout.local_size} of them, but its local tensor has {local_size}"
        )
    return layout


def unwrap_logits(name: str, logits: Any, group: ProcessGroup | None) -> LocalSide:
    """Local slice, layout and mesh of DTensor logits sharded on their last dimension (``to_local()`` is
    differentiable: gradients come back as DTensors with the same placements)."""
    mesh_dim = _vocab_mesh_dim(name, logits)
    local = logits.to_local()
    layout = _local_layout(name, logits.device_mesh, mesh_dim, int(logits.shape[-1]), local.shape[-1], group)
    return LocalSide(local, layout, logits.device_mesh, mesh_dim)


def unwrap_linear(name: str, source: Any, group: ProcessGroup | None) -> LocalSide:
    """Local parts of a :class:`shardkl.LinearLogits` whose ``weight`` is a DTensor sharded ``Shard(0)``.

    ``hidden`` must be a DTensor replicated on the vocabulary mesh dimension. Its local part is taken with a
    ``Partial`` gradient on that dimension: each rank's gradient is its partial sum over its vocabulary rows, and
    DTensor sums them where the replicated hidden states came from.
    """
    weight, hidden, bias = source.weight, source.hidden, source.bias
    mesh_dim = _vocab_mesh_dim(f"{name}.weight", weight, vocab_dim=0)
    mesh = weight.device_mesh
    if not is_dtensor(hidden):
        raise TypeError(
            f"{name}.weight is a DTensor, so {name}.hidden must be one too, replicated on the vocabulary mesh "
            "dimension (e.g. DTensor.from_local(hidden, mesh, [Replicate()])), so that its gradient is summed "
            "over the ranks"
        )
    placements = tuple(hidden.placements)
    if hidden.device_mesh != mesh or type(placements[mesh_dim]) is not Replicate:
        raise ValueError(
            f"{name}.hidden must be a DTensor on the weight's mesh, Replicate() on the vocabulary mesh dimension "
            f"{mesh_dim}; got placements {_describe(placements)}"
        )
    grad_placements = tuple(Partial() if d == mesh_dim else p for d, p in enumerate(placements))
    local_bias = None
    if bias is not None:
        if not is_dtensor(bias) or tuple(bias.placements) != tuple(weight.placements):
            raise ValueError(
                f"{name}.bias must be a DTensor with the weight's placements {_describe(weight.placements)}"
            )
        local_bias = bias.to_local()
    local_weight = weight.to_local()
    local = LinearLogits(hidden.to_local(grad_placements=grad_placements), local_weight, local_bias, "partial")
    layout = _local_layout(name, mesh, mesh_dim, int(weight.shape[0]), local_weight.shape[0], group)
    return LocalSide(local, layout, mesh, mesh_dim)


def to_local_like(name: str, x: Any, mesh_dim: int) -> Tensor:
    """Local part of a per-token DTensor (tokens, mask) that is replicated along the vocabulary mesh dimension."""
    if not is_dtensor(x):
        return x
    placements = tuple(x.placements)
    if mesh_dim >= len(placements) or type(placements[mesh_dim]) is not Replicate:
        raise ValueError(
            f"{name} as a DTensor must be Replicate() on the vocabulary mesh dimension {mesh_dim}, "
            f"got placements {_describe(placements)}"
        )
    local: Tensor = x.to_local()
    return local


def replicated_like(hidden: Tensor, weight: Any) -> Any:
    """``hidden`` as a DTensor replicated over the 1-D mesh of the DTensor ``weight`` (``hidden`` itself if it is a
    DTensor already, or if ``weight`` is not one)."""
    if is_dtensor(hidden) or not is_dtensor(weight):
        return hidden
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"the output layer's weight lives on a {mesh.ndim}-D mesh: pass hidden as a DTensor whose placements say "
            "how it is laid out on the other mesh dimensions"
        )
    return DTensor.from_local(hidden, mesh, [Replicate()])
