"""shardkl.integrations.hf.linear_logits: a Hugging Face causal LM's KL from hidden states, plain and at TP = 2."""

from __future__ import annotations

import pytest
import torch

import shardkl
from shardkl.integrations.hf import linear_logits
from shardkl.testing import count_collectives
from tests._distributed import run_ranks

transformers = pytest.importorskip("transformers")


def _models(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A policy and a smaller reference (different hidden sizes, the same vocabulary), built from configs."""
    common = dict(vocab_size=1001, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False,
                  initializer_range=0.2, attn_implementation="eager")
    torch.manual_seed(seed)
    policy = transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=32, **common)).double()
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=16, **common)).double()
    return policy, reference.requires_grad_(False)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1001, (2, 9), generator=g)
    return ids, ids[:, 4:], torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


def test_plain_model_matches_its_logits() -> None:
    policy, reference = _models()
    ids, tokens, mask = _inputs()
    source = linear_logits(policy, ids)[:, 3:-1]
    with torch.no_grad():
        ref_source = linear_logits(reference, ids)[:, 3:-1]
        ref_logits = reference(ids).logits[:, 3:-1]
    loss = shardkl.kl_penalty(source, ref_source, tokens, mask=mask, estimator="k3+")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    expected = shardkl.kl_penalty(policy(ids).logits[:, 3:-1], ref_logits, tokens, mask=mask, estimator="k3+")
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-14)
    for name, param in policy.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-8, atol=1e-12, msg=name)


def test_logit_soft_capping_is_refused() -> None:
    policy, _ = _models()
    policy.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        linear_logits(policy, _inputs()[0])


def _check_tp(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    policy, reference = _models()
    one, one_reference = _models()
    mesh = DeviceMesh("cpu", torch.arange(world))
    for model in (policy, reference):
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
    ids, tokens, mask = _inputs()
    source = linear_logits(policy, ids)
    assert isinstance(source.weight, DTensor) and isinstance(source.hidden, DTensor)
    with torch.no_grad():
        ref_source = linear_logits(reference, ids)[:, 3:-1]
    with count_collectives() as counter:
        stats = shardkl.kl_stats(source[:, 3:-1], ref_source, tokens)
    assert counter.total == 1
    loss = shardkl.reduce_tokens(stats.exact_kl + stats.k3, mask, reduction="token_mean")
    loss.backward()
    one_stats = shardkl.kl_stats(linear_logits(one, ids)[:, 3:-1], linear_logits(one_reference, ids)[:, 3:-1], tokens)
    one_loss = shardkl.reduce_tokens(one_stats.exact_kl + one_stats.k3, mask, reduction="token_mean")
    one_loss.backward()
    torch.testing.assert_close(loss, one_loss, rtol=1e-10, atol=1e-14)
    one_params = dict(one.named_parameters())
    for name, param in policy.named_parameters():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        torch.testing.assert_close(grad, one_params[name].grad, rtol=1e-8, atol=1e-12, msg=name)


def test_column_parallel_lm_head_at_tp2_matches_one_process() -> None:
    run_ranks(_check_tp, 2)
