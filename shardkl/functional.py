"""Public functions of shardkl: exact KL, sampled estimators, token log-probs and entropy of sharded logits.

Every function takes this rank's contiguous slice of the vocabulary in the last dimension and says which slice
with ``group=`` (Megatron's equal split over that process group), ``layout=`` (any split, see
:class:`shardkl.VocabLayout`), or a DTensor; with none of them the tensors hold the whole vocabulary. Wherever
logits are taken, a :class:`shardkl.LinearLogits` (hidden states and this rank's output-layer rows) may stand
instead: the logits are then never materialised. Each call
runs one path: :func:`shardkl._inputs.resolve` checks and lays out the arguments, the engine issues one collective
(none in backward), and the result is reduced over the tokens where the function takes a ``reduction``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from shardkl._inputs import resolve
from shardkl._ops import CompareStats, KLStats, run_compare, run_kl
from shardkl.distributed import ProcessGroup
from shardkl.estimators import SampledEstimator, check_estimator
from shardkl.layout import VocabLayout
from shardkl.linear import Logits
from shardkl.options import Options
from shardkl.reduction import Reduction, check_reduction, reduce_checked


def kl_stats(
    p_logits: Logits,
    q_logits: Logits,
    tokens: Tensor | None = None,
    *,
    group: ProcessGroup | None = None,
    layout: VocabLayout | None = None,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    options: Options | None = None,
) -> KLStats:
    """All per-token results of two sharded policies from one collective.

    Args:
        p_logits: this rank's slice of the logits of P, the sampling distribution, ``[..., V_local]`` (or a DTensor
            sharded on its last dimension).
        q_logits: this rank's slice of the logits of Q, same shape.
        tokens: global token ids sampled from P, shaped like the logits without the last dimension, or ``None``.
        group: process group the vocabulary is split over, in Megatron's equal split; ``None`` for full-vocabulary
            tensors or DTensors.
        layout: this rank's slice for any other split (:class:`shardkl.VocabLayout`); replaces ``group``.
        temperature: P = softmax(p_logits / T), Q = softmax(q_logits / T).
        valid_vocab_size: the number of real ids; ids ``>= valid_vocab_size`` (a padded tail) count as ``-inf``
            logits and get zero gradient.
        options: how the call runs (:class:`shardkl.Options`: kernels, checks, NaN policy, timeout).

    Returns:
        :class:`KLStats`, float32 (float64 if either input is float64), differentiable with respect to both
        logits, the same on every rank of the group.

    Shape:
        logits ``[..., V_local]`` → every field ``[...]``.
    """
    call = resolve(
        p_logits, q_logits, tokens, None, group=group, layout=layout, valid_vocab_size=valid_vocab_size,
        temperature=temperature, options=options, two_inputs=True,
    )
    return run_kl(call)


def compare_stats(
    p_logits: Logits,
    q_logits: Logits,
    tokens: Tensor | None = None,
    *,
    group: ProcessGroup | None = None,
    layout: VocabLayout | None = None,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    options: Options | None = None,
) -> CompareStats:
    """Two sharded policies compared both ways, from one pass over their tiles and one collective: KL(P‖Q) and
    KL(Q‖P), both entropies, both log-probabilities at the tokens and both top-1 ids. For audits and monitoring:
    the results carry no gradient (differentiate :func:`exact_kl` or :func:`kl_stats`).

    With :class:`shardkl.LinearLogits` on both sides, each side's logit tile is computed once for all of these
    (two calls of :func:`kl_stats` and two argmax passes would compute it three times).

    Args:
        p_logits: this rank's slice of the logits of P, ``[..., V_local]`` (or a DTensor sharded on its last
            dimension).
        q_logits: this rank's slice of the logits of Q, same shape.
        tokens: global token ids, ``[...]`` (one per position) or ``[..., K]`` (K per position, e.g. the next token
            and draws from P), or ``None``.
        group, layout, temperature, valid_vocab_size, options: as in :func:`kl_stats`.

    Returns:
        :class:`CompareStats`, float32 (float64 if either input is float64; the top-1 ids int64), the same on every
        rank of the group.

    Shape:
        logits ``[..., V_local]`` → ``kl_pq``, ``kl_qp``, ``entropy_p``, ``entropy_q``, ``top1_p``, ``top1_q``
        ``[...]``; ``p_logprobs``, ``q_logprobs`` shaped like ``tokens``.
    """
    call = resolve(
        p_logits, q_logits, tokens, None, group=group, layout=layout, valid_vocab_size=valid_vocab_size,
        temperature=temperature, options=options, two_inputs=True, tokens_per_position=True,
    )
    return run_compare(call)


def exact_kl(
    p_logits: Logits,
    q_logits: Logits,
    *,
    group: ProcessGroup | None = None,
    layout: VocabLayout | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "none",
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    options: Options | None = None,
) -> Tensor:
    """Exact KL(P‖Q) per token over the full, sharded vocabulary.

    Args:
        p_logits: this rank's slice of the logits of P, ``[..., V_local]``.
        q_logits: this rank's slice of the logits of Q, same shape.
        group, layout, temperature, valid_vocab_size, options: as in :func:`kl_stats`.
        mask: bool or 0/1 tensor shaped like the result; 1 = the token counts.
        reduction: see :func:`shardkl.reduce_tokens`.

    Returns:
        Per-token KL ``[...]`` (masked tokens are 0) or a scalar; never negative, ``inf`` where P puts mass on a
        token that Q gives ``-inf``.
    """
    check_reduction(reduction)
    call = resolve(
        p_logits, q_logits, None, mask, group=group, layout=layout, valid_vocab_size=valid_vocab_size,
        temperature=temperature, options=options, two_inputs=True,
    )
    return reduce_checked(run_kl(call, entropy=False).exact_kl, call.mask, reduction)


def sampled_kl(
    p_logits: Logits,
    q_logits: Logits,
    tokens: Tensor,
    *,
    estimator: SampledEstimator = "k3",
    group: ProcessGroup | None = None,
    layout: VocabLayout | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "none",
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    options: Options | None = None,
) -> Tensor:
    """Schulman's estimator of KL(P‖Q) at tokens sampled from P.

    Args:
        p_logits: this rank's slice of the logits of P, the distribution the tokens were sampled from.
        q_logits: this rank's slice of the logits of Q, same shape.
        tokens: global token ids, ``[...]``.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
        group, layout, mask, reduction, temperature, valid_vocab_size, options: as in :func:`exact_kl`.

    Returns:
        Per-token estimates ``[...]`` or a scalar.
    """
    check_estimator(estimator)
    check_reduction(reduction)
    if tokens is None:
        raise TypeError("tokens must be a torch.Tensor of ids sampled from P, got None")
    call = resolve(
        p_logits, q_logits, tokens, mask, group=group, layout=layout, valid_vocab_size=valid_vocab_size,
        temperature=temperature, options=options, two_inputs=True,
    )
    stats = run_kl(call, entropy=False)
    values: Any = getattr(stats, estimator)
    return reduce_checked(values, call.mask, reduction)


def token_logprobs(
    logits: Logits,
    tokens: Tensor,
    *,
    group: ProcessGroup | None = None,
    layout: VocabLayout | None = None,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    options: Options | None = None,
) -> Tensor:
    """``log softmax(logits / T)`` at the global token ids, over the sharded vocabulary.

    Args:
        logits: this rank's slice of the logits, ``[..., V_local]``.
        tokens: global token ids, ``[...]``.
        group, layout, temperature, valid_vocab_size, options: as in :func:`kl_stats`.

    Returns:
        ``[...]`` log-probabilities, differentiable with respect to ``logits``.
    """
    if tokens is None:
        raise TypeError("tokens must be a torch.Tensor of global token ids, got None")
    call = resolve(
        logits, None, tokens, None, group=group, layout=layout, valid_vocab_size=valid_vocab_size,
        temperature=temperature, options=options, two_inputs=False, p_name="logits",
    )
    logp = run_kl(call, entropy=False).p_logprobs
    assert logp is not None
    return logp


def entropy(
    logits: Logits,
    *,
    group: ProcessGroup | None = None,
    layout: VocabLayout | None = None,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    options: Options | None = None,
) -> Tensor:
    """Entropy of ``softmax(logits / T)`` over the sharded vocabulary.

    Args:
        logits: this rank's slice of the logits, ``[..., V_local]``.
        group, layout, temperature, valid_vocab_size, options: as in :func:`kl_stats`.

    Returns:
        ``[...]`` entropies in nats, differentiable with respect to ``logits``.
    """
    call = resolve(
        logits, None, None, None, group=group, layout=layout, valid_vocab_size=valid_vocab_size,
        temperature=temperature, options=options, two_inputs=False, p_name="logits",
    )
    return run_kl(call).entropy


__all__ = [
    "CompareStats", "KLStats", "compare_stats", "entropy", "exact_kl", "kl_stats", "sampled_kl", "token_logprobs",
]
