"""Fixtures of the kernel tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def cpu_built() -> None:
    """The C++ CPU kernels, built (or loaded from the disk cache); the module is skipped where they cannot be.

    A fixture, not work at import: building imports torch._inductor, which imports triton, which must not be imported
    before tests/kernels/test_triton_kl.py is collected (it sets up Triton's interpreter)."""
    from shardkl.kernels import cpu

    try:
        cpu.build(torch.float32)
    except Exception as exc:  # no C++ compiler here: the fallback tests cover that path
        pytest.skip(f"the C++ CPU kernels cannot be built here: {exc}")
