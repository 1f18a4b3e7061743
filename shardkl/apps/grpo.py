"""A tensor-parallel GRPO demo around shardkl (application code behind ``launch/train_tp.py``).

A tiny Hugging Face Llama built from a config (no download) whose ``lm_head`` is a
:class:`shardkl.parallel.ColumnParallelLMHead`: the trunk is replicated, each rank produces only its vocabulary
slice of the logits, tokens are drawn with :func:`shardkl.sample_tokens`, and the GRPO loss comes from
:func:`shardkl.grpo_loss` on the slices. ``group=None`` runs the same code on one process with the full vocabulary,
which is what the parity check compares against.
"""

from __future__ import annotations

import copy
import textwrap
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from shardkl.distributed import ProcessGroup
from shardkl.layout import VocabLayout
from shardkl.linear import LinearLogits
from shardkl.losses import Estimator, GRPOLoss, grpo_loss
from shardkl.parallel import ColumnParallelLMHead
from shardkl.sampling import sample_tokens

# how the loss aggregates its per-token terms: every reduction of shardkl.reduce_tokens but "none", which leaves one
# loss per token and nothing to step on (--help offers only these)
LossReduction = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm", "sum"]


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

    def linear_logits(self, input_ids: Tensor) -> LinearLogits:
        """The same logits as a :class:`shardkl.LinearLogits` (last hidden states and this rank's head rows),
        for shardkl to reduce without materialising them."""
        return self.head.linear_logits(self.trunk(input_ids=input_ids).last_hidden_state)


@dataclass(frozen=True)
class TPConfig:
    """GRPO run (a tiny Llama built from a config, no download)"""

    vocab_size: int = 1003
    """vocabulary of the model (the lm_head is padded to a multiple of pad_multiple x ranks)"""
    hidden_size: int = 64
    """hidden size of the model"""
    layers: int = 2
    """transformer layers"""
    heads: int = 4
    """attention heads"""
    init_std: float = 0.1
    """standard deviation of the initial weights"""
    prompts: int = 2
    """random prompts per step"""
    group_size: int = 4
    """responses sampled per prompt (GRPO normalises rewards within each group)"""
    prompt_len: int = 4
    """tokens per prompt"""
    response_len: int = 12
    """tokens per response (responses end at a random length between half of it and all of it)"""
    steps: int = 2
    """optimizer steps, each on a new batch sampled from the current policy"""
    lr: float = 0.2
    """SGD learning rate"""
    kl_coef: float = 0.1
    """weight of the KL term in the loss (beta in the GRPO paper)"""
    estimator: Estimator = "exact"
    """KL estimate in the loss: exact (over the full vocabulary) or a sampled estimator"""
    reduction: LossReduction = "token_mean"
    """how per-token terms are aggregated into the one loss of a step"""
    pad_multiple: int = 8
    """the lm_head rows of each rank are padded to a multiple of this"""
    seed: int = 0
    """seed of the weights, the prompts and the sampled responses"""
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    """dtype of the model"""
    logits_from: Literal["logits", "hidden"] = "logits"
    """what the loss reads: the lm_head's logits, or the hidden states and the lm_head rows (shardkl.LinearLogits:
    the [tokens, V_local] logits are never materialised)"""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "layers", "heads", "prompts", "prompt_len", "steps", "pad_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (rewards are normalised within a group), got {self.group_size}")
        if self.response_len < 2:
            raise ValueError(f"response_len must be >= 2, got {self.response_len}")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size must be a multiple of heads, got {self.hidden_size} and {self.heads}")


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
    config: TPConfig, group: ProcessGroup | None, device: torch.device | None = None
) -> tuple[TensorParallelCausalLM, TensorParallelCausalLM]:
    """Policy with a column-parallel head on ``device`` (default CPU), and a frozen copy of it as the reference."""
    model = build_causal_lm(config).to(device or torch.device("cpu"))
    policy = TensorParallelCausalLM(model, group=group, pad_multiple=config.pad_multiple)
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
    one_results, one_policy = train(config, None, policy.head.weight.device)
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
        ``(input_ids [B, P + R], response_mask [B, R], advantages [B])``, identical on every rank.
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
    return ids, mask, advantages.reshape(batch).float()


def _response_logits(model: TensorParallelCausalLM, ids: Tensor, config: TPConfig) -> Tensor | LinearLogits:
    # position t predicts token t + 1: the logits of the response tokens start one before them
    source = model.linear_logits(ids) if config.logits_from == "hidden" else model(ids)
    return source[:, config.prompt_len - 1 : -1]


