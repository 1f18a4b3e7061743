"""Launcher command lines: defaults < TOML file < command line; every problem is one ConfigError line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from shardkl.apps.cli import ConfigError, build_parser, parse_config
from shardkl.apps.distill import DistillConfig
from shardkl.apps.experiment import ExperimentConfig
from shardkl.apps.grpo import TPConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class Flags:
    """launcher"""

    verify: bool = False
    """re-run on one process"""
    output: str = "results/x.json"
    """where the JSON goes"""
    mode: Literal["a", "b"] = "a"
    """a mode"""


def _parse(argv: list[str]) -> tuple[ExperimentConfig, Flags]:
    config, flags = parse_config([ExperimentConfig, Flags], argv, prog="x", description="test")
    return config, flags


def _file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_precedence_command_line_over_file_over_defaults(tmp_path: Path) -> None:
    path = _file(tmp_path, 'vocab_size = 77\ndelta = 1\ndtype = "bfloat16"\nseq_len = 5\n')
    # the command line wins wherever --config stands
    first = ["--config", path, "--delta=0.25", "--seq-len", "9"]
    last = ["--delta", "0.25", "--seq_len=9", "--config", path]
    for argv in (first, last):
        config, _ = _parse(argv)
        assert (config.vocab_size, config.delta, config.seq_len, config.dtype) == (77, 0.25, 9, "bfloat16")
        assert config.batch_size == ExperimentConfig().batch_size
    config, flags = _parse([])
    assert config == ExperimentConfig() and flags == Flags()


def test_dashes_and_boolean_flags() -> None:
    _, flags = _parse(["--verify", "--output", "o.json"])
    assert flags.verify and flags.output == "o.json"
    assert _parse(["--verify", "false"])[1].verify is False
    assert _parse(["--verify=true"])[1].verify is True
    assert _parse(["--output", "", "--verify"])[1] == Flags(verify=True, output="")
    assert _parse(["--batch-size", "3"])[0].batch_size == 3


def test_launcher_keys_may_come_from_the_file_too(tmp_path: Path) -> None:
    _, flags = _parse(["--config", _file(tmp_path, 'verify = true\nmode = "b"\n')])
    assert flags == Flags(verify=True, mode="b")


def test_shipped_configs_load() -> None:
    seed, _ = _parse(["--config", str(CONFIGS / "seed.toml")])
    assert (seed.vocab_size, seed.seq_len, seed.batch_size, seed.delta) == (1000, 50, 1, 0.1)
    large, _ = _parse(["--config", str(CONFIGS / "large.toml")])
    assert (large.vocab_size, large.seq_len, large.batch_size) == (32000, 1024, 8)
    # every shipped file loads with the configuration of its launcher
    for file in CONFIGS.glob("*.toml"):
        cls = DistillConfig if file.stem == "distill" else ExperimentConfig
        parse_config([cls], ["--config", str(file)], prog="x", description="")
    tp, _ = parse_config([TPConfig, Flags], ["--config", str(CONFIGS / "tp" / "train_tp.toml")], prog="x",
                         description="")
    assert (tp.steps, tp.response_len, tp.kl_coef) == (3, 10, 0.1)


@pytest.mark.parametrize(
    ("toml", "argv", "message"),
    [
        ("vocab = 3\n", [], "{path}: unknown key 'vocab' (known: vocab_size, seq_len,"),
        ('vocab_size = "big"\n', [], "{path}: vocab_size must be int, got 'big'"),
        ("vocab_size = true\n", [], "{path}: vocab_size must be int, got"),
        ('dtype = "int8"\n', [], "{path}: dtype must be one of float32, bfloat16, float16, float64, got 'int8'"),
        ("vocab_size = [\n", [], "{path}: not valid TOML"),
        ("delta = -1.0\n", [], "delta must be >= 0, got -1.0"),
        ("", ["--samples", "two"], "command line: samples must be int, got 'two'"),
        ("", ["--colour", "red"], "command line: unknown option --colour (known: vocab_size,"),
        ("", ["--temperature", "0"], "temperature must be > 0, got 0.0"),
        ("", ["--mode", "c"], "command line: mode must be one of a, b, got 'c'"),
        ("", ["--delta"], "command line: argument --delta: expected one argument"),
        ("", ["delta", "3"], "command line: unexpected argument 'delta'; options are --key value"),
    ],
)
def test_bad_configuration_is_one_clear_line(tmp_path: Path, toml: str, argv: list[str], message: str) -> None:
    path = _file(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        _parse(["--config", path, *argv])
    assert str(info.value).startswith(message.format(path=path)), str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_missing_value() -> None:
    with pytest.raises(ConfigError, match="^config file not found: /nonexistent/x.toml$"):
        _parse(["--config", "/nonexistent/x.toml"])
    with pytest.raises(ConfigError, match="^option --config needs a value$"):
        _parse(["--config"])
    # without a file, a command-line error carries no "command line: " prefix
    with pytest.raises(ConfigError, match="^vocab_size must be int, got 'many'$"):
        _parse(["--vocab-size", "many"])


def test_literal_fields_are_checked_against_their_values() -> None:
    config, _ = parse_config([TPConfig, Flags], ["--estimator", "k3", "--steps", "4", "--reduction",
                                                 "seq_mean_token_sum_norm"], prog="x", description="")
    assert (config.estimator, config.steps, config.reduction) == ("k3", 4, "seq_mean_token_sum_norm")
    with pytest.raises(ConfigError, match="estimator must be one of exact, k1"):
        parse_config([TPConfig, Flags], ["--estimator", "k9"], prog="x", description="")


def test_help_lists_every_key_with_its_default_and_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parse(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for cls in (ExperimentConfig, Flags):
        for field in dataclasses.fields(cls):
            assert f"--{field.name}" in text, field.name
            assert f"default: {field.default}" in text, field.name
    assert "global vocabulary size V, split over the ranks" in text
    assert "re-run on one process" in text
    assert "--config FILE.toml" in text


def test_field_names_must_not_repeat_across_sections() -> None:
    @dataclass(frozen=True)
    class Clash:
        seed: int = 1

    with pytest.raises(ValueError, match="repeat"):
        build_parser([ExperimentConfig, Clash], prog="x", description="")
