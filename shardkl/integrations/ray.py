"""Ray integration: shardkl on the workers of an existing Ray worker group.

:func:`kl_stats_on_worker` is for Ray-based RL trainers that already hold a worker group with a process group:
each worker passes its local vocabulary shards and gets numpy arrays back, identical on every rank, ready to be
returned to the driver from a Ray task or actor method. (The seed experiment as a Ray Train job is an application:
``shardkl.apps.ray_job`` and ``launch/ray_kl.py``.)

Nothing here imports ``ray``: the function runs inside a worker that Ray already started.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shardkl.distributed import ProcessGroup
from shardkl.functional import kl_stats
from shardkl.layout import VocabLayout
from shardkl.options import Options

if TYPE_CHECKING:
    import numpy as np


def kl_stats_on_worker(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    tokens: torch.Tensor | None = None,
    *,
    group: ProcessGroup | None = None,
    layout: VocabLayout | None = None,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
    options: Options | None = None,
) -> dict[str, np.ndarray]:
    """Per-token KL statistics of this worker's vocabulary shards, as numpy arrays for the Ray driver.

    Call it on every worker of the group (a Ray Train worker, or an actor of your own worker group that has
    joined a ``torch.distributed`` process group), between rollout and update. It issues the one all-gather of
    :func:`shardkl.kl_stats` under ``torch.no_grad()`` and returns the same arrays on every rank, so the driver
    can take any worker's return value (``ray.get(refs)[0]``). For the differentiable loss use
    :func:`shardkl.kl_stats` itself.

    Args:
        p_logits: this worker's slice of the logits of P (the sampling policy), ``[..., V_local]``.
        q_logits: this worker's slice of the logits of Q (e.g. the reference policy), same shape.
        tokens: global token ids sampled from P, shaped like the logits without the last dimension, or ``None``.
        group: the process group the vocabulary is split over, e.g. ``torch.distributed.group.WORLD`` inside a
            Ray Train worker; ``None`` when the tensors hold the whole vocabulary.
        layout, temperature, valid_vocab_size, options: as in :func:`shardkl.kl_stats`.

    Returns:
        ``{"exact_kl", "entropy"}`` and, with tokens, ``{"p_logprobs", "q_logprobs", "k1", "k2", "k3"}``: numpy
        arrays shaped like the logits without the last dimension, float32 (float64 for float64 input), on the
        host.

    Shape:
        logits ``[..., V_local]`` → every array ``[...]``.
    """
    with torch.no_grad():
        stats = kl_stats(
            p_logits, q_logits, tokens, group=group, layout=layout, temperature=temperature,
            valid_vocab_size=valid_vocab_size, options=options,
        )
    return {name: value.cpu().numpy() for name, value in stats._asdict().items() if value is not None}


__all__ = ["kl_stats_on_worker"]
