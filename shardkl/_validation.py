"""Cross-rank checks that ride in the engine's one all-gather. No communication here.

Each rank appends a fixed-length metadata vector to its per-token stats (the same length on every rank, whatever
the options, so the collective itself always matches). After the gather every rank holds every rank's metadata and
runs the same checks on the same numbers, so either every rank raises the same error or none does: a mismatch never
leaves one rank waiting for the others, and a wrong vocabulary layout never becomes a plausible number.

Everything a rank learns about its inputs on the device (token range, NaN rows, mask values, a probabilities
look-alike) is a 0-d tensor here; the one host synchronisation of a call is reading the gathered vector.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from shardkl.distributed import check_tiling
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
    ROW0_SUM,
    ROW0_MIN,
    ROW0_MAX,
) = range(25)
NUM_META = 25


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


def local_meta(
    info: CallInfo, stats: Tensor, row0: Tensor | None, tokens: Tensor | None, mask: Tensor | None
) -> Tensor:
    """The metadata vector of this rank, ``[NUM_META]`` float64 on the stats' device.

    Non-finite inputs show up in the per-token stats for free: a NaN anywhere in a row makes its log-sum-exp NaN,
    a ``+inf`` makes it ``+inf``. So no extra pass over the logits is needed. What is known on the host travels to
    the device in one copy and what is computed on the device is a handful of small kernels (a GPU call pays a launch
    for each), so the vector costs a few launches whatever it holds.
    """
    device = stats.device
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
    # no row to look at (or logits that come from hidden states): never looks like probabilities
    host[ROW0_MIN], host[ROW0_MAX] = -1.0, 2.0
    out = torch.tensor(host, dtype=torch.float64).to(device)

    # NaN and +inf rows of P (and Q): counts per kind, and the first bad row
    two = stats.shape[0] == 4
    lse = stats[[0, 2]] if two else stats[:1]
    flags = torch.cat((torch.isnan(lse), lse == float("inf")))  # [NaN P, (NaN Q,) +inf P, (+inf Q)] x rows
    kinds = [P_NAN, Q_NAN, P_POSINF, Q_POSINF] if two else [P_NAN, P_POSINF]
    out[kinds] = flags.sum(dim=1).to(torch.float64)
    if flags.shape[1]:
        bad = flags.any(dim=0)
        # argmax returns the first maximum: the first bad row, or -1 when every row is finite
        out[FIRST_BAD] = torch.where(bad.any(), bad.to(torch.uint8).argmax(), -1).to(torch.float64)
    if tokens is not None and tokens.numel() > 0:
        out[[TOKEN_MIN, TOKEN_MAX]] = torch.stack((tokens.min(), tokens.max())).to(torch.float64)
    if mask is not None and mask.numel() and mask.dtype != torch.bool:
        out[MASK_BAD] = ((mask != 0) & (mask != 1)).sum().to(torch.float64)
    # the first row's sum, min and max over the real columns: probabilities passed as logits sum to 1 in [0, 1]
    if row0 is not None and row0.numel():
        first = row0.double()
        out[[ROW0_SUM, ROW0_MIN, ROW0_MAX]] = torch.stack((first.sum(), first.min(), first.max()))
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
    meta: list[list[float]], *, validate: bool, shape: torch.Size, names: tuple[str, str] = ("p_logits", "q_logits")
) -> int:
    """Raise the same ``ValueError`` on every rank if the ranks' calls do not fit together.

    Args:
        meta: the gathered metadata, one list per rank in rank order.
        validate: run the cross-rank agreement checks (the layout, token-range, mask and NaN checks always run:
            they are what keeps a wrong offset, token id or NaN from becoming a plausible number).
        shape: this rank's leading shape, for the message.
        names: the public names of the two inputs, for the messages.

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
    offsets_used = bool(meta[0][HAS_TOKENS]) or meta[0][VALID_VOCAB] >= 0
    total = _check_layout(meta, offsets_used=offsets_used)
    valid = int(meta[0][VALID_VOCAB]) if meta[0][VALID_VOCAB] >= 0 else total
    if meta[0][HAS_TOKENS] and any(row[ROWS] > 0 for row in meta):
        lo = int(min(row[TOKEN_MIN] for row in meta))
        hi = int(max(row[TOKEN_MAX] for row in meta))
        if lo < 0 or hi >= valid:
            what = "the valid vocabulary size" if valid != total else "the vocabulary size, summed over the shards"
            raise ValueError(f"tokens must be ids in [0, {valid}) ({what}), got min {lo} and max {hi}")
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
    _warn_if_probabilities(meta, valid, names[0])
    return valid


_warned_probabilities = False


def _warn_if_probabilities(meta: list[list[float]], valid: int, name: str) -> None:
    """Warn once per process when the first row looks like probabilities, not logits: every value in [0, 1]
    and the row summing to 1 over the whole vocabulary."""
    global _warned_probabilities
    if _warned_probabilities or valid < 3:
        return
    total = sum(row[ROW0_SUM] for row in meta)
    holding = [row for row in meta if row[KEPT] > 0]
    low = min((row[ROW0_MIN] for row in holding), default=-1.0)
    high = max((row[ROW0_MAX] for row in holding), default=2.0)
    if low >= 0.0 and high <= 1.0 and abs(total - 1.0) < 1e-2:
        _warned_probabilities = True
        warnings.warn(
            f"shardkl: the first row of {name} lies in [0, 1] and sums to 1 over the vocabulary: these look like "
            "probabilities, not logits. Pass logits (or log-probabilities); softmax of probabilities is nearly "
            "uniform and gives a KL near 0",
            UserWarning,
            stacklevel=4,
        )
