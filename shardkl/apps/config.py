"""Launcher configuration: a frozen dataclass, TOML files and ``--key value`` overrides.

Precedence: command line > TOML file > dataclass defaults. Every problem (unknown key, wrong type, bad
value, missing file) raises :class:`ConfigError` with a one-line message, before any process group exists,
so that every rank of a job fails the same way.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DTYPES = ("float32", "bfloat16", "float16", "float64")
BACKENDS = ("auto", "gloo", "nccl")


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming it."""


@dataclass(frozen=True)
class ExperimentConfig:
    """The seed blog's experiment: reference logits ~ N(0, 1), new = reference + delta * N(0, 1).

    Attributes:
        vocab_size: global vocabulary size V, split over the ranks.
        seq_len: positions per sequence.
        batch_size: sequences.
        delta: scale of the perturbation of the new policy's logits.
        samples: tokens drawn from the reference per position for the estimator statistics.
        seed: seed of the logits and of the samples; results do not depend on the world size.
        dtype: dtype of the logits handed to shardkl.
        temperature: softmax temperature of both policies.
        backend: torch.distributed backend; ``auto`` is nccl with CUDA, else gloo.
        timeout_s: collective timeout in seconds.
        output: path of the JSON result written by rank 0, or empty for none.
    """

    vocab_size: int = 1000
    seq_len: int = 50
    batch_size: int = 1
    delta: float = 0.1
    samples: int = 1
    seed: int = 0
    dtype: str = "float32"
    temperature: float = 1.0
    backend: str = "auto"
    timeout_s: float = 120.0
    output: str = ""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "batch_size", "samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.delta < 0:
            raise ConfigError(f"delta must be >= 0, got {self.delta}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


def _field_types(cls: type) -> dict[str, Any]:
    """Each field's type: a class, or a ``Literal[...]`` whose values are the allowed ones."""
    hints = get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if get_origin(t) in (Union, types.UnionType):
            t = next(a for a in get_args(t) if a is not type(None))
        out[f.name] = t
    return out


def _coerce(name: str, value: Any, kind: Any, source: str) -> Any:
    """Check or convert one value to the field's type; strings from the command line are parsed."""
    if get_origin(kind) is Literal:
        allowed = get_args(kind)
        if value not in allowed:
            raise ConfigError(f"{source}: {name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if isinstance(value, str) and kind is not str:
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{source}: {name} must be {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{source}: {name} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_config(cls: type, path: str | None, overrides: dict[str, str]) -> Any:
    """Build ``cls`` from defaults, then a TOML file, then ``overrides`` (strings from the command line).

    Raises:
        ConfigError: unknown key, wrong type, bad value or unreadable file.
    """
    kinds = _field_types(cls)
    values: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(file.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        for key, value in data.items():
            if key not in kinds:
                raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(kinds)})")
            values[key] = _coerce(key, value, kinds[key], path)
    for key, value in overrides.items():
        if key not in kinds:
            raise ConfigError(f"unknown option --{key.replace('_', '-')} (known: {', '.join(kinds)})")
        values[key] = _coerce(key, value, kinds[key], "command line")
    return cls(**values)


def parse_args(cls: type, argv: list[str]) -> tuple[str | None, dict[str, str], dict[str, str]]:
    """Split ``[--config PATH] [--key value | --key=value ...]`` into (path, overrides, launcher flags).

    Keys may use dashes or underscores. Flags that are not config fields are returned separately for the
    launcher to interpret (it rejects the ones it does not know).
    """
    path: str | None = None
    overrides: dict[str, str] = {}
    extra: dict[str, str] = {}
    kinds = _field_types(cls)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; options are --key value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"option --{key.replace('_', '-')} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            path = value
        elif key in kinds:
            overrides[key] = value
        else:
            extra[key] = value
    return path, overrides, extra
