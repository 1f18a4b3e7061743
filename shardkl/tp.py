"""A tensor-parallel GRPO step around shardkl: the reusable pieces of ``launch/train_tp.py``.

The layout is Megatron's for the output layer: the transformer trunk is replicated on every rank of the
tensor-parallel group, and the ``lm_head`` is split column-wise (by vocabulary rows of its weight), padded so the
vocabulary divides evenly, so each rank produces only its ``[..., V / world]`` slice of the logits. shardkl then
computes ``log π(x)`` and the exact KL(π‖π_ref) from those slices with one all-gather of a few floats per token.

Two collectives belong to the model, not to shardkl: :class:`CopyToTensorParallelRegion` all-reduces the gradient
of the hidden states in backward (Megatron's ``copy_to_tensor_model_parallel_region``: each rank's slice of the
head only sees its part of ∂loss/∂h), and :func:`sample_tokens` gathers one (value, index) pair per row to sample
from the sharded vocabulary by the Gumbel-max trick. ``group=None`` runs the same code on one process with the
full vocabulary, which is what the parity test compares against.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from shardkl.distributed import ProcessGroup, argmax_over_ranks, rank_and_size
from shardkl.losses import PenaltyKind, grpo_loss
from shardkl.reduction import Reduction


def padded_vocab_size(vocab_size: int, world_size: int, multiple: int = 8) -> int:
    """Megatron's padding: the smallest size ``>= vocab_size`` divisible by ``multiple * world_size``."""
    step = multiple * world_size
    return -(-vocab_size // step) * step


class CopyToTensorParallelRegion(torch.autograd.Function):
    """Identity in forward; sums the gradient over the group in backward (Megatron's ``f`` operator)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        if ctx.group is None or dist.get_world_size(ctx.group) == 1:
            return grad, None
        grad = grad.contiguous()
        # The model's collective (not shardkl's): each rank's slice of the head contributes part of dloss/dh.
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ColumnParallelLMHead(nn.Module):
    """This rank's rows of an output layer: ``hidden [..., H] -> logits [..., V_padded / world]``.

    Rank ``r`` holds global vocabulary ids ``[r * V_local, (r + 1) * V_local)``; ids at or beyond
    ``valid_vocab_size`` are zero padding rows, to be passed to shardkl as ``valid_vocab_size=``.

    Args:
        weight: this rank's ``[V_local, H]`` slice (padding rows included).
        valid_vocab_size: the real vocabulary size.
        group: tensor-parallel group (``None``: one process holds the whole vocabulary).
    """

    def __init__(self, weight: Tensor, *, valid_vocab_size: int, group: ProcessGroup | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.valid_vocab_size = valid_vocab_size
        self.group = group
        rank, _ = rank_and_size(group)
        self.vocab_start = rank * weight.shape[0]

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, group: ProcessGroup | None, pad_multiple: int = 8
    ) -> ColumnParallelLMHead:
        """Split a full ``nn.Linear(H, V, bias=False)`` head; every rank must pass the same weights."""
        if linear.bias is not None:
            raise ValueError("ColumnParallelLMHead supports heads without bias (as in Llama), got a bias")
        vocab, hidden = linear.weight.shape
        rank, world = rank_and_size(group)
        padded = padded_vocab_size(vocab, world, pad_multiple)
        local = padded // world
        weight = torch.zeros(local, hidden, dtype=linear.weight.dtype, device=linear.weight.device)
        start, stop = rank * local, min((rank + 1) * local, vocab)
        if stop > start:
            weight[: stop - start] = linear.weight.detach()[start:stop]
        return cls(weight, valid_vocab_size=vocab, group=group)

    def forward(self, hidden: Tensor) -> Tensor:
        hidden = CopyToTensorParallelRegion.apply(hidden, self.group)
        return nn.functional.linear(hidden, self.weight)


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
    beta: float = 0.1
    kind: PenaltyKind = "exact"
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


@torch.no_grad()
def sample_tokens(local_logits: Tensor, noise: Tensor, *, vocab_start: int, valid_vocab_size: int,
                  group: ProcessGroup | None) -> Tensor:
    """Sample global ids from softmax over the sharded vocabulary by Gumbel-max.

    Args:
        local_logits: ``[B, V_local]`` this rank's slice.
        noise: ``[B, V_padded]`` Gumbel noise for the whole (padded) vocabulary, the same on every rank, so a
            one-process run with the same noise draws the same tokens.
        vocab_start: first global id of this rank's slice.
        valid_vocab_size: ids at or beyond it are padding and never drawn.
        group: tensor-parallel group or ``None``.

    Returns:
        ``[B]`` global token ids, identical on every rank.
    """
    local = local_logits.shape[-1]
    scores = local_logits.double() + noise[:, vocab_start : vocab_start + local]
    ids = torch.arange(vocab_start, vocab_start + local, device=scores.device)
    scores = scores.masked_fill(ids >= valid_vocab_size, float("-inf"))
    best, where = scores.max(dim=-1)
    return argmax_over_ranks(best, (where + vocab_start).double(), group)


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
            local = param.shape[0]
            start = policy.head.vocab_start
            kept = max(min(policy.valid_vocab_size - start, local), 0)
            pad = torch.zeros(local - kept, param.shape[1], dtype=param.dtype, device=param.device)
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
    padded = policy.head.weight.shape[0] * rank_and_size(policy.group)[1]
    for _ in range(config.response_len):
        logits = policy(ids)[:, -1]
        uniform = torch.rand(ids.shape[0], padded, generator=gen, dtype=torch.float64)
        # Gumbel(0, 1) noise; the clamp keeps log(0) out
        noise = -torch.log(-torch.log(uniform.clamp(min=1e-300))).to(device)
        token = sample_tokens(logits, noise, vocab_start=policy.head.vocab_start,
                              valid_vocab_size=policy.valid_vocab_size, group=policy.group)
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
    common: dict[str, Any] = {"group": policy.group, "valid_vocab_size": policy.valid_vocab_size, "mask": mask}
    with torch.no_grad():
        ref_logits = _response_logits(reference, ids, config.prompt_len)
    optimizer.zero_grad(set_to_none=True)
    out = grpo_loss(
        _response_logits(policy, ids, config.prompt_len),
        ref_logits,
        tokens,
        advantages,
        beta=config.beta,
        kind=config.kind,
        reduction=config.reduction,
        **common,
    )
    out.loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = grpo_loss(_response_logits(policy, ids, config.prompt_len), ref_logits, tokens, advantages,
                          beta=config.beta, kind="exact", reduction="token_mean", **common)
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
    "ColumnParallelLMHead",
    "CopyToTensorParallelRegion",
    "StepResult",
    "TPConfig",
    "TensorParallelCausalLM",
    "build_causal_lm",
    "build_policy_and_reference",
    "grpo_step",
    "padded_vocab_size",
    "parity_report",
    "rollout",
    "sample_tokens",
    "train",
]
