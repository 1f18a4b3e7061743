"""Tensor-parallel GRPO step (column-parallel Llama lm_head on gloo ranks) against the one-process run; its table."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

import shardkl  # noqa: E402
import shardkl.testing  # noqa: E402
from shardkl.apps.grpo import (  # noqa: E402
    STEP_COLUMNS,
    StepResult,
    TPConfig,
    build_policy_and_reference,
    format_steps,
    grpo_step,
    rollout,
)
from tests._distributed import run_ranks  # noqa: E402
from tests.reference import reference  # noqa: E402

CONFIG = TPConfig(vocab_size=1003, hidden_size=64, layers=2, prompts=2, group_size=3, response_len=8, steps=2)


def _assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # fp32 tolerance: the sharded and the one-process runs round differently (matmul widths, merge order)
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-6, msg=what)


def _check_parity(rank: int, world: int, config: TPConfig) -> None:
    group = dist.group.WORLD
    tp_policy, tp_reference = build_policy_and_reference(config, group)
    one_policy, one_reference = build_policy_and_reference(config, None)
    tp_opt = torch.optim.SGD(tp_policy.parameters(), lr=config.lr)
    one_opt = torch.optim.SGD(one_policy.parameters(), lr=config.lr)
    local = tp_policy.head.weight.shape[0]
    rows = slice(rank * local, (rank + 1) * local)
    valid = config.vocab_size
    kept = max(min(valid - rank * local, local), 0)
    assert local * world >= valid and kept < local or rank < world - 1, "the vocabulary is padded on the last rank"
    for step in range(config.steps):
        tp_batch = rollout(tp_policy, config, step)
        one_batch = rollout(one_policy, config, step)
        for got, expected in zip(tp_batch, one_batch, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)  # same on-policy samples
        with shardkl.testing.count_collectives() as counter:
            got = grpo_step(tp_policy, tp_reference, tp_opt, config, tp_batch, step)
        # shardkl: forward of the loss and of the re-measured KL (one each, + one on the first uneven call);
        # the model: one all-reduce of dloss/dh in backward
        assert counter.calls.get("all_reduce", 0) == 1, counter.calls
        expected = grpo_step(one_policy, one_reference, one_opt, config, one_batch, step)
        for field in dataclasses.fields(got):
            assert getattr(got, field.name) == pytest.approx(getattr(expected, field.name), rel=1e-4, abs=1e-6), (
                field.name, got, expected
            )
        # gradients (still in .grad) and updated weights: the trunk is replicated, the head is split by rows
        one_params = dict(one_policy.named_parameters())
        for name, param in tp_policy.named_parameters():
            full = one_params[name]
            if name == "head.weight":
                _assert_close(param.grad[:kept], full.grad[rows][:kept], f"{name}.grad step {step}")
                _assert_close(param.detach()[:kept], full.detach()[rows][:kept], f"{name} step {step}")
                assert (param.grad[kept:] == 0).all() and (param.detach()[kept:] == 0).all(), "padding rows"
            else:
                _assert_close(param.grad, full.grad, f"{name}.grad step {step}")
                _assert_close(param.detach(), full.detach(), f"{name} step {step}")
        # the loss is what its columns say it is
        assert got.kl_term == pytest.approx(config.kl_coef * got.kl_estimate, rel=1e-12)
        assert got.loss == pytest.approx(got.policy_loss + got.kl_term, rel=1e-5, abs=1e-7)
        if config.estimator == "exact":
            assert got.kl_estimate == pytest.approx(got.exact_kl, rel=1e-5, abs=1e-9)
        if step == 0:
            assert got.kl_estimate == 0.0 and got.exact_kl == 0.0, "the policy starts as the reference"
            assert torch.count_nonzero(tp_policy.head.weight.grad) > 0
        # the KL after the step, on the same batch: > 0, equal to the one-process value and to a float64 textbook
        assert got.exact_kl_after_update > 1e-3
        ids, mask, _ = one_batch
        with torch.no_grad():
            p_logits = one_policy(ids)[:, config.prompt_len - 1 : -1, :valid].double()
            q_logits = one_reference(ids)[:, config.prompt_len - 1 : -1, :valid].double()
        textbook = (reference(p_logits, q_logits)["exact_kl"] * mask).sum() / mask.sum()
        assert got.exact_kl_after_update == pytest.approx(textbook.item(), rel=1e-4)


@pytest.mark.parametrize(("estimator", "logits_from"), [("exact", "logits"), ("k3+", "logits"), ("k3+", "hidden")])
def test_tp_grpo_step_matches_one_process(estimator: str, logits_from: str) -> None:
    # logits_from="hidden": the loss reads hidden states and head rows (LinearLogits), never the logits
    run_ranks(_check_parity, 2, dataclasses.replace(CONFIG, estimator=estimator, logits_from=logits_from))


def test_steps_table_names_its_columns_and_explains_them_under_it() -> None:
    results = [StepResult(0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.2), StepResult(1, 0.51, 0.5, 0.01, 0.1, 0.1, 0.3)]
    text = format_steps(results, CONFIG)
    lines = text.splitlines()
    assert lines[0].split() == list(STEP_COLUMNS) == [f.name for f in dataclasses.fields(StepResult)]
    assert lines[2].split() == ["1", "0.51", "0.5", "0.01", "0.1", "0.1", "0.3"]
    assert f"kl_coef={CONFIG.kl_coef}  estimator={CONFIG.estimator}  reduction={CONFIG.reduction}" in text
    legend = " ".join(text.split())
    for name, meaning in STEP_COLUMNS.items():
        assert f"{name}: {meaning}" in legend
    assert max(len(line) for line in lines) <= 112
    assert "kl_coef * kl_estimate" in STEP_COLUMNS["kl_term"]
    assert "same batch" in STEP_COLUMNS["exact_kl_after_update"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"group_size": 1}, "group_size must be >= 2"), ({"heads": 3}, "hidden_size must be a multiple of heads"),
     ({"steps": 0}, "steps must be >= 1")],
)
def test_bad_tp_config_raises_value_error(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TPConfig(**changes)
