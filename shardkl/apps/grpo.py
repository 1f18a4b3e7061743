"""A tensor-parallel GRPO demo around shardkl (application code behind ``launch/train_tp.py``).

A tiny Hugging Face Llama built from a config (no download) whose ``lm_head`` is a
:class:`shardkl.parallel.ColumnParallelLMHead`: the trunk is replicated, each rank produces only its vocabulary
slice of the logits, tokens are drawn with :func:`shardkl.sample_tokens`, and the GRPO loss comes from
:func:`shardkl.grpo_loss` on the slices. ``group=None`` runs the same code on one process with the full vocabulary,
which is what the parity check compares against.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from shardkl.distributed import ProcessGroup
from shardkl.losses import Estimator, grpo_loss
from shardkl.parallel import ColumnParallelLMHead
from shardkl.reduction import Reduction
from shardkl.sampling import sample_tokens


class TensorParallelCausalLM(nn.Module):
    """A Hugging Face causal LM whose ``lm_head`` is a :class:`ColumnParallelLMHead`; returns local logits."""

    def __init__(self, model: nn.Module, *, group: ProcessGroup | None, pad_multiple: int = 8) -> None:
        super().__init__()
        self.trunk: nn.Module = model.model  # type: ignore[assignment]
        self.head = ColumnParallelLMHead.from_linear(
            model.lm_head, group=group, pad_multiple=pad_multiple  # type: ignore[arg-type]
        )
        self.group = group

    @property
    def valid_vocab_size(self) -> int:
        return self.head.valid_vocab_size

    def forward(self, input_ids: Tensor) -> Tensor:
        """``[B, T]`` ids -> this rank's ``[B, T, V_local]`` logits (padding columns included)."""
        return self.head(self.trunk(input_ids=input_ids).last_hidden_state)


@dataclass(frozen=True)
class TPConfig:
    """One GRPO experiment on a tiny Llama built from a config (no download)."""

    vocab_size: int = 1003
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    init_std: float = 0.1
    prompts: int = 2
    group_size: int = 4
    prompt_len: int = 4
    response_len: int = 12
    steps: int = 2
    lr: float = 0.2
    kl_coef: float = 0.1
    estimator: Estimator = "exact"
    reduction: Reduction = "token_mean"
    pad_multiple: int = 8
    seed: int = 0
    dtype: str = "float32"


