"""Cross-rank checks that ride in the engine's one all-gather. No communication here.

Each rank appends a fixed-length metadata vector to its per-token stats (the same length on every rank, whatever
the options, so the collective itself always matches). After the gather every rank holds every rank's metadata and
runs the same checks on the same numbers, so either every rank raises the same error or none does: a mismatch never
leaves one rank waiting for the others, and a wrong vocabulary layout never becomes a plausible number.

Everything a rank learns about its inputs on the device (token range, NaN rows, mask values, a probabilities
look-alike) is a 0-d tensor here; the one host synchronisation of a call is reading the gathered vector.
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from shardkl.distributed import check_tiling, is_initialized
from shardkl.layout import VocabLayout
from shardkl.options import NAN_POLICIES

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}

# Layout of the per-rank metadata vector (float64, so every integer below 2**53 is exact).
(
    KEPT,  # columns this rank sends stats for (its real, non-padding ids)
    START,
    STOP,  # this rank's slice [START, STOP), padding included
    LAYOUT_GIVEN,
    DECLARED_VOCAB,
    VALID_VOCAB,
    TOKEN_MIN,
    TOKEN_MAX,
    HAS_TOKENS,
    TOKEN_SUM,  # the sum of the ids, and a position-weighted hash of them: ranks must pass the same tokens
    TOKEN_HASH,
    ROWS,
    SHAPE,
    P_DTYPE,
    Q_DTYPE,
    TEMPERATURE,
    NAN_POLICY,
    OPTIONS,
    MASK_BAD,
    P_NAN,
    P_POSINF,
    Q_NAN,
    Q_POSINF,
    FIRST_BAD,
    P_PROBABILITY_ROWS,  # rows whose log-sum-exp over this rank's slice says "probabilities" (see below)
    Q_PROBABILITY_ROWS,
    P_MASS_ROWS,  # rows with a finite log-sum-exp over this rank's slice (the others: no mass, NaN, +inf)
    Q_MASS_ROWS,
    NO_PROCESS_GROUP,  # WORLD_SIZE of an environment that launched several ranks without a process group, else 0
) = range(29)
NUM_META = 29

# the hash of the token ids, modulo a prime below 2**31 (products of two residues fit in int64, sums stay exact)
_HASH_PRIME = 2_147_483_629


def _shape_code(shape: torch.Size) -> int:
    return zlib.crc32(repr(tuple(shape)).encode())


@dataclass(frozen=True)
class CallInfo:
    """What one rank knows locally about a call, before the gather."""

    layout: VocabLayout
    layout_given: bool
    kept: int
    rows: int
    lead_shape: torch.Size
    p_dtype: torch.dtype
    q_dtype: torch.dtype | None
    temperature: float
    nan_policy: str
    options_code: int
    no_process_group: int = 0


def token_hash(tokens: Tensor) -> Tensor:
    """A 0-d float64 hash of the ids and their positions (no host sync): ranks whose tokens differ in any
    position, order included, get different hashes except with probability ~1e-9."""
    n = tokens.numel()
    ids = tokens.reshape(-1).remainder(_HASH_PRIME)
    # a fixed pseudo-random weight per position, in [1, prime)
    weights = (torch.arange(n, device=tokens.device, dtype=torch.int64) * 1_000_003 + 7).remainder(_HASH_PRIME - 1) + 1
    products = (ids * weights).remainder(_HASH_PRIME)
    return products.sum().remainder(_HASH_PRIME).to(torch.float64)


def probability_rows(lse: Tensor, columns: int | Tensor, temperature: float) -> Tensor:
    """``[2, inputs]`` float64 counts, on the device (no host sync; ``columns`` may be a 0-d tensor there): per input
    (a row of ``lse``, ``[inputs, rows]`` log-sum-exps of ``x / T`` over ``columns`` columns), the rows that look like
    probabilities, and the rows with mass (a finite log-sum-exp).

    With ``p_v`` in ``[0, 1]`` summing to 1, convexity of ``exp`` on ``[0, 1/T]`` gives ``1 + p/T <= exp(p/T) <=
    1 + p (e^(1/T) - 1)``, so ``log(n + 1/T) <= lse <= log(n + e^(1/T) - 1)``: a band of width ~0.72/n just above
    ``log n``, which real logits (whose log-sum-exp is set by their largest values) hit only by chance
    (:func:`warn_if_probabilities` confirms). It is widened by the rounding of an fp32 log-sum-exp, and never by more
    than a quarter of its distance to ``log n`` (the all-zero row).
    """
    n = torch.as_tensor(columns, dtype=torch.float64, device=lse.device)
    inv_t = 1.0 / temperature
    lo, hi = torch.log(n + inv_t), torch.log(n + math.expm1(inv_t))
    slack = torch.minimum(0.25 * (lo - torch.log(n)), 4 * torch.finfo(torch.float32).eps * hi.abs())
    x = lse.to(torch.float64)
    inside = (x >= lo - slack) & (x <= hi + slack) & (n >= 3)
    return torch.stack((inside.sum(dim=-1), torch.isfinite(x).sum(dim=-1))).to(torch.float64)


def local_meta(info: CallInfo, lse: Tensor, tokens: Tensor | None, mask: Tensor | None) -> Tensor:
    """The metadata vector of this rank, ``[NUM_META]`` float64 on the device of ``lse``.

    Args:
        info: what this rank knows about the call.
        lse: ``[1 or 2, rows]`` this rank's log-sum-exps of each input over its slice (scaled by ``1/T``).
        tokens: ``[rows]`` global ids, or ``None``.
        mask: the per-token mask, or ``None``.

    Non-finite inputs show up in the log-sum-exps for free: a NaN anywhere in a row makes its log-sum-exp NaN, a
    ``+inf`` makes it ``+inf``, so no extra pass over the logits is needed, and the probabilities look-alike is read
    off them too. What is known on the host travels to the device in one copy and what is computed on the device is
    a handful of small kernels (a GPU call pays a launch for each), so the vector costs a few launches.
    """
    device = lse.device
    layout = info.layout
    host = [0.0] * NUM_META
    host[KEPT] = float(info.kept)
    host[START] = float(layout.start)
    host[STOP] = float(layout.stop)
    host[LAYOUT_GIVEN] = float(info.layout_given)
    host[DECLARED_VOCAB] = -1.0 if layout.vocab_size is None else float(layout.vocab_size)
    host[VALID_VOCAB] = -1.0 if layout.valid_vocab_size is None else float(layout.valid_vocab_size)
    host[HAS_TOKENS] = float(tokens is not None)
    host[ROWS] = float(info.rows)
    host[SHAPE] = float(_shape_code(info.lead_shape))
    host[P_DTYPE] = float(_DTYPE_CODES.get(info.p_dtype, 9))
    host[Q_DTYPE] = -1.0 if info.q_dtype is None else float(_DTYPE_CODES.get(info.q_dtype, 9))
    host[TEMPERATURE] = info.temperature
    host[NAN_POLICY] = float(NAN_POLICIES.index(info.nan_policy))
    host[OPTIONS] = float(info.options_code)
    host[FIRST_BAD] = -1.0
    host[NO_PROCESS_GROUP] = float(info.no_process_group)
    out = torch.tensor(host, dtype=torch.float64).to(device)

    # NaN and +inf rows of P (and Q): counts per kind, and the first bad row
    two = lse.shape[0] == 2
    flags = torch.cat((torch.isnan(lse), lse == float("inf")))  # [NaN P, (NaN Q,) +inf P, (+inf Q)] x rows
    kinds = [P_NAN, Q_NAN, P_POSINF, Q_POSINF] if two else [P_NAN, P_POSINF]
    out[kinds] = flags.sum(dim=1).to(torch.float64)
    if flags.shape[1]:
        bad = flags.any(dim=0)
        # argmax returns the first maximum: the first bad row, or -1 when every row is finite
        out[FIRST_BAD] = torch.where(bad.any(), bad.to(torch.uint8).argmax(), -1).to(torch.float64)
    if tokens is not None and tokens.numel() > 0:
        out[[TOKEN_MIN, TOKEN_MAX]] = torch.stack((tokens.min(), tokens.max())).to(torch.float64)
        out[[TOKEN_SUM, TOKEN_HASH]] = torch.stack((tokens.to(torch.float64).sum(), token_hash(tokens)))
    if mask is not None and mask.numel() and mask.dtype != torch.bool:
        out[MASK_BAD] = ((mask != 0) & (mask != 1)).sum().to(torch.float64)
    # probabilities passed as logits, or a softmax taken over this rank's slice: any rows, either input
    counts = probability_rows(lse, info.kept, info.temperature)
    inputs = lse.shape[0]
    out[[P_PROBABILITY_ROWS, Q_PROBABILITY_ROWS][:inputs]] = counts[0]
    out[[P_MASS_ROWS, Q_MASS_ROWS][:inputs]] = counts[1]
    return out


def _disagree(meta: list[list[float]], index: int) -> bool:
    return any(row[index] != meta[0][index] for row in meta)


def _per_rank(meta: list[list[float]], index: int) -> str:
    return ", ".join(f"rank {r}: {row[index]:g}" for r, row in enumerate(meta))


_EQUAL_SPLIT_HINT = (
    ". No layout= was given, so this call assumed Megatron's equal split (rank r holds [r * V_local, "
    "(r + 1) * V_local)); for any other split pass layout=shardkl.VocabLayout(start, stop, group=group)"
)


def _check_layout(meta: list[list[float]], *, offsets_used: bool) -> int:
    """Check the ranks' slices; returns the padded global vocabulary size."""
    slices = [(int(row[START]), int(row[STOP])) for row in meta]
    total = slices[-1][1] if slices else 0
    if _disagree(meta, LAYOUT_GIVEN):
        raise ValueError("some ranks passed layout= and others did not; pass one on every rank or on none")
    given = bool(meta[0][LAYOUT_GIVEN])
    if given or offsets_used:
        check_tiling(slices, "" if given else _EQUAL_SPLIT_HINT)
    else:
        total = int(sum(row[STOP] - row[START] for row in meta))
    declared = {int(row[DECLARED_VOCAB]) for row in meta if row[DECLARED_VOCAB] >= 0}
    if len(declared) > 1:
        raise ValueError(f"ranks declared different vocab_size values: {_per_rank(meta, DECLARED_VOCAB)}")
    if declared and total != next(iter(declared)):
        raise ValueError(
            f"the ranks' slices hold {total} ids, but the layout declares vocab_size={next(iter(declared))} "
            f"(slices: {', '.join(f'rank {r}: [{a}, {b})' for r, (a, b) in enumerate(slices))})"
        )
    if _disagree(meta, VALID_VOCAB):
        raise ValueError(f"ranks passed different valid_vocab_size values: {_per_rank(meta, VALID_VOCAB)}")
    valid = int(meta[0][VALID_VOCAB])
    if valid > total:
        raise ValueError(
            f"valid_vocab_size must be <= the padded vocabulary size {total} (the sum of the ranks' slices), "
            f"got {valid}"
        )
    return total


