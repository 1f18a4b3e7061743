"""Sampling token ids from vocabulary-sharded logits, identically for every world size.

:func:`sample_tokens` uses the Gumbel-max trick: ``argmax_v (a_v / T + G_v)`` with Gumbel noise ``G``. Each rank
draws noise only for its own columns and takes its local maximum; one all-gather of ``(max, global id)`` per
token picks the winner. No rank holds the full vocabulary.

The noise is drawn per block of ``BLOCK`` global columns from a generator seeded by ``(seed, stream, block)``
(:func:`sharded_random`), so the noise of global column ``v`` does not depend on how the vocabulary is split: the
same seed draws the same tokens on 1 rank or on 8. Random numbers come from CPU generators (moved to the logits'
device), so they are also the same on every device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from shardkl._inputs import resolve
from shardkl.distributed import ProcessGroup, argmax_over_ranks
from shardkl.layout import VocabLayout
from shardkl.linear import LinearLogits, Logits, logits_tile
from shardkl.options import Options

BLOCK = 1024


def _block_seed(seed: int, stream: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{stream}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _blocks(start: int, stop: int) -> Iterator[tuple[int, int, int]]:
    """``(block, lo, hi)`` for the global blocks overlapping ``[start, stop)``, with the overlap's bounds."""
    for block in range(start // BLOCK, -(-stop // BLOCK)):
        lo, hi = max(start, block * BLOCK), min(stop, (block + 1) * BLOCK)
        if lo < hi:
            yield block, lo, hi


def sharded_random(
    rows: int,
    start: int,
    stop: int,
    *,
    seed: int,
    stream: str,
    distribution: Literal["uniform", "normal"] = "uniform",
    vocab_size: int | None = None,
) -> Tensor:
    """Columns ``[start, stop)`` of a ``[rows, ∞)`` float32 random tensor fixed by ``(seed, stream)``.

    Column ``v`` holds the same numbers whichever slice it is drawn in, so ranks that each draw their own slice
    together hold one global tensor, for any split.

    Args:
        rows: number of rows.
        start, stop: the global columns to draw.
        seed: seed of the tensor.
        stream: name of an independent stream under the same seed (e.g. ``"gumbel"``).
        distribution: ``"uniform"`` on ``[0, 1)`` or standard ``"normal"``.
        vocab_size: if given, the tensor has this many columns and its last block is drawn narrower (a different
            stream of numbers than without it).

    Returns:
        ``[rows, stop - start]`` float32 on the CPU.
    """
    if vocab_size is not None and stop > vocab_size:
        raise ValueError(f"stop must be <= vocab_size={vocab_size}, got {stop}")
    out = torch.empty(rows, stop - start)
    for block, lo, hi in _blocks(start, stop):
        gen = torch.Generator().manual_seed(_block_seed(seed, stream, block))
        draw = torch.randn if distribution == "normal" else torch.rand
        width = BLOCK if vocab_size is None else min(BLOCK, vocab_size - block * BLOCK)
        values = draw(rows, width, generator=gen)
        out[:, lo - start : hi - start] = values[:, lo - block * BLOCK : hi - block * BLOCK]
    return out


@torch.no_grad()
def sample_tokens(
    logits: Logits,
    *,
    seed: int,
    group: ProcessGroup | None = None,
    layout: VocabLayout | None = None,
    temperature: float = 1.0,
    num_samples: int | None = None,
    valid_vocab_size: int | None = None,
    stream: str = "gumbel",
    options: Options | None = None,
) -> Tensor:
    """Draw global token ids from ``softmax(logits / T)`` over the sharded vocabulary (Gumbel-max).

    Args:
        logits: this rank's slice of the logits, ``[..., V_local]`` (or a DTensor sharded on its last dimension),
            or a :class:`shardkl.LinearLogits` (its logits are then computed one block of columns at a time, never
            all at once).
        seed: seed of the noise; the same seed gives the same tokens for any world size.
        group, layout, temperature, valid_vocab_size: as in :func:`shardkl.kl_stats`; ids at or beyond
            ``valid_vocab_size`` are padding and never drawn.
        num_samples: ``None`` for one draw per row shaped ``[...]``; ``k`` for ``[k, ...]`` independent draws.
        stream: name of the noise stream; use different streams (e.g. per step) for independent draws.
        options: as in :func:`shardkl.kl_stats` (its timeout applies to the one collective).

    Returns:
        int64 global ids, identical on every rank of the group. One collective (an all-gather of two floats per
        draw and row, plus each rank's slice bounds, checked to tile the vocabulary).
    """
    if isinstance(num_samples, bool) or not (num_samples is None or isinstance(num_samples, int)):
        raise TypeError(f"num_samples must be an int or None, got {type(num_samples).__name__}")
    draws = 1 if num_samples is None else num_samples
    if draws < 1:
        raise ValueError(f"num_samples must be >= 1 or None, got {num_samples}")
    call = resolve(
        logits, None, None, None, group=group, layout=layout, valid_vocab_size=valid_vocab_size,
        temperature=temperature, options=options, two_inputs=False, p_name="logits",
    )
    source, layout, temperature = call.p, call.layout, call.temperature
    lead = source.shape[:-1]
    rows = int(torch.Size(lead).numel())
    kept = layout.kept_size
    if isinstance(source, LinearLogits):
        hidden = source.hidden.reshape(rows, -1)
        device = hidden.device
        weight, bias_rows = source.weight, source.bias

        def columns(lo: int, hi: int) -> Tensor:
            bias = None if bias_rows is None else bias_rows[lo:hi]
            return logits_tile(hidden, weight[lo:hi], bias, torch.float32)
    else:
        flat = source.reshape(rows, source.shape[-1])
        device = source.device

        def columns(lo: int, hi: int) -> Tensor:
            return flat[:, lo:hi].float()

    best = torch.full((draws, rows), float("-inf"), dtype=torch.float64)
    best_id = torch.full((draws, rows), -1.0, dtype=torch.float64)
    # one block of noise columns at a time: the same blocks the noise is drawn in. Scores are fp32: every column's
    # score is the same arithmetic on the same numbers whichever rank computes it, so any split draws the same ids.
    for _, block_lo, block_hi in _blocks(layout.start, layout.start + kept):
        scaled = columns(block_lo - layout.start, block_hi - layout.start).cpu()
        if temperature != 1.0:
            scaled = scaled / temperature
        for s in range(draws):
            name = stream if num_samples is None else f"{stream}/{s}"
            uniform = sharded_random(rows, block_lo, block_hi, seed=seed, stream=name)
            # Gumbel(0, 1) noise, in place; uniform = 0 gives -inf, which never wins
            gumbel = uniform.log_().neg_().log_().neg_()
            value, index = (gumbel.add_(scaled)).max(dim=-1)
            # strict: the lowest id wins a tie, as in one full-vocabulary argmax
            better = value.double() > best[s]
            best[s] = torch.where(better, value.double(), best[s])
            best_id[s] = torch.where(better, (index + block_lo).double(), best_id[s])
    ids = argmax_over_ranks(
        best, best_id, layout.group, bounds=(layout.start, layout.stop), timeout_s=call.options.resolved_timeout_s
    )
    shape = tuple(lead) if num_samples is None else (draws, *lead)
    return ids.reshape(shape).to(device)


__all__ = ["BLOCK", "sample_tokens", "sharded_random"]
