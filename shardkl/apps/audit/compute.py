"""One forward batch of an audit: every per-token value from the two models' hidden states, never their logits.

For a batch of windows (right-padded; causal attention means padding never changes a real position), each model's
trunk gives hidden states; the scored positions (those with a next token in their window) are gathered into
``[N, H]`` rows, and with this rank's rows of each output layer one :func:`shardkl.compare_stats` call gives
KL(P‖Q), KL(Q‖P), both entropies, log P and log Q of the next token, and both top-1 ids, from one pass over the
logit tiles (each tile's matmul is done once for all of them) and one all-gather over the tensor-parallel group.
With ``--estimators S`` the S tokens drawn from P (:func:`shardkl.sample_tokens`, one more pass over P's tiles and one
all-gather) ride in the same call as S more ids per position, and their log-ratios give k1/k2/k3.

Each side is a :class:`shardkl.LinearLogits`, so no ``[N, V_local]`` tensor exists; ``materialise=True`` computes the
logits of this rank's rows as tensors instead and hands those to the same calls (the comparison of the docs).
The positions go through these calls in blocks of rows (:func:`token_block`) so that the per-token floats a call
keeps (the engine's partial results of a few vocabulary blocks at a time) stay near 1% of the batch's logits.
Everything runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

import shardkl
from shardkl.apps.audit.models import ModelSide, hidden_states
from shardkl.estimators import SAMPLED_ESTIMATORS, from_log_ratio
from shardkl.layout import VocabLayout
from shardkl.linear import LinearLogits, logits_tile

TRANSIENT_SHARE = 0.01
"""What one call's per-token temporaries may hold, as a share of one model's full float32 logits of the batch."""
MIN_BLOCK_ROWS = 256
"""Rows per call at least (a small vocabulary would otherwise cut a batch into many tiny calls)."""
FLOATS_PER_ROW = 8 * 12
FLOATS_PER_ID = 8 * 2
"""Per-token floats a :func:`shardkl.compare_stats` call keeps: the partial results of up to 8 vocabulary blocks
(12 floats, and 2 per id the log-probs are read at) before it merges them."""


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


def _logits(hidden: Tensor, side: ModelSide) -> Tensor:
    """This rank's ``[N, V_local]`` float32 logits, materialised (the comparison mode)."""
    return logits_tile(hidden, side.weight, side.bias, torch.float32)


@dataclass(frozen=True)
class Positions:
    """The scored positions of a batch and both models' hidden states there.

    Attributes:
        row: ``[N]`` the window (row of the batch) of each scored position.
        offset: ``[N]`` its position in the window.
        token: ``[N]`` the actual next token.
        hidden_p: ``[N, H_p]`` P's last hidden states at those positions.
        hidden_q: ``[N, H_q]`` Q's.
    """

    row: Tensor
    offset: Tensor
    token: Tensor
    hidden_p: Tensor
    hidden_q: Tensor