def objective(
    config: TPConfig,
    policy_logits: Tensor | LinearLogits,
    ref_logits: Tensor | LinearLogits,
    batch: tuple[Tensor, Tensor, Tensor],
    layout: VocabLayout,
    *,
    estimator: Estimator | None = None,
) -> GRPOLoss:
    """The loss of one step from this rank's response logits: ``-advantage · log π(x) + kl_coef · KL(π‖π_ref)``.

    The one place the training objective is written; a new mode (e.g. distillation) is another function like this.

    Args:
        config: the run's configuration (``kl_coef``, ``estimator``, ``reduction``, ``prompt_len``).
        policy_logits, ref_logits: ``[B, R, V_local]`` logits of the response tokens, this rank's columns (or
            :class:`shardkl.LinearLogits` standing for them).
        batch: ``(input_ids, response_mask, advantages)`` from :func:`rollout`.
        layout: this rank's vocabulary columns.
        estimator: the KL estimate (default ``config.estimator``).
    """
    ids, mask, advantages = batch
    return grpo_loss(
        policy_logits, ref_logits, ids[:, config.prompt_len :], advantages, kl_coef=config.kl_coef,
        estimator=config.estimator if estimator is None else estimator, reduction=config.reduction, layout=layout,
        mask=mask,
    )


@dataclass
class StepResult:
    """Scalars of one step, identical on every rank; :data:`STEP_COLUMNS` says what each holds."""

    step: int
    loss: float
    policy_loss: float
    kl_term: float
    kl_estimate: float
    exact_kl: float
    exact_kl_after_update: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


STEP_COLUMNS = {
    "step": "step number; each step samples a new batch from the current policy",
    "loss": "the loss back-propagated: policy_loss + kl_term",
    "policy_loss": "-advantage * log pi(x), aggregated with `reduction`",
    "kl_term": "kl_coef * kl_estimate, the KL part of the loss",
    "kl_estimate": "KL(pi||pi_ref) as the loss estimates it (`estimator`), aggregated with `reduction`",
    "exact_kl": "exact KL(pi||pi_ref) per response token, mean over this step's batch, before the update",
    "exact_kl_after_update": "the same, re-measured on the same batch after the optimizer step (not comparable "
    "with the next step's exact_kl, which is measured on a new batch)",
}
"""What each :class:`StepResult` field holds, for the table's legend and the docs."""


def format_steps(results: list[StepResult], config: TPConfig) -> str:
    """The steps as a table for people, with a legend of its columns under it."""
    widths = {name: max(len(name), 11) for name in STEP_COLUMNS}
    widths["step"] = 4
    lines = ["  ".join(f"{name:>{width}}" for name, width in widths.items())]
    for result in results:
        values = result.as_dict()
        lines.append("  ".join(f"{values[name]:>{width}.6g}" for name, width in widths.items()))
    lines.append("")
    lines.append(
        f"kl_coef={config.kl_coef}  estimator={config.estimator}  reduction={config.reduction}  "
        f"logits_from={config.logits_from}"
    )
    for name, meaning in STEP_COLUMNS.items():
        lines += textwrap.wrap(f"{name}: {meaning}", width=112, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def grpo_step(
    policy: TensorParallelCausalLM,
    reference: TensorParallelCausalLM,
    optimizer: torch.optim.Optimizer,
    config: TPConfig,
    batch: tuple[Tensor, Tensor, Tensor],
    step: int = 0,
) -> StepResult:
    """One step on a rollout: :func:`objective`, backward, optimizer step, then the exact KL re-measured.

    The gradients stay in ``.grad`` after the step.
    """
    ids, mask, _ = batch
    layout = policy.head.layout
    with torch.no_grad():
        ref_logits = _response_logits(reference, ids, config)
    optimizer.zero_grad(set_to_none=True)
    out = objective(config, _response_logits(policy, ids, config), ref_logits, batch, layout)
    out.loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = objective(config, _response_logits(policy, ids, config), ref_logits, batch, layout,
                          estimator="exact")
    mean = (out.exact_kl * mask).sum() / mask.sum()
    mean_after = (after.exact_kl * mask).sum() / mask.sum()
    return StepResult(
        step=step,
        loss=out.loss.item(),
        policy_loss=out.policy_loss.item(),
        kl_term=config.kl_coef * out.kl.item(),
        kl_estimate=out.kl.item(),
        exact_kl=mean.item(),
        exact_kl_after_update=mean_after.item(),
    )


def train(
    config: TPConfig, group: ProcessGroup | None, device: torch.device | None = None
) -> tuple[list[StepResult], TensorParallelCausalLM]:
    """Build the models and run ``config.steps`` GRPO steps with SGD; returns the results and the policy."""
    policy, reference = build_policy_and_reference(config, group, device)
    optimizer = torch.optim.SGD(policy.parameters(), lr=config.lr)
    results = [
        grpo_step(policy, reference, optimizer, config, rollout(policy, config, step), step)
        for step in range(config.steps)
    ]
    return results, policy


__all__ = [
    "STEP_COLUMNS",
    "LossReduction",
    "StepResult",
    "TPConfig",
    "TensorParallelCausalLM",
    "build_causal_lm",
    "build_policy_and_reference",
    "format_steps",
    "grpo_step",
    "objective",
    "parity_report",
    "rollout",
    "train",
]
