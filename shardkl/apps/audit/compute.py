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
The positions go through these calls in blocks of rows (:func:`token_block`) so that the per-token temporaries of a
call (the engine gathers each token's hidden and output-layer rows for its log-prob) stay near 1% of the batch's
logits. Everything runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

import shardkl
from shardkl.apps.audit.models import ModelSide, hidden_states
from shardkl.distributed import argmax_over_ranks
from shardkl.layout import VocabLayout
from shardkl.linear import LinearLogits, logits_tile

TILE_ELEMENTS = 1 << 18
"""Logits in one tile of the top-1 pass on the CPU (1 MiB in float32), as the library's own tiles."""
CUDA_TILE_ELEMENTS = 1 << 22
TILE_COLUMNS = 4096
TRANSIENT_SHARE = 0.01
"""What one call's per-token temporaries may hold, as a share of one model's full float32 logits of the batch."""
MIN_BLOCK_ROWS = 256
"""Rows per call at least (a small vocabulary would otherwise cut a batch into many tiny calls)."""


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
    device = source.device if isinstance(source, Tensor) else source.hidden.device
    step = max(1, (CUDA_TILE_ELEMENTS if device.type == "cuda" else TILE_ELEMENTS) // columns)
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
            del tile  # before the next tile exists: one tile at a time
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


def token_block(tokens: int, hidden: int, vocab: int, copies: int = 1, *, min_rows: int = MIN_BLOCK_ROWS) -> int:
    """Rows per call so that each call's per-token temporaries stay under :data:`TRANSIENT_SHARE` of the batch's
    logits.

    The engine's token log-probs gather each token's hidden row and output-layer row (about ``3 x rows x H`` floats
    per side, ``copies`` rows of tokens per position with ``--estimators``), against ``tokens x vocab`` logits. The
    batch is split into equal blocks of at least ``min_rows`` rows. The blocks depend only on the batch and the
    models, never on the ranks, so every split draws the same tokens.

    Args:
        tokens: scored positions in the batch.
        hidden: the larger hidden size of the two models.
        vocab: the real vocabulary size (all ranks together).
        copies: rows of tokens per position in the forward call (1 + draws).
        min_rows: the fewest rows of a block.

    Returns:
        Rows per call (the last block may hold fewer).
    """
    blocks = max(1, math.ceil(3 * hidden * copies / (TRANSIENT_SHARE * vocab)))
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
    hidden = max(positions.hidden_p.shape[-1], positions.hidden_q.shape[-1])
    # the comparison mode materialises the whole batch's logits at once, as an audit without shardkl's sources would
    block = n if materialise else token_block(n, hidden, vocab, estimators + 1)
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
    """The values of one block of positions: two ``kl_stats`` calls, two top-1 passes (and the draws)."""
    p_src: LinearLogits | Tensor
    q_src: LinearLogits | Tensor
    if materialise:
        p_src, q_src = _logits(hidden_p, p), _logits(hidden_q, q)
    else:
        p_src, q_src = LinearLogits(hidden_p, p.weight, p.bias), LinearLogits(hidden_q, q.weight, q.bias)
    n = tokens.shape[0]
    stacked = tokens
    p_rows, q_rows = p_src, q_src
    if estimators:
        # One all-gather of (max, id) per draw and position over the group: the same draws on every rank.
        drawn = shardkl.sample_tokens(p_src, seed=seed, layout=layout, num_samples=estimators, stream=stream)
        # the actual next tokens and the S draws in one call: S + 1 rows of tokens over the same positions
        stacked = torch.cat([tokens.unsqueeze(0), drawn.to(tokens.device)])
        p_rows, q_rows = _expand(p_src, estimators + 1), _expand(q_src, estimators + 1)
    # One all-gather of a few floats per token over the group: KL(P||Q), P's entropy, both log-probs.
    forward = shardkl.kl_stats(p_rows, q_rows, stacked, layout=layout)
    # One all-gather of a few floats per token over the group, roles exchanged: KL(Q||P) and Q's entropy.
    reverse = shardkl.kl_stats(q_src, p_src, layout=layout)
    assert forward.p_logprobs is not None and forward.q_logprobs is not None

    def first(x: Tensor) -> Tensor:
        return (x[0] if estimators else x).cpu()

    out = {
        "kl_pq": first(forward.exact_kl), "kl_qp": reverse.exact_kl.cpu(),
        "logp_p": first(forward.p_logprobs), "logp_q": first(forward.q_logprobs),
        "entropy_p": first(forward.entropy), "entropy_q": reverse.entropy.cpu(),
        # one all-gather each (inside top1_ids)
        "top1_p": top1_ids(p_src, layout).cpu(), "top1_q": top1_ids(q_src, layout).cpu(),
    }
    if estimators:
        for name in ("k1", "k2", "k3"):
            value = getattr(forward, name)
            # [S, n] -> [n, S]: a token's draws side by side
            out[name] = value[1:].transpose(0, 1).reshape(n, estimators).cpu()
    return out


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


def _expand(source: LinearLogits | Tensor, copies: int) -> LinearLogits | Tensor:
    """``copies`` rows of the same positions, as an expanded view (never copied here)."""
    if isinstance(source, Tensor):
        return source.unsqueeze(0).expand(copies, *source.shape)
    return LinearLogits(source.hidden.unsqueeze(0).expand(copies, *source.hidden.shape), source.weight, source.bias)


__all__ = [
    "Positions", "ScoredBatch", "TILE_COLUMNS", "TILE_ELEMENTS", "run_trunks", "score_batch", "score_positions",
    "token_block", "top1_ids",
]
