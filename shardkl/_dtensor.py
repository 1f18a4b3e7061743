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

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch 2.4 keeps DTensor private
    try:
        from torch.distributed._tensor import DTensor, Replicate, Shard  # type: ignore[no-redef]
    except ImportError:
        DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(x: object) -> bool:
    """True if ``x`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(x, DTensor)


class LocalShards(NamedTuple):
    """This rank's view of DTensor logits, in the engine's terms.

    Attributes:
        p_local, q_local: local vocabulary slices (``q_local`` is ``None`` for one input), differentiable views.
        layout: this rank's slice of the vocabulary and the process group of the mesh dimension that shards it.
        mesh_dim: the mesh dimension that shards the vocabulary.
    """

    p_local: Tensor
    q_local: Tensor | None
    layout: VocabLayout
    mesh_dim: int


def _describe(placements: tuple[Any, ...]) -> str:
    return "(" + ", ".join(repr(p) for p in placements) + ")"


def _vocab_mesh_dim(name: str, x: Any) -> int:
    """The one mesh dimension whose placement is ``Shard`` of the last tensor dimension; raise otherwise."""
    ndim = x.dim()
    placements = tuple(x.placements)
    vocab_dims = []
    for mesh_dim, placement in enumerate(placements):
        if type(placement) is Shard and placement.dim % ndim == ndim - 1:
            vocab_dims.append(mesh_dim)
        elif type(placement) is Shard and placement.dim % ndim != ndim - 1:
            continue  # a non-vocabulary dimension (e.g. the batch): the result holds the local rows
        elif type(placement) is Replicate:
            continue
        else:
            raise ValueError(
                f"{name} must be a DTensor sharded on the vocabulary (last) dimension, Shard({ndim - 1}) "
                f"(Shard(-1)), on one mesh dimension, with Replicate() or Shard of another dimension elsewhere; "
                f"got placements {_describe(placements)}, which holds {placement!r} on mesh dimension {mesh_dim}"
            )
    if len(vocab_dims) != 1:
        raise ValueError(
            f"{name} must be a DTensor sharded on the vocabulary (last) dimension, Shard({ndim - 1}) (Shard(-1)), "
            f"on exactly one mesh dimension; got placements {_describe(placements)}"
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


def unwrap_logits(p_logits: Any, q_logits: Any | None, group: ProcessGroup | None) -> LocalShards:
    """Local slices, group and vocabulary offset of DTensor logits; raise before any collective if unsupported.

    Args:
        p_logits: DTensor sharded on its last dimension.
        q_logits: DTensor with the same mesh and placements, or ``None``.
        group: must be ``None`` or the mesh dimension's group (the mesh already says which group).

    Returns:
        :class:`LocalShards`.
    """
    mesh_dim = _vocab_mesh_dim("p_logits", p_logits)
    if q_logits is not None:
        if not is_dtensor(q_logits):
            raise TypeError(
                f"p_logits is a DTensor, so q_logits must be one too (same mesh and placements), "
                f"got {type(q_logits).__name__}"
            )
        if q_logits.device_mesh != p_logits.device_mesh or tuple(q_logits.placements) != tuple(p_logits.placements):
            raise ValueError(
                f"p_logits and q_logits must share a mesh and placements, got {p_logits.device_mesh} "
                f"{_describe(tuple(p_logits.placements))} and {q_logits.device_mesh} "
                f"{_describe(tuple(q_logits.placements))}"
            )
    mesh = p_logits.device_mesh
    mesh_group, coordinate = _mesh_group(mesh, mesh_dim)
    if group is not None and group is not mesh_group:
        raise ValueError(
            "group must be None for DTensor logits (it comes from the mesh dimension that shards the vocabulary), "
            f"got a different group than device_mesh.get_group({mesh_dim})"
        )
    vocab = int(p_logits.shape[-1])
    # torch.chunk's layout: ceil-sized chunks in mesh order, trailing ranks shorter or empty
    layout = VocabLayout.chunked(vocab, mesh_group)
    p_local = p_logits.to_local()
    q_local = None if q_logits is None else q_logits.to_local()
    for name, local in (("p_logits", p_local), ("q_logits", q_local)):
        if local is not None and local.shape[-1] != layout.local_size:
            raise ValueError(
                f"{name}: DTensor of global vocabulary {vocab} sharded over {mesh.size(mesh_dim)} ranks should hold "
                f"ceil-chunk columns [{layout.start}, {layout.stop}) on mesh coordinate {coordinate}, i.e. "
                f"{layout.local_size} columns, but its local tensor has {local.shape[-1]}"
            )
    return LocalShards(p_local, q_local, layout, mesh_dim)


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

