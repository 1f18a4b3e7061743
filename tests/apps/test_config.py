"""Launcher configuration: defaults < TOML file < command line; every problem is a one-line ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardkl.apps.config import ConfigError, ExperimentConfig, load_config, parse_args

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_precedence_command_line_over_file_over_defaults(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('vocab_size = 77\ndelta = 1\ndtype = "bfloat16"\n')
    path, overrides, extra = parse_args(ExperimentConfig, ["--config", str(file), "--delta=0.25", "--seq-len", "9"])
    config = load_config(ExperimentConfig, path, overrides)
    assert extra == {}
    assert (config.vocab_size, config.delta, config.seq_len, config.dtype) == (77, 0.25, 9, "bfloat16")
    assert config.batch_size == ExperimentConfig().batch_size


def test_shipped_configs_load() -> None:
    seed = load_config(ExperimentConfig, str(CONFIGS / "seed.toml"), {})
    assert (seed.vocab_size, seed.seq_len, seed.batch_size, seed.delta) == (1000, 50, 1, 0.1)
    large = load_config(ExperimentConfig, str(CONFIGS / "large.toml"), {})
    assert (large.vocab_size, large.seq_len, large.batch_size) == (32000, 1024, 8)
    for file in CONFIGS.glob("*.toml"):
        load_config(ExperimentConfig, str(file), {})


@pytest.mark.parametrize(
    ("toml", "overrides", "message"),
    [
        ("vocab = 3\n", {}, "unknown key 'vocab'"),
        ('vocab_size = "big"\n', {}, "vocab_size must be int"),
        ("vocab_size = true\n", {}, "vocab_size must be int"),
        ("delta = -1.0\n", {}, "delta must be >= 0"),
        ('dtype = "int8"\n', {}, "dtype must be one of"),
        ("vocab_size = [\n", {}, "not valid TOML"),
        ("", {"samples": "two"}, "samples must be int"),
        ("", {"colour": "red"}, "unknown option --colour"),
        ("", {"temperature": "0"}, "temperature must be > 0"),
    ],
)
def test_bad_configuration_is_one_clear_line(tmp_path: Path, toml: str, overrides: dict, message: str) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(toml)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(ExperimentConfig, str(file), overrides)
    assert "\n" not in str(info.value)


def test_missing_file_and_malformed_arguments() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ExperimentConfig, "/nonexistent/x.toml", {})
    with pytest.raises(ConfigError, match="needs a value"):
        parse_args(ExperimentConfig, ["--delta"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_args(ExperimentConfig, ["delta", "3"])


def test_literal_fields_are_checked_against_their_values() -> None:
    from shardkl.apps.grpo import TPConfig

    config = load_config(TPConfig, None, {"estimator": "k3", "steps": "4", "reduction": "seq_mean_token_sum_norm"})
    assert (config.estimator, config.steps, config.reduction) == ("k3", 4, "seq_mean_token_sum_norm")
    with pytest.raises(ConfigError, match="estimator must be one of exact, k1"):
        load_config(TPConfig, None, {"estimator": "k9"})
