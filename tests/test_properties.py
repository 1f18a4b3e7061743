"""Property-based tests (hypothesis) over shapes, vocabulary splits with empty shards, dtypes, temperatures."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardkl
from shardkl import _stats
from shardkl._sources import compute_dtype
from shardkl.kernels import eager
from tests.reference import reference

# SHARDKL_HYPOTHESIS_EXAMPLES=400 for a deeper local search
SETTINGS = settings(
    max_examples=int(os.environ.get("SHARDKL_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}


@st.composite
def cases(draw):
    rows = draw(st.integers(1, 5))
    vocab = draw(st.integers(1, 70))
    world = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(0, vocab), min_size=world - 1, max_size=world - 1)))
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    temperature = draw(st.floats(0.3, 3.0))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    delta = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale
    b = a + delta * torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    if draw(st.booleans()):  # a padded tail, -inf in both inputs
        pad = draw(st.integers(1, 5))
        a[:, -pad:], b[:, -pad:] = float("-inf"), float("-inf")
        a[:, 0], b[:, 0] = a[:, 0].clamp(min=0), b[:, 0].clamp(min=0)  # keep some mass
    return a.to(dtype), b.to(dtype), [0, *cuts, vocab], temperature


def _split_stats(a: torch.Tensor, b: torch.Tensor, cuts: list[int], temperature: float) -> torch.Tensor:
    """What the ranks of a group compute: stats of each shard, merged in rank order (the gather is the identity)."""
    dtype = compute_dtype(a, b)
    shards = [
        (
            eager.kl_stats(a[:, lo:hi], b[:, lo:hi], temperature=temperature, dtype=dtype).double()
            if hi > lo
            # an empty shard is the identity of the merge: no mass, zero entropy and KL
            else torch.tensor([[float("-inf")], [0.0], [float("-inf")], [0.0]], dtype=torch.float64).expand(4, len(a))
        )
        for lo, hi in zip(cuts, cuts[1:], strict=False)
    ]
    return _stats.merge_stats(torch.stack(shards))


@SETTINGS
@given(cases())
def test_kl_is_non_negative_and_zero_for_identical_inputs(case) -> None:
    a, b, _, temperature = case
    kl = shardkl.exact_kl(a, b, temperature=temperature)
    assert (kl >= 0).all()
    assert torch.equal(shardkl.exact_kl(a, a, temperature=temperature), torch.zeros_like(kl))


@SETTINGS
@given(cases(), st.floats(-50, 50), st.floats(-50, 50))
def test_invariant_to_a_per_row_constant(case, shift_a, shift_b) -> None:
    a, b, _, temperature = case
    if a.dtype == torch.bfloat16:  # a shift re-rounds bf16 logits: compare in the compute dtype instead
        a, b = a.float(), b.float()
    base = shardkl.kl_stats(a, b, temperature=temperature)
    shifted = shardkl.kl_stats(a + shift_a, b + shift_b, temperature=temperature)
    tol = 1e-9 if a.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(shifted.exact_kl, base.exact_kl, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(shifted.entropy, base.entropy, rtol=tol, atol=tol * 10)


@SETTINGS
@given(cases())
def test_every_vocabulary_split_gives_the_same_result(case) -> None:
    a, b, cuts, temperature = case
    whole = _split_stats(a, b, [0, a.shape[-1]], temperature)
    split = _split_stats(a, b, cuts, temperature)
    torch.testing.assert_close(split, whole, rtol=TOL[a.dtype], atol=TOL[a.dtype], equal_nan=True)


@SETTINGS
@given(cases())
def test_values_and_gradients_match_float64_reference(case) -> None:
    a, b, _, temperature = case
    a0, b0 = a.clone(), b.clone()
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = shardkl.kl_stats(x, y, temperature=temperature)
    (got.exact_kl.sum() + 0.5 * got.entropy.sum()).backward()
    # the reference sees only the columns with mass: autograd through log_softmax turns -inf into NaN everywhere
    kept = int((a != float("-inf")).any(0).sum())
    xr, yr = a[:, :kept].double().requires_grad_(), b[:, :kept].double().requires_grad_()
    ref = reference(xr, yr, temperature=temperature)
    (ref["exact_kl"].sum() + 0.5 * ref["entropy"].sum()).backward()
    tol = TOL[a.dtype]
    torch.testing.assert_close(got.exact_kl.double(), ref["exact_kl"].detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(got.entropy.double(), ref["entropy"].detach(), rtol=tol, atol=tol)
    gtol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2}[a.dtype]
    for mine, full in ((x.grad, xr.grad), (y.grad, yr.grad)):
        assert mine.dtype == a.dtype
        torch.testing.assert_close(mine[:, :kept].double(), full, rtol=gtol, atol=gtol)
        assert (mine[:, kept:] == 0).all()
    # inputs are never modified
    assert torch.equal(a, a0) and torch.equal(b, b0)