def build_causal_lm(config: TPConfig) -> nn.Module:
    """The full single-process model, identical on every process for the same seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=2 * config.hidden_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.prompt_len + config.response_len,
        initializer_range=config.init_std,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(hf_config)
    return model.to(getattr(torch, config.dtype))


def build_policy_and_reference(
    config: TPConfig, group: ProcessGroup | None
) -> tuple[TensorParallelCausalLM, TensorParallelCausalLM]:
    """Policy with a column-parallel head, and a frozen copy of it as the reference."""
    policy = TensorParallelCausalLM(build_causal_lm(config), group=group, pad_multiple=config.pad_multiple)
    # share the process group instead of copying it (it cannot be copied)
    reference = copy.deepcopy(policy, memo={id(group): group})
    reference.head.weight.requires_grad_(False)
    reference.requires_grad_(False).eval()
    return policy, reference


def parity_report(
    config: TPConfig, results: list[StepResult], policy: TensorParallelCausalLM
) -> dict[str, float]:
    """Re-run the same training on this process alone (``group=None``) and measure the largest differences.

    Returns:
        ``max_rel_diff_scalars`` (over every :class:`StepResult` field), ``max_abs_diff_grads`` (last step) and
        ``max_abs_diff_weights`` (after the last step), this rank's head rows against the same rows of the
        one-process head (padding rows against 0).
    """
    one_results, one_policy = train(config, None)
    rel = 0.0
    for got, expected in zip(results, one_results, strict=True):
        for key, value in got.as_dict().items():
            ref = expected.as_dict()[key]
            rel = max(rel, abs(value - ref) / max(abs(ref), 1e-6))
    one_params = dict(one_policy.named_parameters())
    grad_diff = weight_diff = 0.0
    for name, param in policy.named_parameters():
        full_param = one_params[name]
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        full_grad = full_param.grad if full_param.grad is not None else torch.zeros_like(full_param)
        full = full_param.detach()
        if name == "head.weight":
            layout = policy.head.layout
            start, kept = layout.start, layout.kept_size
            pad = torch.zeros(layout.local_size - kept, param.shape[1], dtype=param.dtype, device=param.device)
            full = torch.cat([full[start : start + kept], pad])
            full_grad = torch.cat([full_grad[start : start + kept], pad])
        grad_diff = max(grad_diff, (grad - full_grad).abs().max().item())
        weight_diff = max(weight_diff, (param.detach() - full).abs().max().item())
    return {"max_rel_diff_scalars": rel, "max_abs_diff_grads": grad_diff, "max_abs_diff_weights": weight_diff}


@torch.no_grad()
def rollout(policy: TensorParallelCausalLM, config: TPConfig, step: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sample ``group_size`` responses per prompt from the policy; rewards and GRPO advantages.

    Returns:
        ``(input_ids [B, P + R], response_mask [B, R], advantages [B, 1])``, identical on every rank.
    """
    device = policy.head.weight.device
    # all randomness is drawn on the CPU from one seed, so every rank and the one-process run agree
    gen = torch.Generator().manual_seed(1000 * config.seed + step)
    prompts = torch.randint(0, config.vocab_size, (config.prompts, config.prompt_len), generator=gen)
    ids = prompts.repeat_interleave(config.group_size, dim=0).to(device)
    for position in range(config.response_len):
        logits = policy(ids)[:, -1]
        # each rank draws noise for its own columns only; the same tokens for any world size
        token = sample_tokens(logits, seed=config.seed, layout=policy.head.layout, stream=f"rollout/{step}/{position}")
        ids = torch.cat([ids, token.unsqueeze(1)], dim=1)
    batch = ids.shape[0]
    # responses end at a random length (an EOS stand-in), so the reductions see a real mask
    lengths = torch.randint(config.response_len // 2, config.response_len + 1, (batch,), generator=gen)
    mask = (torch.arange(config.response_len).unsqueeze(0) < lengths.unsqueeze(1)).to(device)
    lengths = lengths.to(device)
    response = ids[:, config.prompt_len :]
    # a verifiable toy reward: the share of kept response tokens from the lower half of the vocabulary
    reward = ((response < config.vocab_size // 2) & mask).sum(1).double() / lengths.double()
    grouped = reward.view(config.prompts, config.group_size)
    # GRPO: rewards normalised within each prompt's group of responses
    advantages = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)
    return ids, mask, advantages.reshape(batch, 1).float()


def _response_logits(model: TensorParallelCausalLM, ids: Tensor, prompt_len: int) -> Tensor:
    # position t predicts token t + 1: the logits of the response tokens start one before them
    return model(ids)[:, prompt_len - 1 : -1]


@dataclass
class StepResult:
    """Scalars of one step (identical on every rank)."""

    step: int
    loss: float
    policy_loss: float
    kl_penalty: float
    exact_kl_before: float
    exact_kl_after: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def grpo_step(
    policy: TensorParallelCausalLM,
    reference: TensorParallelCausalLM,
    optimizer: torch.optim.Optimizer,
    config: TPConfig,
    batch: tuple[Tensor, Tensor, Tensor],
    step: int = 0,
) -> StepResult:
    """``-advantage · log π(x) + β · KL(π‖π_ref)`` with shardkl on a rollout, backward, optimizer step.

    The gradients stay in ``.grad`` after the step. The KL after the update is re-measured on the same batch
    (exact, over the full vocabulary, mean over response tokens).
    """
    ids, mask, advantages = batch
    tokens = ids[:, config.prompt_len :]
    common: dict[str, Any] = {"layout": policy.head.layout, "mask": mask}
    with torch.no_grad():
        ref_logits = _response_logits(reference, ids, config.prompt_len)
    optimizer.zero_grad(set_to_none=True)
    out = grpo_loss(
        _response_logits(policy, ids, config.prompt_len),
        ref_logits,
        tokens,
        advantages,
        kl_coef=config.kl_coef,
        estimator=config.estimator,
        reduction=config.reduction,
        **common,
    )
    out.loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = grpo_loss(_response_logits(policy, ids, config.prompt_len), ref_logits, tokens, advantages,
                          kl_coef=config.kl_coef, estimator="exact", reduction="token_mean", **common)
    exact_before = (out.exact_kl * mask).sum() / mask.sum()
    return StepResult(
        step=step,
        loss=out.loss.item(),
        policy_loss=out.policy_loss.item(),
        kl_penalty=out.kl.item(),
        exact_kl_before=exact_before.item(),
        exact_kl_after=after.kl.item(),
    )


def train(config: TPConfig, group: ProcessGroup | None) -> tuple[list[StepResult], TensorParallelCausalLM]:
    """Build the models and run ``config.steps`` GRPO steps with SGD; returns the results and the policy."""
    policy, reference = build_policy_and_reference(config, group)
    optimizer = torch.optim.SGD(policy.parameters(), lr=config.lr)
    results = [
        grpo_step(policy, reference, optimizer, config, rollout(policy, config, step), step)
        for step in range(config.steps)
    ]
    return results, policy


__all__ = [
    "StepResult",
    "TPConfig",
    "TensorParallelCausalLM",
    "build_causal_lm",
    "build_policy_and_reference",
    "grpo_step",
    "parity_report",
    "rollout",
    "train",
]
