"""Cross-rank consistency checks that ride in the engine's one all-gather. No communication here.

Each rank appends a fixed-length metadata vector to its per-token stats (same length on every rank, whatever
the options, so the collective itself always matches). After the gather every rank holds every rank's
metadata and runs the same checks on the same numbers, so either every rank raises the same error or none
does: a mismatch never leaves one rank waiting for the others.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_NAN_POLICIES = ("raise", "propagate")

# Layout of the per-rank metadata vector (float64, so every integer below 2**53 is exact).
(
    VOCAB,
    START,
    TOKEN_MIN,
    TOKEN_MAX,
    HAS_TOKENS,
    ROWS,
    SHAPE,
    P_DTYPE,
    Q_DTYPE,
    TEMPERATURE,
    DECLARED_VOCAB,
    NAN_POLICY,
    P_NAN,
    P_POSINF,
    Q_NAN,
    Q_POSINF,
    FIRST_BAD,
) = range(17)
NUM_META = 17


def _shape_code(shape: torch.Size) -> int:
    return zlib.crc32(repr(tuple(shape)).encode())


@dataclass(frozen=True)
class CallInfo:
    """What one rank knows locally about a call, before the gather."""

    vocab: int
    start: int
    rows: int
    lead_shape: torch.Size
    p_dtype: torch.dtype
    q_dtype: torch.dtype | None
    temperature: float
    declared_vocab: int | None
    nan_policy: str


def local_meta(info: CallInfo, stats: Tensor, lse_b_row: int | None, tokens: Tensor | None) -> Tensor:
    """The metadata vector of this rank, ``[NUM_META]`` float64 on the stats' device.

    Non-finite inputs show up in the per-token stats for free: a NaN anywhere in a row makes its
    log-sum-exp NaN, a ``+inf`` makes it ``+inf``. So no extra pass over the logits is needed.
    """
    la = stats[0]
    bad_p_nan = torch.isnan(la)
    bad_p_inf = la == float("inf")
    bad = bad_p_nan | bad_p_inf
    values: list[Tensor | float] = [0.0] * NUM_META
    values[P_NAN] = bad_p_nan.sum()
    values[P_POSINF] = bad_p_inf.sum()
    if lse_b_row is not None:
        lb = stats[lse_b_row]
        bad_q_nan, bad_q_inf = torch.isnan(lb), lb == float("inf")
        values[Q_NAN], values[Q_POSINF] = bad_q_nan.sum(), bad_q_inf.sum()
        bad = bad | bad_q_nan | bad_q_inf
    # index of the first bad row (argmax returns the first maximum), or -1 when every row is finite
    first = bad.to(torch.uint8).argmax() if bad.numel() else torch.zeros((), dtype=torch.long)
    values[FIRST_BAD] = torch.where(bad.any(), first, -1) if bad.numel() else -1.0
    has_tokens = tokens is not None and tokens.numel() > 0
    values[TOKEN_MIN] = tokens.min() if has_tokens else 0.0  # type: ignore[union-attr]
    values[TOKEN_MAX] = tokens.max() if has_tokens else 0.0  # type: ignore[union-attr]
    values[HAS_TOKENS] = float(tokens is not None)
    values[VOCAB] = float(info.vocab)
    values[START] = float(info.start)
    values[ROWS] = float(info.rows)
    values[SHAPE] = float(_shape_code(info.lead_shape))
    values[P_DTYPE] = float(_DTYPE_CODES.get(info.p_dtype, 9))
    values[Q_DTYPE] = -1.0 if info.q_dtype is None else float(_DTYPE_CODES.get(info.q_dtype, 9))
    values[TEMPERATURE] = info.temperature
    values[DECLARED_VOCAB] = -1.0 if info.declared_vocab is None else float(info.declared_vocab)
    values[NAN_POLICY] = float(_NAN_POLICIES.index(info.nan_policy))
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=stats.device) for v in values])


def _disagree(meta: list[list[float]], index: int) -> bool:
    return any(row[index] != meta[0][index] for row in meta)


def _per_rank(meta: list[list[float]], index: int) -> str:
    return ", ".join(f"rank {r}: {row[index]:g}" for r, row in enumerate(meta))


def check_gathered(meta: list[list[float]], *, validate: bool, shape: torch.Size) -> None:
    """Raise the same ``ValueError`` on every rank if the ranks' calls do not fit together.

    Args:
        meta: the gathered metadata, one list per rank in rank order.
        validate: run the cross-rank checks (the token-range and NaN checks always run; they are what keeps a
            wrong token id or a NaN from becoming a plausible number).
        shape: this rank's leading shape, for the message.
    """
    codes = {v: k for k, v in _DTYPE_CODES.items()}
    if validate:
        if _disagree(meta, ROWS) or _disagree(meta, SHAPE):
            raise ValueError(
                f"ranks passed logits with different leading shapes (this rank: {tuple(shape)}); token counts "
                f"per rank: {_per_rank(meta, ROWS)}. Every rank of the group must pass the same tokens"
            )
        for index, name in ((P_DTYPE, "p_logits"), (Q_DTYPE, "q_logits")):
            if _disagree(meta, index):
                dtypes = ", ".join(f"rank {r}: {codes.get(int(row[index]), 'none')}" for r, row in enumerate(meta))
                raise ValueError(f"ranks passed {name} of different dtypes ({dtypes}); use one dtype on every rank")
        if _disagree(meta, TEMPERATURE):
            raise ValueError(f"ranks passed different temperatures ({_per_rank(meta, TEMPERATURE)})")
        if _disagree(meta, HAS_TOKENS):
            raise ValueError("some ranks passed tokens and others did not; pass the same tokens on every rank")
        if _disagree(meta, NAN_POLICY):
            raise ValueError("ranks passed different nan_policy values; use one on every rank")
        declared = {int(row[DECLARED_VOCAB]) for row in meta if row[DECLARED_VOCAB] >= 0}
        total = int(sum(row[VOCAB] for row in meta))
        if len(declared) > 1:
            raise ValueError(f"ranks declared different vocab_size values: {_per_rank(meta, DECLARED_VOCAB)}")
        if declared and total != next(iter(declared)):
            raise ValueError(
                f"local vocabulary sizes sum to {total}, but vocab_size={next(iter(declared))} was declared "
                f"(local sizes: {_per_rank(meta, VOCAB)}); each rank must pass its full slice"
            )
    total = int(sum(row[VOCAB] for row in meta))
    if meta[0][HAS_TOKENS] and any(row[ROWS] > 0 for row in meta):
        lo = int(min(row[TOKEN_MIN] for row in meta))
        hi = int(max(row[TOKEN_MAX] for row in meta))
        if lo < 0 or hi >= total:
            raise ValueError(
                f"tokens must be ids in [0, {total}) (the global vocabulary size, summed over the group's "
                f"shards), got min {lo} and max {hi}"
            )
    if meta[0][NAN_POLICY] == _NAN_POLICIES.index("raise"):
        for r, row in enumerate(meta):
            for index, name, what in (
                (P_NAN, "p_logits", "NaN"),
                (P_POSINF, "p_logits", "+inf"),
                (Q_NAN, "q_logits", "NaN"),
                (Q_POSINF, "q_logits", "+inf"),
            ):
                if row[index] > 0:
                    raise ValueError(
                        f"{name} holds {what} in {int(row[index])} token row(s) of rank {r}'s vocabulary slice "
                        f"(first at flat token index {int(row[FIRST_BAD])}); logits must be finite or -inf. "
                        "Pass nan_policy='propagate' to get NaN results for those tokens instead"
                    )