def check_gathered(
    meta: list[list[float]],
    *,
    validate: bool,
    shape: torch.Size,
    names: tuple[str, str] = ("p_logits", "q_logits"),
    offsets_used: bool = False,
) -> int:
    """Raise the same ``ValueError`` on every rank if the ranks' calls do not fit together.

    Args:
        meta: the gathered metadata, one list per rank in rank order.
        validate: run the cross-rank agreement checks (the layout, token, mask and NaN checks always run: they are
            what keeps a wrong offset, token id or NaN from becoming a plausible number).
        shape: this rank's leading shape, for the message.
        names: the public names of the two inputs, for the messages.
        offsets_used: the call reads global ids other than tokens (a top-k teacher's), so the default equal split
            must hold.

    Returns:
        The number of real vocabulary ids (``valid_vocab_size``, or the padded size without one).
    """
    codes = {v: k for k, v in _DTYPE_CODES.items()}
    if validate:
        if _disagree(meta, ROWS) or _disagree(meta, SHAPE):
            raise ValueError(
                f"ranks passed logits with different leading shapes (this rank: {tuple(shape)}); token counts "
                f"per rank: {_per_rank(meta, ROWS)}. Every rank of the group must pass the same tokens"
            )
        for index, name in ((P_DTYPE, names[0]), (Q_DTYPE, names[1])):
            if _disagree(meta, index):
                dtypes = ", ".join(f"rank {r}: {codes.get(int(row[index]), 'none')}" for r, row in enumerate(meta))
                raise ValueError(f"ranks passed {name} of different dtypes ({dtypes}); use one dtype on every rank")
        if _disagree(meta, TEMPERATURE):
            raise ValueError(f"ranks passed different temperatures ({_per_rank(meta, TEMPERATURE)})")
        if _disagree(meta, HAS_TOKENS):
            raise ValueError("some ranks passed tokens and others did not; pass the same tokens on every rank")
        if _disagree(meta, NAN_POLICY) or _disagree(meta, OPTIONS):
            raise ValueError("ranks passed different options (impl, nan_policy or validate); use one on every rank")
    has_tokens = bool(meta[0][HAS_TOKENS])
    total = _check_layout(meta, offsets_used=offsets_used or has_tokens or meta[0][VALID_VOCAB] >= 0)
    valid = int(meta[0][VALID_VOCAB]) if meta[0][VALID_VOCAB] >= 0 else total
    if has_tokens and any(row[ROWS] > 0 for row in meta):
        lo = int(min(row[TOKEN_MIN] for row in meta))
        hi = int(max(row[TOKEN_MAX] for row in meta))
        if lo < 0 or hi >= valid:
            what = "the valid vocabulary size" if valid != total else "the vocabulary size, summed over the shards"
            raise ValueError(
                f"tokens must be ids in [0, {valid}) ({what}), got min {lo} and max {hi}"
                + _no_process_group_hint(int(meta[0][NO_PROCESS_GROUP]))
            )
    if has_tokens and not _disagree(meta, HAS_TOKENS) and (_disagree(meta, TOKEN_SUM) or _disagree(meta, TOKEN_HASH)):
        # the ids are read where each rank holds them: ranks with other tokens would mix tokens (-inf log-probs)
        sums = ", ".join(f"rank {r}: {row[TOKEN_SUM]:.0f}" for r, row in enumerate(meta))
        raise ValueError(
            f"ranks passed different tokens (sums of the ids: {sums}; or the same ids in another order); every rank "
            "of the vocabulary group must pass the same token ids, in the same order"
        )
    for r, row in enumerate(meta):
        if row[MASK_BAD] > 0:
            raise ValueError(
                f"mask must be bool or hold only 0 and 1, got {int(row[MASK_BAD])} other value(s) on rank {r}"
            )
    if meta[0][NAN_POLICY] == NAN_POLICIES.index("raise"):
        for r, row in enumerate(meta):
            for index, name, what in (
                (P_NAN, names[0], "NaN"),
                (P_POSINF, names[0], "+inf"),
                (Q_NAN, names[1], "NaN"),
                (Q_POSINF, names[1], "+inf"),
            ):
                if row[index] > 0:
                    raise ValueError(
                        f"{name} holds {what} in {int(row[index])} token row(s) of rank {r}'s vocabulary slice "
                        f"(first at flat token index {int(row[FIRST_BAD])}); logits must be finite or -inf. "
                        "Pass options=shardkl.Options(nan_policy='propagate') to get NaN results for those tokens"
                    )
    return valid


