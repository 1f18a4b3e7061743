"""Tensor-parallel GRPO step (column-parallel Llama lm_head on gloo ranks) against the one-process run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

import shardkl  # noqa: E402
from shardkl.apps.grpo import TPConfig, build_policy_and_reference, grpo_step, rollout  # noqa: E402
from tests._distributed import run_ranks  # noqa: E402
from tests.reference import reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
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
        with shardkl.count_collectives() as counter:
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
        if step == 0:
            assert got.kl_penalty == 0.0, "the policy starts as the reference"
            assert torch.count_nonzero(tp_policy.head.weight.grad) > 0
        # the KL after the step: > 0, equal to the one-process value and to a float64 textbook reference
        assert got.exact_kl_after > 1e-3
        ids, mask, _ = one_batch
        with torch.no_grad():
            p_logits = one_policy(ids)[:, config.prompt_len - 1 : -1, :valid].double()
            q_logits = one_reference(ids)[:, config.prompt_len - 1 : -1, :valid].double()
        textbook = (reference(p_logits, q_logits)["exact_kl"] * mask).sum() / mask.sum()
        assert got.exact_kl_after == pytest.approx(textbook.item(), rel=1e-4)


@pytest.mark.parametrize("estimator", ["exact", "k3+"])
def test_tp_grpo_step_matches_one_process(estimator: str) -> None:
    run_ranks(_check_parity, 2, dataclasses.replace(CONFIG, estimator=estimator))


@pytest.mark.slow
def test_train_tp_under_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ROOT / "launch" / "train_tp.py"), "--config", str(ROOT / "configs" / "tp" / "train_tp.toml"),
        "--steps", "2", "--verify", "--json", str(out),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exact_kl_after" in proc.stdout
    result = json.loads(out.read_text())
    # the command line (steps=2) wins over the file (steps=3), the file (response_len=10) over the defaults (12)
    assert result["world_size"] == 2 and len(result["steps"]) == 2
    assert result["config"]["response_len"] == 10 and result["config"]["estimator"] == "exact"
    assert result["steps"][0]["kl_penalty"] == 0.0
    assert all(step["exact_kl_after"] > 1e-3 for step in result["steps"])
    verify = result["verify"]
    assert verify["max_rel_diff_scalars"] < 1e-4, verify
    assert verify["max_abs_diff_grads"] < 1e-5 and verify["max_abs_diff_weights"] < 1e-5, verify
