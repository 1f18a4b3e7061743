"""On-policy distillation at tensor parallelism around shardkl (application code behind ``launch/distill_tp.py``).

A teacher and a student: two tiny Hugging Face Llamas built from configs (no download), with different hidden sizes
and the same vocabulary. Each has its ``lm_head`` split by vocabulary rows over the ranks
(:class:`shardkl.parallel.ColumnParallelLMHead`); the trunks are replicated. One step: the student samples responses
(:func:`shardkl.sample_tokens`, from its hidden states), the frozen teacher reads them, and the student's per-token
divergence from the teacher comes from :func:`shardkl.distillation_loss` on **hidden states**
(:class:`shardkl.LinearLogits`: no rank ever holds a ``[tokens, V_local]`` logits tensor), then backward and an SGD
step. With ``top_k > 0`` the teacher is given only by its top-k log-probs (:class:`shardkl.TopKTeacher`), as an
inference engine returns them.

``group=None`` runs the same code on one process with the full vocabulary (the parity check's baseline), and
:func:`float64_reference` recomputes the per-token divergences from materialised float64 logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shardkl.distill import DIVERGENCES, Divergence, TopKTeacher, distillation_loss
from shardkl.distributed import ProcessGroup, all_gather_flat
from shardkl.parallel import ColumnParallelLMHead
from shardkl.reduction import reduce_tokens
from shardkl.sampling import sample_tokens


@dataclass(frozen=True)
class DistillConfig:
    """distillation run (two tiny Llamas built from configs, no download)"""

    vocab_size: int = 512
    """the shared vocabulary (padded to a multiple of pad_multiple x ranks for the split)"""
    teacher_hidden_size: int = 48
    """hidden size of the teacher (it may differ from the student's; the vocabulary may not)"""
    student_hidden_size: int = 32
    """hidden size of the student"""
    teacher_layers: int = 2
    """transformer layers of the teacher"""
    student_layers: int = 1
    """transformer layers of the student"""
    heads: int = 4
    """attention heads of both models"""
    init_std: float = 0.1
    """standard deviation of the initial weights"""
    teacher_scale: float = 4.0
    """the teacher's output weights are this many times larger, so that it is sharper than the student"""
    prompts: int = 2
    """random prompts per step"""
    samples_per_prompt: int = 2
    """responses the student samples per prompt"""
    prompt_len: int = 4
    """tokens per prompt"""
    response_len: int = 8
    """tokens per response"""
    steps: int = 2
    """SGD steps on the student"""
    lr: float = 0.5
    """SGD learning rate"""
    divergence: Divergence = "jsd"
    """forward_kl (KL(teacher||student)), reverse_kl or jsd"""
    beta: float = 0.5
    """the JSD's mixture weight of the teacher (divergence jsd only)"""
    top_k: int = 0
    """0: the teacher's full logits; K > 0: its top-K log-probs only (forward or reverse KL over K + 1 buckets)"""
    temperature: float = 1.0
    """sampling and divergence temperature of the student (and of a full teacher)"""
    pad_multiple: int = 8
    """Megatron's vocabulary padding multiple"""
    seed: int = 0
    """seed of the models, prompts and samples (the same for every world size)"""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "teacher_hidden_size", "student_hidden_size", "teacher_layers", "student_layers",
                     "heads", "prompts", "samples_per_prompt", "prompt_len", "response_len", "pad_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("teacher_hidden_size", "student_hidden_size"):
            if getattr(self, name) % self.heads:
                raise ValueError(f"{name} must be a multiple of heads={self.heads}, got {getattr(self, name)}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not 0 <= self.top_k <= self.vocab_size:
            raise ValueError(f"top_k must be in [0, vocab_size={self.vocab_size}], got {self.top_k}")
        if self.top_k and self.divergence == "jsd":
            raise ValueError(
                "divergence='jsd' needs the teacher's full logits: use top_k = 0, or forward_kl or reverse_kl"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not (self.lr >= 0 and self.init_std > 0 and self.teacher_scale > 0):
            raise ValueError("lr must be >= 0, init_std and teacher_scale > 0")


def build_causal_lm(config: DistillConfig, *, teacher: bool) -> nn.Module:
    """The full single-process teacher or student, identical on every process for the same seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = config.teacher_hidden_size if teacher else config.student_hidden_size
    hf_config = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=config.teacher_layers if teacher else config.student_layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.prompt_len + config.response_len,
        initializer_range=config.init_std,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(config.seed + (1 if teacher else 2))
    model = LlamaForCausalLM(hf_config)
    if teacher:
        with torch.no_grad():
            model.lm_head.weight.mul_(config.teacher_scale)
    return model


class TensorParallelLM(nn.Module):
    """A Hugging Face causal LM whose ``lm_head`` is a :class:`ColumnParallelLMHead`; gives hidden states, and its
    logits as :class:`shardkl.LinearLogits` (never materialised).

    :meth:`full_head` gathers the unsplit output weight, for the float64 reference and for the stand-in of a
    teacher's inference engine.
    """

    def __init__(self, model: nn.Module, *, group: ProcessGroup | None, pad_multiple: int) -> None:
        super().__init__()
        self.trunk: nn.Module = model.model  # type: ignore[assignment]
        linear: nn.Linear = model.lm_head  # type: ignore[assignment]
        self.head = ColumnParallelLMHead.from_linear(linear, group=group, pad_multiple=pad_multiple)
        self.group = group

    @torch.no_grad()
    def full_head(self) -> Tensor:
        """``[V, H]`` the whole output weight (every rank's rows, padding dropped), as it is now."""
        local = self.head.weight.detach()
        # the rows of every rank, in rank order (Megatron's equal split: every rank holds as many)
        rows = all_gather_flat(local.reshape(-1), self.group, what="output-layer rows").reshape(-1, local.shape[1])
        return rows[: self.head.valid_vocab_size]

    def hidden(self, input_ids: Tensor) -> Tensor:
        """``[B, T]`` ids -> ``[B, T, H]`` final hidden states (after the final norm)."""
        out: Tensor = self.trunk(input_ids=input_ids).last_hidden_state
        return out


@dataclass
class StepResult:
    """One step's numbers, identical on every rank.

    Attributes:
        step: the step index.
        loss: the mean divergence over the response tokens, back-propagated.
        loss_after: the same divergence on the same batch after the SGD step.
        tokens: ``[B, R]`` the sampled response tokens.
        mask: ``[B, R]`` which response tokens count.
        per_token: ``[B, R]`` the per-token divergence (0 where masked).
        reference: ``[B, R]`` the same from materialised float64 logits.
    """

    step: int
    loss: float
    loss_after: float
    tokens: list[list[int]] = field(repr=False)
    mask: list[list[bool]] = field(repr=False)
    per_token: list[list[float]] = field(repr=False)
    reference: list[list[float]] = field(repr=False)

    def summary(self) -> dict[str, float]:
        errors = [
            abs(g - r) / max(abs(r), 1e-12)
            for gs, rs, ms in zip(self.per_token, self.reference, self.mask, strict=True)
            for g, r, m in zip(gs, rs, ms, strict=True)
            if m
        ]
        return {"step": self.step, "loss": self.loss, "loss_after": self.loss_after,
                "max_rel_diff_float64": max(errors, default=0.0)}


def build_models(config: DistillConfig, group: ProcessGroup | None) -> tuple[TensorParallelLM, TensorParallelLM]:
    """The student (trainable) and the frozen teacher, both with column-parallel heads over ``group``."""
    student = TensorParallelLM(build_causal_lm(config, teacher=False), group=group, pad_multiple=config.pad_multiple)
    teacher = TensorParallelLM(build_causal_lm(config, teacher=True), group=group, pad_multiple=config.pad_multiple)
    teacher.requires_grad_(False).eval()
    return student, teacher


@torch.no_grad()
def rollout(student: TensorParallelLM, config: DistillConfig, step: int) -> tuple[Tensor, Tensor]:
    """Sample responses from the student: ``(input_ids [B, P + R], response_mask [B, R])``, the same on every rank
    and for every world size."""
    gen = torch.Generator().manual_seed(1000 * config.seed + step)
    prompts = torch.randint(0, config.vocab_size, (config.prompts, config.prompt_len), generator=gen)
    ids = prompts.repeat_interleave(config.samples_per_prompt, dim=0)
    for position in range(config.response_len):
        last = student.head.linear_logits(student.hidden(ids)[:, -1])
        token = sample_tokens(
            last, seed=config.seed, layout=student.head.layout, temperature=config.temperature,
            stream=f"rollout/{step}/{position}",
        )
        ids = torch.cat([ids, token.unsqueeze(1)], dim=1)
    # responses end at a random length (an EOS stand-in), so the mask matters
    lengths = torch.randint(config.response_len // 2, config.response_len + 1, (ids.shape[0],), generator=gen)
    mask = torch.arange(config.response_len).unsqueeze(0) < lengths.unsqueeze(1)
    return ids, mask


def teacher_topk(teacher_hidden: Tensor, full_head: Tensor, k: int) -> TopKTeacher:
    """The teacher's top-k ids and log-probs under its full distribution, as an inference engine returns them
    (computed here from its unsplit output layer, standing in for that engine)."""
    logprobs = F.log_softmax(teacher_hidden.float() @ full_head.float().T, dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return TopKTeacher(ids, values)


def _divergence(
    student: TensorParallelLM, teacher: TensorParallelLM, config: DistillConfig, ids: Tensor, mask: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token divergence ``[B, R]`` of the student's responses, from hidden states; and the hidden states."""
    # position t predicts token t + 1: the response tokens are predicted from one position earlier
    positions = slice(config.prompt_len - 1, -1)
    with torch.no_grad():
        teacher_hidden = teacher.hidden(ids)[:, positions]
    student_hidden = student.hidden(ids)[:, positions]
    source = student.head.linear_logits(student_hidden)
    target: Any
    if config.top_k:
        target = teacher_topk(teacher_hidden, teacher.full_head(), config.top_k)
    else:
        target = teacher.head.linear_logits(teacher_hidden)
    per_token = distillation_loss(
        source, target, divergence=config.divergence, beta=config.beta if config.divergence == "jsd" else None,
        layout=student.head.layout, mask=mask, reduction="none", temperature=config.temperature,
    )
    return per_token, {"teacher": teacher_hidden.detach(), "student": student_hidden.detach()}


@torch.no_grad()
def float64_reference(
    student_hidden: Tensor, teacher_hidden: Tensor, student: TensorParallelLM, teacher: TensorParallelLM,
    config: DistillConfig,
) -> Tensor:
    """The per-token divergence from materialised float64 logits of the full vocabulary, the textbook way."""
    t = config.temperature
    teacher_head = teacher.full_head()
    log_s = F.log_softmax(student_hidden.double() @ student.full_head().double().T / t, dim=-1)
    teacher_logits = teacher_hidden.double() @ teacher_head.double().T

    def kl(log_w: Tensor, log_m: Tensor) -> Tensor:
        w = log_w.exp()
        return torch.where(w > 0, w * (log_w - log_m), torch.zeros_like(w)).sum(-1)

    if config.top_k:
        top = teacher_topk(teacher_hidden, teacher_head, config.top_k)
        ids, log_t_ids = top.ids, top.logprobs.double()
        outside = torch.ones_like(log_s, dtype=torch.bool).scatter(-1, ids, False)
        log_s_b = torch.cat([log_s.gather(-1, ids), torch.logsumexp(log_s.masked_fill(~outside, -torch.inf), -1,
                                                                       keepdim=True)], -1)
        tail = (1 - log_t_ids.exp().sum(-1, keepdim=True)).clamp(min=0)
        log_t_b = torch.cat([log_t_ids, torch.log(tail)], -1)
        return kl(log_t_b, log_s_b) if config.divergence == "forward_kl" else kl(log_s_b, log_t_b)
    log_t = F.log_softmax(teacher_logits / t, dim=-1)
    if config.divergence == "forward_kl":
        return kl(log_t, log_s)
    if config.divergence == "reverse_kl":
        return kl(log_s, log_t)
    beta = config.beta
    if beta == 0.0:
        return kl(log_t, log_s)
    if beta == 1.0:
        return kl(log_s, log_t)
    log_m = torch.log(beta * log_t.exp() + (1 - beta) * log_s.exp())
    return beta * kl(log_t, log_m) + (1 - beta) * kl(log_s, log_m)


def distill_step(
    student: TensorParallelLM,
    teacher: TensorParallelLM,
    optimizer: torch.optim.Optimizer,
    config: DistillConfig,
    step: int,
) -> StepResult:
    """Roll out the student, back-propagate the mean per-token divergence from the teacher, take an SGD step."""
    ids, mask = rollout(student, config, step)
    optimizer.zero_grad(set_to_none=True)
    per_token, hidden = _divergence(student, teacher, config, ids, mask)
    loss = reduce_tokens(per_token, mask, reduction="token_mean")
    # the reference reads the student's output layer as it was in this forward pass
    reference = float64_reference(hidden["student"], hidden["teacher"], student, teacher, config)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = _divergence(student, teacher, config, ids, mask)
    return StepResult(
        step=step,
        loss=loss.item(),
        loss_after=reduce_tokens(after, mask, reduction="token_mean").item(),
        tokens=ids[:, config.prompt_len :].tolist(),
        mask=mask.tolist(),
        per_token=per_token.detach().double().tolist(),
        reference=torch.where(mask, reference, 0.0).tolist(),
    )


def train(config: DistillConfig, group: ProcessGroup | None) -> tuple[list[StepResult], TensorParallelLM]:
    """Build the models and run ``config.steps`` distillation steps; returns the results and the student."""
    student, teacher = build_models(config, group)
    optimizer = torch.optim.SGD(student.parameters(), lr=config.lr)
    results = [distill_step(student, teacher, optimizer, config, step) for step in range(config.steps)]
    return results, student


def parity_report(config: DistillConfig, results: list[StepResult], student: TensorParallelLM) -> dict[str, float]:
    """Re-run the same steps on this process alone (``group=None``) and measure the largest differences.

    Returns:
        ``max_rel_diff_per_token`` (every masked-in token of every step), ``max_abs_diff_weights`` (the student
        after the last step: this rank's head rows against the same rows of the one-process head).
    """
    one_results, one_student = train(config, None)
    rel = 0.0
    for got, expected in zip(results, one_results, strict=True):
        for gs, es, ms in zip(got.per_token, expected.per_token, got.mask, strict=True):
            for g, e, m in zip(gs, es, ms, strict=True):
                if m:
                    rel = max(rel, abs(g - e) / max(abs(e), 1e-12))
    one_params = dict(one_student.named_parameters())
    weight_diff = 0.0
    for name, param in student.named_parameters():
        full = one_params[name].detach()
        if name == "head.weight":
            layout = student.head.layout
            start, kept = layout.start, layout.kept_size
            pad = torch.zeros(layout.local_size - kept, param.shape[1], dtype=param.dtype)
            full = torch.cat([full[start : start + kept], pad])
        weight_diff = max(weight_diff, (param.detach() - full).abs().max().item())
    return {"max_rel_diff_per_token": rel, "max_abs_diff_weights": weight_diff}


__all__ = [
    "DistillConfig",
    "StepResult",
    "TensorParallelLM",
    "build_causal_lm",
    "build_models",
    "distill_step",
    "float64_reference",
    "parity_report",
    "rollout",
    "teacher_topk",
    "train",
]
