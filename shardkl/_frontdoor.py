"""What every public function does first: turn the caller's logits into the engine's local shards.

Two adaptations, both local (no collective, no copy of the logits):

- DTensor logits are unwrapped differentiably with ``to_local()`` and the group comes from the mesh
  (``shardkl.integrations.dtensor``).
- ``valid_vocab_size`` drops padded vocabulary columns (global id ``>= valid_vocab_size``) by slicing the last
  dimension, a view: the engine never sees them, so they count exactly as ``-inf`` logits and get zero gradient.
  Padding must sit at the end of the global vocabulary (Megatron and vLLM pad there), so the slices of the ranks
  before it keep their sizes and the offsets the engine infers stay right. A rank's first global id is
  ``rank * V_local`` for a plain group (Megatron's equal partitions: the padded vocabulary is a multiple of the
  tensor-parallel size) and the ceil-chunk offset for a DTensor.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor

from shardkl.distributed import ProcessGroup, rank_and_size
from shardkl.integrations.dtensor import is_dtensor, to_local_like, unwrap_logits


class LocalInputs(NamedTuple):
    """Inputs in the engine's terms: local vocabulary slices, per-token tensors, and the group."""

    p_logits: Any
    q_logits: Any
    tokens: Any
    mask: Any
    group: ProcessGroup | None


def _check_valid_vocab_size(valid_vocab_size: object, padded_vocab: int) -> int:
    if isinstance(valid_vocab_size, bool) or not isinstance(valid_vocab_size, int):
        raise TypeError(f"valid_vocab_size must be an int or None, got {type(valid_vocab_size).__name__}")
    if not 0 < valid_vocab_size <= padded_vocab:
        raise ValueError(
            f"valid_vocab_size must be in [1, {padded_vocab}] (the padded global vocabulary size), "
            f"got {valid_vocab_size}"
        )
    return valid_vocab_size


def local_inputs(
    p_logits: Any,
    q_logits: Any = None,
    tokens: Any = None,
    mask: Any = None,
    *,
    group: ProcessGroup | None,
    valid_vocab_size: int | None,
) -> LocalInputs:
    """Unwrap DTensors and drop padded vocabulary columns; other inputs pass through for validation.

    Args:
        p_logits, q_logits: logits (local shards or DTensors); ``q_logits`` may be ``None``.
        tokens, mask: per-token tensors or ``None``; as DTensors they must be replicated over the vocabulary
            mesh dimension.
        group: process group of the vocabulary split (``None`` for DTensors or full-vocabulary tensors).
        valid_vocab_size: number of real vocabulary entries; columns with global id at or beyond it are padding.

    Returns:
        :class:`LocalInputs`.
    """
    if is_dtensor(p_logits):
        shards = unwrap_logits(p_logits, q_logits, group)
        p_logits, q_logits, group = shards.p_local, shards.q_local, shards.group
        tokens = to_local_like("tokens", tokens, shards.mesh_dim)
        mask = to_local_like("mask", mask, shards.mesh_dim)
        start, padded_vocab = shards.vocab_start, shards.vocab_size
    elif is_dtensor(q_logits):
        raise TypeError("q_logits is a DTensor, so p_logits must be one too (same mesh and placements)")
    elif valid_vocab_size is not None and isinstance(p_logits, Tensor) and p_logits.dim() >= 1:
        rank, world = rank_and_size(group)
        local = p_logits.shape[-1]
        # Megatron's VocabUtility: equal partitions, rank r holds [r * V_local, (r + 1) * V_local)
        start, padded_vocab = rank * local, world * local
    else:
        return LocalInputs(p_logits, q_logits, tokens, mask, group)
    if valid_vocab_size is not None:
        valid = _check_valid_vocab_size(valid_vocab_size, padded_vocab)
        local = p_logits.shape[-1]
        keep = min(max(valid - start, 0), local)
        shapes_match = not isinstance(q_logits, Tensor) or q_logits.shape == p_logits.shape
        # (mismatched shapes are left alone, for the shape check to report them)
        if keep < local and shapes_match:
            # a view, not a copy: the dropped columns are never read and their gradient is zero
            p_logits = p_logits[..., :keep]
            if isinstance(q_logits, Tensor):
                q_logits = q_logits[..., :keep]
    return LocalInputs(p_logits, q_logits, tokens, mask, group)
