"""One forward batch of an audit: every per-token value from the two models' hidden states, never their logits.

For a batch of windows (right-padded; causal attention means padding never changes a real position), each model's
trunk gives hidden states; the scored positions (those with a next token in their window) are gathered into
``[N, H]`` rows, and with this rank's rows of each output layer:

- ``kl_stats(P, Q, tokens)``: KL(P‖Q), entropy of P, log P(next), log Q(next) (one all-gather over the tensor-parallel
  group); with ``--estimators S`` the S tokens drawn from P (:func:`shardkl.sample_tokens`) ride in the same call as
  S more rows of tokens, and their log-ratios give k1/k2/k3;
- ``kl_stats(Q, P)``: KL(Q‖P) and the entropy of Q (one all-gather);
- top-1 ids: a local argmax over this rank's rows, one ``[rows, columns]`` logits tile at a time, then one all-gather
  of (max, global id) per token (:func:`shardkl.distributed.argmax_over_ranks`).

Each side is a :class:`shardkl.LinearLogits`, so no ``[N, V_local]`` tensor exists; ``materialise=True`` computes the
logits of this rank's rows as tensors instead and hands those to the same calls (the comparison of the docs).
Everything runs under ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import shardkl
from shardkl.apps.audit.models import ModelSide, hidden_states
from shardkl.distributed import argmax_over_ranks
from shardkl.layout import VocabLayout
from shardkl.linear import LinearLogits, logits_tile

TILE_ELEMENTS = 1 << 20
"""Logits in one tile of the top-1 pass (4 MiB in float32)."""
TILE_COLUMNS = 4096


@dataclass(frozen=True)
class ScoredBatch:
    """Per-token values of one batch, ``[N]`` each (``[N, S]`` for the estimators), in window-major order.

    Attributes:
        row: the window (row of the batch) of each scored position.
        offset: its position in the window.
    """

    row: Tensor
    offset: Tensor
    token: Tensor
    kl_pq: Tensor
    kl_qp: Tensor
    logp_p: Tensor
    logp_q: Tensor
    entropy_p: Tensor
    entropy_q: Tensor
    top1_p: Tensor
    top1_q: Tensor
    k1: Tensor | None = None
    k2: Tensor | None = None
    k3: Tensor | None = None


def _local_argmax(source: LinearLogits | Tensor, kept: int) -> tuple[Tensor, Tensor]:
    """Float64 ``(max, local index)`` per row over the first ``kept`` columns of this rank's logits, a tile at a
    time (a first maximum wins a tie, as in ``argmax``)."""
    if isinstance(source, Tensor):
        rows = source.shape[0]
    else:
        rows = source.hidden.shape[0]
    best = torch.full((rows,), float("-inf"), dtype=torch.float64)
    best_id = torch.full((rows,), -1.0, dtype=torch.float64)
    if kept == 0 or rows == 0:
        return best, best_id
    columns = min(kept, TILE_COLUMNS)
    step = max(1, TILE_ELEMENTS // columns)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block_best = torch.full((r1 - r0,), float("-inf"), dtype=torch.float64)
        block_id = torch.full((r1 - r0,), -1.0, dtype=torch.float64)
        for c0 in range(0, kept, columns):
            c1 = min(kept, c0 + columns)
            if isinstance(source, Tensor):
                tile = source[r0:r1, c0:c1]
            else:
                bias = None if source.bias is None else source.bias[c0:c1]
                tile = logits_tile(source.hidden[r0:r1], source.weight[c0:c1], bias, torch.float32)
            value, index = tile.max(dim=-1)
            value = value.double().cpu()
            # strict: an earlier column keeps a tie
            better = value > block_best
            block_best = torch.where(better, value, block_best)
            block_id = torch.where(better, (index.cpu() + c0).double(), block_id)
        best[r0:r1], best_id[r0:r1] = block_best, block_id
    return best, best_id


def top1_ids(source: LinearLogits | Tensor, layout: VocabLayout) -> Tensor:
    """Global id of each row's largest logit over the sharded vocabulary, without materialising the logits.

    Args:
        source: this rank's logits ``[N, V_local]``, as a :class:`shardkl.LinearLogits` or a tensor.
        layout: this rank's slice (its padding, beyond ``valid_vocab_size``, is never a candidate).

    Returns:
        ``[N]`` int64 ids, the same on every rank of ``layout.group`` (a tie goes to the lowest id).
    """
    best, local = _local_argmax(source, layout.kept_size)
    global_id = torch.where(local >= 0, local + layout.start, local)
    # One all-gather of (local max, global id) per row over the tensor-parallel group: every rank picks the winner.
    return argmax_over_ranks(best, global_id, layout.group, bounds=(layout.start, layout.stop))


def _logits(hidden: Tensor, side: ModelSide) -> Tensor:
    """This rank's ``[N, V_local]`` float32 logits, materialised (the comparison mode)."""
    return logits_tile(hidden, side.weight, side.bias, torch.float32)


