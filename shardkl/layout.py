"""Which vocabulary columns each rank holds: the one place in shardkl that says it.

Every rank of the vocabulary group holds one contiguous slice ``[start, stop)`` of the (possibly padded) global
vocabulary, slices in group-rank order, sizes free (a rank may hold none). :class:`VocabLayout` records this rank's
slice, the group, and optionally the padded global size and the number of real ids at its front. It is resolved
once, at the entry of every public function, from one of three sources:

- an explicit ``VocabLayout(start, stop, group=...)`` the caller passes (any uneven split);
- a DTensor's placement (``torch.chunk``'s ceil-sized chunks, :meth:`VocabLayout.chunked`);
- by default for a plain group, Megatron's equal split: rank ``r`` holds ``[r * V_local, (r + 1) * V_local)``.

The engine sends each rank's ``(start, stop, local size)`` in the metadata of its one all-gather and checks that
the slices tile ``[0, V)`` in rank order, so a wrong layout raises the same ``ValueError`` on every rank instead of
giving a wrong number. The split rules that build layouts (:func:`shard_bounds`) are used by the launchers, the
benchmark and the tests too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shardkl.distributed import ProcessGroup, rank_and_size

SplitRule = Literal["equal", "balanced", "chunked"]


def shard_bounds(vocab_size: int, world_size: int, rank: int, rule: SplitRule = "balanced") -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank`` when ``vocab_size`` ids are split over ``world_size`` ranks.

    Args:
        vocab_size: global vocabulary size (padded size, for ``"equal"``).
        world_size: number of ranks.
        rank: this rank, ``0 <= rank < world_size``.
        rule: ``"equal"``: Megatron's equal partitions, ``vocab_size`` must divide evenly; ``"balanced"``: the
            first ``vocab_size % world_size`` ranks hold one id more (``torch.tensor_split``); ``"chunked"``: ceil-sized
            chunks, trailing ranks shorter or empty (``torch.chunk``, a DTensor's ``Shard``).

    Returns:
        ``(start, stop)``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if rule == "equal":
        if vocab_size % world_size:
            raise ValueError(
                f"an equal split needs a vocabulary divisible by the world size, got {vocab_size} over {world_size} "
                "ranks (pad the vocabulary, or use the 'balanced' or 'chunked' rule)"
            )
        local = vocab_size // world_size
        return rank * local, (rank + 1) * local
    if rule == "balanced":
        base, extra = divmod(vocab_size, world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (rank < extra)
    if rule == "chunked":
        chunk = -(-vocab_size // world_size)
        start = min(rank * chunk, vocab_size)
        return start, min(start + chunk, vocab_size)
    raise ValueError(f"rule must be one of 'equal', 'balanced', 'chunked', got {rule!r}")


def _check_size(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class VocabLayout:
    """This rank's slice ``[start, stop)`` of a vocabulary split over ``group``.

    Args:
        start: first global id this rank holds.
        stop: one past the last global id this rank holds (``stop == start`` for an empty shard).
        group: the process group the vocabulary is split over; ``None``: this process holds the whole vocabulary.
        vocab_size: the global (padded) vocabulary size, if known; checked against the sum of the ranks' slices.
        valid_vocab_size: the number of real ids; ids ``>= valid_vocab_size`` are padding (Megatron and vLLM pad the
            end of the vocabulary) and count as ``-inf`` logits: no probability, zero gradient.

    Example:
        >>> # rank 0 holds ids [0, 600), rank 1 holds [600, 1003)
        >>> layout = shardkl.VocabLayout(0, 600, group=tp_group)   # on rank 0
        >>> layout = shardkl.VocabLayout(600, 1003, group=tp_group)  # on rank 1
        >>> shardkl.kl_stats(p_local, q_local, tokens, layout=layout)
    """

    start: int
    stop: int
    group: ProcessGroup | None = None
    vocab_size: int | None = None
    valid_vocab_size: int | None = None

    def __post_init__(self) -> None:
        _check_size("start", self.start, 0)
        _check_size("stop", self.stop, self.start)
        if self.vocab_size is not None:
            _check_size("vocab_size", self.vocab_size, self.stop)
        if self.valid_vocab_size is not None:
            _check_size("valid_vocab_size", self.valid_vocab_size, 1)
            if self.vocab_size is not None and self.valid_vocab_size > self.vocab_size:
                raise ValueError(
                    f"valid_vocab_size must be <= vocab_size={self.vocab_size}, got {self.valid_vocab_size}"
                )
        if self.group is None and self.start != 0:
            raise ValueError(f"a layout without a group holds the whole vocabulary and starts at 0, got {self.start}")

    @property
    def local_size(self) -> int:
        """Number of ids this rank holds, padding included."""
        return self.stop - self.start

    @property
    def kept_size(self) -> int:
        """Number of real (non-padding) ids this rank holds."""
        if self.valid_vocab_size is None:
            return self.local_size
        return min(max(self.valid_vocab_size - self.start, 0), self.local_size)

    @classmethod
    def full(cls, vocab_size: int, *, valid_vocab_size: int | None = None) -> VocabLayout:
        """The whole vocabulary in one process (no group)."""
        return cls(0, vocab_size, None, vocab_size, valid_vocab_size)

    @classmethod
    def split(
        cls,
        vocab_size: int,
        group: ProcessGroup | None,
        rule: SplitRule = "balanced",
        *,
        valid_vocab_size: int | None = None,
    ) -> VocabLayout:
        """This rank's slice of ``vocab_size`` ids split over ``group`` by ``rule`` (see :func:`shard_bounds`)."""
        rank, world = rank_and_size(group)
        start, stop = shard_bounds(vocab_size, world, rank, rule)
        return cls(start, stop, group, vocab_size, valid_vocab_size)

    @classmethod
    def equal(cls, local_size: int, group: ProcessGroup | None, *, valid_vocab_size: int | None = None) -> VocabLayout:
        """Megatron's equal split: rank ``r`` holds ``[r * local_size, (r + 1) * local_size)``."""
        rank, world = rank_and_size(group)
        return cls(rank * local_size, (rank + 1) * local_size, group, world * local_size, valid_vocab_size)

    @classmethod
    def chunked(
        cls, vocab_size: int, group: ProcessGroup | None, *, valid_vocab_size: int | None = None
    ) -> VocabLayout:
        """``torch.chunk``'s split, as a DTensor sharded on the vocabulary holds it."""
        return cls.split(vocab_size, group, "chunked", valid_vocab_size=valid_vocab_size)

    def with_valid_vocab_size(self, valid_vocab_size: int | None) -> VocabLayout:
        """This layout with ``valid_vocab_size`` set; raises if it already holds a different one."""
        if valid_vocab_size is None or valid_vocab_size == self.valid_vocab_size:
            return self
        if self.valid_vocab_size is not None:
            raise ValueError(
                f"valid_vocab_size={valid_vocab_size} contradicts the layout's valid_vocab_size="
                f"{self.valid_vocab_size}; give it once"
            )
        return VocabLayout(self.start, self.stop, self.group, self.vocab_size, valid_vocab_size)


__all__ = ["SplitRule", "VocabLayout", "shard_bounds"]