def _no_process_group_hint(world: int) -> str:
    if world <= 1:
        return ""
    return (
        f". WORLD_SIZE={world} says this process is one of {world} ranks, but no group was given and "
        "torch.distributed is not initialized: each rank computed over its own slice as if it were the whole "
        "vocabulary. Call torch.distributed.init_process_group() and pass group= (or layout=, or DTensors)"
    )


def no_process_group_world() -> int:
    """``WORLD_SIZE`` when the environment launched several ranks (torchrun) but ``torch.distributed`` is not
    initialized, else 0: a call without a group then silently computes over each rank's own slice."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0
    return world if world > 1 and not is_initialized() else 0


_warned_no_process_group = False


def warn_if_no_process_group(world: int) -> None:
    """Warn once per process that a call without a group runs in a multi-rank environment without a process
    group (see :func:`no_process_group_world`)."""
    global _warned_no_process_group
    if world <= 1 or _warned_no_process_group:
        return
    _warned_no_process_group = True
    warnings.warn("shardkl: " + _no_process_group_hint(world)[2:], UserWarning, stacklevel=4)


_warned_probabilities = False


def warn_if_probabilities(
    meta: list[list[float]],
    global_rows: list[float],
    names: tuple[str, ...],
    in_unit_interval: Callable[[int], bool],
) -> None:
    """Warn once per process when an input looks like probabilities rather than logits: over one rank's slice (a
    softmax taken per slice, or probabilities of the whole vocabulary on one rank), or over the whole vocabulary.

    The log-sum-exps flag the rows (:func:`probability_rows`: ``meta`` per rank, ``global_rows`` after the merge of
    the ranks, empty on one rank); a flagged input is then confirmed on this rank by one look at its values, which
    must all lie in ``[0, 1]`` (``in_unit_interval(i)`` for input ``i``): real logits whose log-sum-exp falls into the
    band by chance (a tiny model over a tiny vocabulary) never pass that, and the look is paid only when flagged.
    """
    global _warned_probabilities
    if _warned_probabilities:
        return
    inputs = len(global_rows) // 2
    for i, (band, name) in enumerate(zip((P_PROBABILITY_ROWS, Q_PROBABILITY_ROWS), names, strict=False)):
        ranks = [r for r, row in enumerate(meta) if row[band] > 0]
        whole = i < inputs and global_rows[i] > 0
        if not (ranks or whole) or not in_unit_interval(i):
            continue
        if whole:
            where = f"{int(global_rows[i])} row(s) of {name} look like probabilities over the whole vocabulary"
        else:
            where = (
                f"{name} looks like probabilities over the vocabulary slice of rank(s) {ranks} "
                f"({int(max(meta[r][band] for r in ranks))} row(s))"
            )
        _warned_probabilities = True
        warnings.warn(
            f"shardkl: {where}: values in [0, 1] summing to 1, whose log-sum-exp is log(V) + ~1/V. Pass logits "
            "(or log-probabilities) of the whole vocabulary: softmax of probabilities is nearly uniform and gives "
            "a divergence near 0",
            UserWarning,
            stacklevel=5,
        )
        return
