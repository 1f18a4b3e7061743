"""Every kernel implementation gives the eager path's results (values and gradients) to fp32 rounding."""

from __future__ import annotations

import pytest
import torch

import shardkl
from shardkl import kernels
from tests.reference import reference


def _case(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g) * 2
    b = a + 0.3 * torch.randn(*shape, generator=g)
    a[..., -3:] = float("-inf")  # a padded tail
    b[..., -3:] = float("-inf")
    a[0, 5] = -200.0  # P underflows to 0 where Q has mass
    tokens = torch.randint(0, shape[-1] - 3, shape[:-1], generator=g)
    return a.to(dtype), b.to(dtype), tokens


@pytest.mark.parametrize(("shape", "dtype", "temperature"), [((41, 1271), torch.float32, 1.0),
                                                             ((7, 300), torch.bfloat16, 0.7)])
def test_compiled_matches_eager_values_and_gradients(shape, dtype, temperature) -> None:
    a, b, tokens = _case(shape, dtype)
    results = {}
    for impl in ("eager", "compiled"):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        stats = shardkl.kl_stats(x, y, tokens, temperature=temperature, options=shardkl.Options(impl=impl))
        (stats.exact_kl.sum() + 0.3 * stats.entropy.sum() + stats.k3.sum()).backward()
        results[impl] = (stats, x.grad, y.grad)
    (s_e, ga_e, gb_e), (s_c, ga_c, gb_c) = results["eager"], results["compiled"]
    for name in ("exact_kl", "entropy", "p_logprobs", "q_logprobs", "k3"):
        torch.testing.assert_close(getattr(s_c, name), getattr(s_e, name), rtol=1e-5, atol=1e-6, msg=name)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ga_c, ga_e, rtol=tol, atol=tol * 0.2)
    torch.testing.assert_close(gb_c, gb_e, rtol=tol, atol=tol * 0.2)
    ref = reference(a[..., :-3], b[..., :-3], tokens, temperature)["exact_kl"]
    torch.testing.assert_close(s_c.exact_kl.double(), ref, rtol=1e-5, atol=1e-6)


def test_impl_is_checked_and_auto_picks_eager_for_small_cpu_calls() -> None:
    with pytest.raises(ValueError, match="impl must be one of"):
        shardkl.exact_kl(torch.zeros(2, 3), torch.zeros(2, 3), options=shardkl.Options(impl="cuda"))
    assert kernels.resolve("auto", torch.device("cpu"), 1000).name == "eager"
    assert kernels.resolve("eager", torch.device("cpu"), 1 << 30).name == "eager"


def test_auto_falls_back_to_eager_when_compilation_fails(monkeypatch) -> None:
    from shardkl.kernels import compiled

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "leaf", broken)
    monkeypatch.setattr(kernels, "_compile_failed", False)
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.setattr(kernels, "AUTO_COMPILE_ELEMENTS", 0)
    a, b, _ = _case((3, 50), torch.float32)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        got = shardkl.exact_kl(a, b, options=shardkl.Options(impl="auto"))
    torch.testing.assert_close(got, shardkl.exact_kl(a, b, options=shardkl.Options(impl="eager")))
    assert kernels.resolve("auto", torch.device("cpu"), 1 << 30).name == "eager"  # and it stays eager
