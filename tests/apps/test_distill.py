"""The distillation demo's configuration and its float64 reference, in-process (the launcher runs in
tests/launch/test_distill_tp.py)."""

from __future__ import annotations

import pytest
import torch

import shardkl
from shardkl.apps.cli import ConfigError, parse_config
from shardkl.apps.distill import DistillConfig, build_models, float64_reference, rollout, teacher_topk


def _load(*argv: str) -> DistillConfig:
    (config,) = parse_config([DistillConfig], ["--config", "configs/distill.toml", *argv], prog="x", description="")
    return config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--divergence", "jsd", "--top-k", "4"], "divergence='jsd' needs the teacher's full logits"),
        (["--divergence", "kl"], "divergence must be one of forward_kl, reverse_kl, jsd"),
        (["--beta", "1.5"], r"beta must be in \[0, 1\], got 1.5"),
        (["--student-hidden-size", "30"], "student_hidden_size must be a multiple of heads=4"),
        (["--top_k", "600"], r"top_k must be in \[0, vocab_size=512\]"),
        (["--response-len", "0"], "response_len must be >= 1"),
    ],
)
def test_bad_configuration_is_one_clear_error(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _load(*argv)
    assert "\n" not in str(info.value)


def test_config_file_loads_with_different_hidden_sizes() -> None:
    config = _load()
    assert config.teacher_hidden_size != config.student_hidden_size and config.divergence == "jsd"


@pytest.mark.parametrize(("divergence", "top_k"), [("forward_kl", 0), ("reverse_kl", 0), ("jsd", 0),
                                                    ("forward_kl", 5), ("reverse_kl", 5)])
def test_reference_matches_shardkl_on_one_process(divergence: str, top_k: int) -> None:
    config = DistillConfig(vocab_size=64, teacher_hidden_size=16, student_hidden_size=8, response_len=3,
                           divergence=divergence, top_k=top_k, beta=0.3)  # type: ignore[arg-type]
    student, teacher = build_models(config, None)
    ids, mask = rollout(student, config, 0)
    with torch.no_grad():
        hs = student.hidden(ids)[:, config.prompt_len - 1 : -1]
        ht = teacher.hidden(ids)[:, config.prompt_len - 1 : -1]
        want = float64_reference(hs, ht, student, teacher, config)
        s_logits = hs @ student.full_head().T
        if top_k:
            got = shardkl.distillation_loss(s_logits, teacher_topk(ht, teacher.full_head(), top_k),
                                            divergence=divergence, reduction="none")  # type: ignore[arg-type]
        else:
            t_logits = ht @ teacher.full_head().T
            got = shardkl.distillation_loss(s_logits, t_logits, divergence=divergence,  # type: ignore[arg-type]
                                            beta=0.3 if divergence == "jsd" else None, reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