@torch.no_grad()
def run_trunks(p: ModelSide, q: ModelSide, ids: Tensor, lengths: Tensor) -> Positions:
    """Both models' trunks over a batch of windows, and the rows of the positions that are scored.

    Args:
        p, q: the two models.
        ids: ``[B, T]`` token ids of the windows, right-padded (any id) beyond each window's length.
        lengths: ``[B]`` tokens of each window (>= 2).

    Returns:
        :class:`Positions`: the ``N`` scored positions, window by window, with both models' hidden states there.
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
    return Positions(row, offset, tokens, hidden_p, hidden_q)


def token_block(tokens: int, vocab: int, ids: int = 1, *, min_rows: int = MIN_BLOCK_ROWS) -> int:
    """Rows per call so that each call's per-token temporaries stay under :data:`TRANSIENT_SHARE` of the batch's
    logits.

    A call keeps :data:`FLOATS_PER_ROW` + ``ids`` x :data:`FLOATS_PER_ID` floats per row, against ``tokens x vocab``
    logits for the batch. The batch is split into equal blocks of at least ``min_rows`` rows. The blocks depend only
    on the batch and the models, never on the ranks, so every split draws the same tokens.

    Args:
        tokens: scored positions in the batch.
        vocab: the real vocabulary size (all ranks together).
        ids: ids per position the log-probs are read at (the next token, and the draws with ``--estimators``).
        min_rows: the fewest rows of a block.

    Returns:
        Rows per call (the last block may hold fewer).
    """
    blocks = max(1, math.ceil((FLOATS_PER_ROW + ids * FLOATS_PER_ID) / (TRANSIENT_SHARE * vocab)))
    blocks = max(1, min(blocks, tokens // max(1, min_rows)))
    return math.ceil(tokens / blocks)


@torch.no_grad()
def score_positions(
    p: ModelSide,
    q: ModelSide,
    positions: Positions,
    *,
    layout: VocabLayout,
    estimators: int = 0,
    seed: int = 0,
    stream: str = "audit",
    materialise: bool = False,
) -> ScoredBatch:
    """Every per-token value at the scored positions, from the hidden states and this rank's output-layer rows.

    Args:
        p: the reference model and this rank's rows of its output layer.
        q: the audited model, likewise.
        positions: from :func:`run_trunks`.
        layout: this rank's slice of the vocabulary and the tensor-parallel group.
        estimators: tokens drawn from P per position for k1/k2/k3 (0: none).
        seed: seed of the draws.
        stream: noise stream of the draws (the batch's identity: the same draws for any number of ranks).
        materialise: build the logits as tensors (comparison mode) instead of :class:`shardkl.LinearLogits`.

    Returns:
        :class:`ScoredBatch`, the same on every rank of the group.
    """
    n = positions.token.shape[0]
    vocab = layout.valid_vocab_size or layout.vocab_size or layout.local_size
    # the comparison mode materialises the whole batch's logits at once, as an audit without shardkl's sources would
    block = n if materialise else token_block(n, vocab, estimators + 1)
    parts = []
    with warnings.catch_warnings():
        # The engine gets hidden @ W of each model's own output layer, logits by construction: its warning that a row
        # "looks like probabilities" can only be a false alarm here (a near-uniform row of a weakly trained model).
        warnings.filterwarnings("ignore", message=r"shardkl: .* like probabilities")
        for r0 in range(0, n, block):
            rows = slice(r0, min(n, r0 + block))
            parts.append(_score_rows(
                p, q, positions.token[rows], positions.hidden_p[rows], positions.hidden_q[rows], layout=layout,
                estimators=estimators, seed=seed, stream=f"{stream}/rows{r0}", materialise=materialise,
            ))
    values = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    return ScoredBatch(row=positions.row.cpu(), offset=positions.offset.cpu(), token=positions.token.cpu(), **values)


def _score_rows(
    p: ModelSide,
    q: ModelSide,
    tokens: Tensor,
    hidden_p: Tensor,
    hidden_q: Tensor,
    *,
    layout: VocabLayout,
    estimators: int,
    seed: int,
    stream: str,
    materialise: bool,
) -> dict[str, Tensor]:
    """The values of one block of positions: one ``compare_stats`` call (and the draws)."""
    p_src: LinearLogits | Tensor
    q_src: LinearLogits | Tensor
    if materialise:
        p_src, q_src = _logits(hidden_p, p), _logits(hidden_q, q)
    else:
        p_src, q_src = LinearLogits(hidden_p, p.weight, p.bias), LinearLogits(hidden_q, q.weight, q.bias)
    ids = tokens
    if estimators:
        # One all-gather of (max, id) per draw and position over the group: the same draws on every rank.
        drawn = shardkl.sample_tokens(p_src, seed=seed, layout=layout, num_samples=estimators, stream=stream)
        # [n, 1 + S]: the actual next token, then a position's draws side by side
        ids = torch.cat([tokens.unsqueeze(-1), drawn.to(tokens.device).transpose(0, 1)], dim=-1)
    # One all-gather of a few floats per token over the group, whatever the vocabulary.
    stats = shardkl.compare_stats(p_src, q_src, ids, layout=layout)
    assert stats.p_logprobs is not None and stats.q_logprobs is not None
    logp, logq = stats.p_logprobs, stats.q_logprobs
    out = {
        "kl_pq": stats.kl_pq, "kl_qp": stats.kl_qp,
        "logp_p": logp[:, 0] if estimators else logp, "logp_q": logq[:, 0] if estimators else logq,
        "entropy_p": stats.entropy_p, "entropy_q": stats.entropy_q, "top1_p": stats.top1_p, "top1_q": stats.top1_q,
    }
    if estimators:
        log_ratio = logq[:, 1:] - logp[:, 1:]
        for name in SAMPLED_ESTIMATORS:
            out[name] = from_log_ratio(log_ratio, name)  # type: ignore[arg-type]
    return {name: value.cpu() for name, value in out.items()}


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
    """Every per-token value of one batch of windows: :func:`run_trunks`, then :func:`score_positions`.

    Args:
        p, q: the two models and this rank's rows of their output layers.
        ids: ``[B, T]`` token ids of the windows, right-padded (any id) beyond each window's length.
        lengths: ``[B]`` tokens of each window (>= 2).
        layout, estimators, seed, stream, materialise: as in :func:`score_positions`.

    Returns:
        :class:`ScoredBatch`, the same on every rank of the group.
    """
    positions = run_trunks(p, q, ids, lengths)
    return score_positions(p, q, positions, layout=layout, estimators=estimators, seed=seed, stream=stream,
                           materialise=materialise)


__all__ = ["Positions", "ScoredBatch", "run_trunks", "score_batch", "score_positions", "token_block"]