@torch.no_grad()
def score_batch(
    p: ModelSide,
    q: ModelSide,
    ids: Tensor,
    lengths: Tensor,
    *,
    layout: VocabLayout,
    estimators: int = 0,
    seed: int = 0,
    stream: str = "audit",
    materialise: bool = False,
) -> ScoredBatch:
    """Every per-token value of one batch of windows.

    Args:
        p: the reference model and this rank's rows of its output layer.
        q: the audited model, likewise.
        ids: ``[B, T]`` token ids of the windows, right-padded (any id) beyond each window's length.
        lengths: ``[B]`` tokens of each window (>= 2).
        layout: this rank's slice of the vocabulary and the tensor-parallel group.
        estimators: tokens drawn from P per position for k1/k2/k3 (0: none).
        seed: seed of the draws.
        stream: noise stream of the draws (the batch's identity: the same draws for any number of ranks).
        materialise: build the logits as tensors (comparison mode) instead of :class:`shardkl.LinearLogits`.

    Returns:
        :class:`ScoredBatch`, the same on every rank of the group.
    """
    device = p.weight.device
    ids = ids.to(device)
    width = ids.shape[1]
    # scored: position t of a window predicts the token at t + 1 in the same window
    offsets = torch.arange(width - 1, device=device)
    scored = offsets.unsqueeze(0) < (lengths.to(device) - 1).unsqueeze(1)
    row, offset = scored.nonzero(as_tuple=True)
    tokens = ids[:, 1:][scored]
    hidden_p = hidden_states(p, ids)[:, :-1][scored]
    hidden_q = hidden_states(q, ids)[:, :-1][scored]
    p_src: LinearLogits | Tensor
    q_src: LinearLogits | Tensor
    if materialise:
        p_src, q_src = _logits(hidden_p, p), _logits(hidden_q, q)
    else:
        p_src, q_src = LinearLogits(hidden_p, p.weight, p.bias), LinearLogits(hidden_q, q.weight, q.bias)
    n = tokens.shape[0]

    drawn = None
    stacked = tokens
    p_rows, q_rows = p_src, q_src
    if estimators:
        drawn = shardkl.sample_tokens(p_src, seed=seed, layout=layout, num_samples=estimators, stream=stream)
        # the actual next tokens and the S draws in one call: S + 1 rows of tokens over the same positions
        stacked = torch.cat([tokens.unsqueeze(0), drawn.to(device)])
        p_rows, q_rows = _expand(p_src, estimators + 1), _expand(q_src, estimators + 1)
    forward = shardkl.kl_stats(p_rows, q_rows, stacked, layout=layout)
    reverse = shardkl.kl_stats(q_src, p_src, layout=layout)
    top1_p, top1_q = top1_ids(p_src, layout), top1_ids(q_src, layout)
    assert forward.p_logprobs is not None and forward.q_logprobs is not None

    def first(x: Tensor) -> Tensor:
        return x[0] if estimators else x

    out = ScoredBatch(
        row=row.cpu(), offset=offset.cpu(), token=tokens.cpu(),
        kl_pq=first(forward.exact_kl).cpu(), kl_qp=reverse.exact_kl.cpu(),
        logp_p=first(forward.p_logprobs).cpu(), logp_q=first(forward.q_logprobs).cpu(),
        entropy_p=first(forward.entropy).cpu(), entropy_q=reverse.entropy.cpu(),
        top1_p=top1_p.cpu(), top1_q=top1_q.cpu(),
    )
    if drawn is not None:
        ks = [getattr(forward, name) for name in ("k1", "k2", "k3")]
        # [S, N] -> [N, S]: a token's draws side by side
        k1, k2, k3 = (k[1:].transpose(0, 1).reshape(n, estimators).cpu() for k in ks)
        out = ScoredBatch(**{**out.__dict__, "k1": k1, "k2": k2, "k3": k3})
    return out


def _expand(source: LinearLogits | Tensor, copies: int) -> LinearLogits | Tensor:
    """``copies`` rows of the same positions, as an expanded view (never copied here)."""
    if isinstance(source, Tensor):
        return source.unsqueeze(0).expand(copies, *source.shape)
    return LinearLogits(source.hidden.unsqueeze(0).expand(copies, *source.hidden.shape), source.weight, source.bias)


__all__ = ["ScoredBatch", "TILE_COLUMNS", "TILE_ELEMENTS", "score_batch", "top1_ids"]
