"""How a call runs: the one options object every public function and loss helper takes as ``options=``.

What is computed is given by the arguments (logits, tokens, ``group``/``layout``, ``temperature``, ``mask``,
``reduction``); how it is computed is :class:`Options`: which kernels, how strictly the ranks' calls are checked
against each other, what a NaN logit does, and how long a collective may wait.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal, get_args

from shardkl.kernels import Impl, check_impl

NanPolicy = Literal["raise", "propagate"]
NAN_POLICIES: tuple[str, ...] = get_args(NanPolicy)

DEFAULT_TIMEOUT_S = 120.0
_process_timeout_s: float | None = None


def set_collective_timeout(seconds: float) -> None:
    """Set the process-wide default of :attr:`Options.timeout_s` (else ``SHARDKL_TIMEOUT_S``, else 120 s)."""
    global _process_timeout_s
    _process_timeout_s = _check_timeout(seconds)


def default_timeout_s() -> float:
    """The timeout of a call whose options leave it unset: :func:`set_collective_timeout`'s value, else the
    ``SHARDKL_TIMEOUT_S`` environment variable (read at each call), else 120 s."""
    if _process_timeout_s is not None:
        return _process_timeout_s
    text = os.environ.get("SHARDKL_TIMEOUT_S")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        return _check_timeout(float(text))
    except ValueError:
        raise ValueError(f"SHARDKL_TIMEOUT_S must be a number of seconds > 0, got {text!r}") from None


def _check_timeout(seconds: object) -> float:
    number = not isinstance(seconds, bool) and isinstance(seconds, (int, float))
    if not number or not (seconds > 0 and math.isfinite(seconds)):  # type: ignore[operator,arg-type]
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {seconds!r}")
    return float(seconds)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Options:
    """How a shardkl call runs; the same for every rank of the group.

    Args:
        impl: kernels: ``"auto"`` (default), ``"eager"``, ``"compiled"`` (CPU: native C++ kernels; CUDA:
            ``torch.compile``) or ``"triton"`` (CUDA). All give the same results to fp32 rounding; see
            ``docs/performance.md``.
        validate: check that the ranks' calls fit together (shapes, dtypes, temperature, options), folded into the
            one collective. The vocabulary layout, token ids, masks and NaN logits are always checked.
        nan_policy: ``"raise"``: a NaN or ``+inf`` logit raises ``ValueError`` on every rank; ``"propagate"``: the
            tokens concerned get NaN results.
        timeout_s: how long a collective of this call may wait for the other ranks before raising
            :class:`shardkl.CollectiveError`; ``None``: the process default (:func:`set_collective_timeout`, the
            ``SHARDKL_TIMEOUT_S`` environment variable, or 120 s).

    Example:
        >>> shardkl.exact_kl(p, q, group=tp_group, options=shardkl.Options(impl="eager", timeout_s=30))
    """

    impl: Impl = "auto"
    validate: bool = True
    nan_policy: NanPolicy = "raise"
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        check_impl(self.impl)
        if not isinstance(self.validate, bool):
            raise TypeError(f"validate must be a bool, got {type(self.validate).__name__}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if self.timeout_s is not None:
            _check_timeout(self.timeout_s)

    @property
    def resolved_timeout_s(self) -> float:
        """``timeout_s``, or the process default where it is ``None``."""
        return default_timeout_s() if self.timeout_s is None else float(self.timeout_s)


def check_options(options: object) -> Options:
    """``options``, or the defaults for ``None``; ``TypeError`` for anything else."""
    if options is None:
        return Options()
    if not isinstance(options, Options):
        raise TypeError(f"options must be a shardkl.Options or None, got {type(options).__name__}")
    return options


__all__ = ["NAN_POLICIES", "NanPolicy", "Options", "check_options", "default_timeout_s", "set_collective_timeout"]
