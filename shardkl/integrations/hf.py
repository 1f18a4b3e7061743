"""Hugging Face causal LMs: their logits as a :class:`shardkl.LinearLogits`, without materialising them.

:func:`linear_logits` runs the model's decoder (the trunk, whose last hidden state is already normalised) and pairs
its output with the ``lm_head``: a plain ``nn.Linear`` (the whole vocabulary, ``group=None``), or one made
column-parallel by ``torch.distributed.tensor.parallel.parallelize_module(model, mesh, {"lm_head":
ColwiseParallel()})`` (its weight is then a DTensor sharded ``Shard(0)``; the hidden states become a DTensor
replicated on the same mesh, so their gradient is summed over the ranks where they are replicated).

``transformers`` is not imported here: the function only calls the model it is given.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from shardkl._dtensor import replicated_like
from shardkl.linear import LinearLogits

# config attributes of models whose logits are not the lm_head's output alone
_NOT_LINEAR = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def linear_head_problem(config: Any) -> str | None:
    """Why a model with this config does not have logits ``lm_head(hidden)`` alone (it soft-caps or scales them),
    or ``None`` if it does.

    Args:
        config: a transformers config (or ``None``).

    Returns:
        One line such as ``"this model's logits are not lm_head(hidden) alone (final_logit_softcapping=30.0)"``.
    """
    for name in _NOT_LINEAR:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"this model's logits are not lm_head(hidden) alone ({name}={value})"
    return None


def linear_logits(model: nn.Module, input_ids: Any = None, **forward_kwargs: Any) -> LinearLogits:
    """The logits of a Hugging Face causal LM as ``LinearLogits(last hidden state, lm_head.weight, lm_head.bias)``.

    Args:
        model: a ``*ForCausalLM`` model (``get_decoder()`` and ``get_output_embeddings()``), with a plain or a
            ``ColwiseParallel`` ``lm_head``.
        input_ids: ``[B, T]`` token ids.
        **forward_kwargs: passed to the decoder (``attention_mask``, ``position_ids``, ...).

    Returns:
        :class:`shardkl.LinearLogits` for all ``T`` positions; select the ones you score with indexing, e.g.
        ``source[:, prompt_len - 1 : -1]``.

    Raises:
        ValueError: the model scales or soft-caps its logits after the ``lm_head`` (not a linear map).
    """
    problem = linear_head_problem(getattr(model, "config", None))
    if problem is not None:
        raise ValueError(f"{problem}; compute its logits and pass them as a tensor instead")
    decoder: Any = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model  # type: ignore[operator]
    outputs = decoder(input_ids=input_ids, **forward_kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    head = model.get_output_embeddings()  # type: ignore[operator]
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no linear output layer (get_output_embeddings() is {head!r})")
    weight, bias = head.weight, getattr(head, "bias", None)
    return LinearLogits(replicated_like(hidden, weight), weight, bias)


__all__ = ["linear_head_problem", "linear_logits"]
