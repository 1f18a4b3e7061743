"""Every option that a launcher's ``--help`` offers either works or is refused with exit status 2 and one line.

The refusals run in this process (fast); the matrix of every ``Literal`` value of every launcher, each run to the
end on a tiny configuration, is the slow part.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest
import torch

import shardkl
from shardkl.apps import runtime

ROOT = Path(__file__).resolve().parents[2]
# tiny runs of each launcher: every Literal value is tried on top of these
TINY = {
    "exact_kl": ["--vocab_size", "101", "--seq_len", "8"],
    "train_tp": ["--steps", "1", "--prompts", "1", "--group_size", "2", "--response_len", "4", "--layers", "1",
                 "--hidden_size", "16", "--heads", "2", "--vocab_size", "67"],
    "distill_tp": ["--steps", "1", "--vocab_size", "64", "--response_len", "4", "--teacher_layers", "1"],
}


@functools.cache
def _launcher(name: str) -> types.ModuleType:
    """``launch/NAME.py`` as a module (registered, as its dataclasses need)."""
    spec = importlib.util.spec_from_file_location(f"_launch_{name}", ROOT / "launch" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _sections(name: str) -> list[type]:
    module = _launcher(name)
    if name == "exact_kl":
        from shardkl.apps.experiment import ExperimentConfig

        return [ExperimentConfig, module.LaunchOptions]
    if name == "train_tp":
        from shardkl.apps.grpo import TPConfig

        return [TPConfig, module.LaunchOptions]
    if name == "ray_kl":
        from shardkl.apps.experiment import ExperimentConfig

        return [ExperimentConfig, module.RayOptions]
    from shardkl.apps.distill import DistillConfig

    return [DistillConfig, module.LaunchOptions]


def literal_options(name: str) -> list[tuple[str, str]]:
    """``(key, value)`` for every value of every ``Literal`` key of launcher ``name``, as ``--help`` offers them."""
    out = []
    for cls in _sections(name):
        hints = get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if get_origin(hints[field.name]) is Literal:
                out += [(field.name, str(value)) for value in get_args(hints[field.name])]
    return out


@pytest.fixture(autouse=True)
def _restore_process_settings(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A launcher run in this process sets the collective timeout and the thread count: undone after each test."""
    monkeypatch.setattr(shardkl.options, "_process_timeout_s", shardkl.options._process_timeout_s)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _main(name: str, argv: list[str]) -> int:
    """The launcher's exit status for ``argv``, run in this process."""
    try:
        return int(_launcher(name).main(argv))
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for key in ("RAY_ADDRESS", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("train_tp", ["--reduction", "none"], "train_tp.py: error: reduction must be one of token_mean, "
         "seq_mean_token_sum, seq_mean_token_mean, seq_mean_token_sum_norm, sum, got 'none'"),
        ("train_tp", ["--backend", "nccl"], "train_tp.py: error: backend nccl needs one GPU per rank on this machine: "
         "1 rank(s), 0 CUDA device(s); use gloo (or auto)"),
        ("exact_kl", ["--backend", "nccl"], "exact_kl.py: error: backend nccl needs one GPU per rank on this machine: "
         "1 rank(s), 0 CUDA device(s); use gloo (or auto)"),
        ("ray_kl", ["--backend", "nccl"], "ray_kl.py: error: backend nccl needs --use-gpu"),
        ("ray_kl", ["--use-gpu"], "ray_kl.py: error: use_gpu needs one GPU per worker: 2 worker(s) in the embedded "
         "local Ray instance, 0 CUDA device(s) here; drop --use-gpu, or join a cluster with GPUs with --address"),
        ("ray_kl", ["--use-gpu", "--num-workers", "0"], "ray_kl.py: error: use_gpu needs one GPU per worker: 1 "
         "worker(s) in local mode, 0 CUDA device(s) here; drop --use-gpu"),
        ("distill_tp", ["--divergence", "jsd", "--top-k", "8"], "distill_tp.py: error: divergence='jsd' needs the "
         "teacher's full logits: use top_k = 0, or forward_kl or reverse_kl"),
    ],
)
def test_an_option_that_cannot_run_here_is_refused_with_status_2_and_one_line(
    name: str, argv: list[str], message: str, no_gpu: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _main(name, [*argv, "--output", ""]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [message] and out == ""


def test_help_offers_no_reduction_that_cannot_train(capsys: pytest.CaptureFixture[str]) -> None:
    from shardkl.apps.grpo import LossReduction

    assert set(get_args(LossReduction)) == set(shardkl.REDUCTIONS) - {"none"}
    assert _main("train_tp", ["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--reduction {token_mean,seq_mean_token_sum,seq_mean_token_mean,seq_mean_token_sum_norm,sum}" in text


def test_every_launcher_has_literal_options_to_check() -> None:
    offered = {name: {key for key, _ in literal_options(name)} for name in (*TINY, "ray_kl")}
    assert offered == {"exact_kl": {"dtype", "backend"}, "train_tp": {"estimator", "reduction", "dtype", "logits_from",
                       "backend"}, "distill_tp": {"divergence"}, "ray_kl": {"dtype", "backend"}}


def _runs_here(key: str, value: str) -> bool:
    return not (key == "backend" and value == "nccl" and runtime.backend_problem("nccl") is not None)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "key", "value"),
                         [(name, key, value) for name in TINY for key, value in literal_options(name)])
def test_every_literal_value_that_help_offers_runs_or_is_refused_in_one_line(
    name: str, key: str, value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(variable, raising=False)
    extra: list[Any] = []
    if name == "train_tp" and key == "dtype" and value != "float32":
        extra = ["--logits_from", "hidden"]  # the other Literal of the model, with every dtype
    status = _main(name, [*TINY[name], f"--{key}", value, *extra, "--output", ""])
    out, err = capsys.readouterr()
    if _runs_here(key, value):
        assert status == 0, err[-3000:]
        assert out.strip(), "the launcher prints its table"
    else:
        assert status == 2 and len(err.splitlines()) == 1 and err.startswith(f"{name}.py: error: "), err

