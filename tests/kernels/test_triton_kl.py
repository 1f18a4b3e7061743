"""The Triton kernels (run by the Triton interpreter on CPU) give the eager path's values and gradients, and
compile ahead of time for sm_80 and sm_90 (every autotuner config)."""

from __future__ import annotations

import os
import sys

import pytest

# The interpreter is chosen when a kernel is decorated, i.e. when triton (whose tl.sum, tl.max, ... are kernels
# too) and triton_kl are imported: set it for those imports only, then restore the environment (the fixture
# below sets it again for this module's tests). It must come before importorskip, which imports triton.
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported without TRITON_INTERPRET=1 earlier in this process", allow_module_level=True)
_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
import torch  # noqa: E402

import shardkl  # noqa: E402
from shardkl import _dispatch, _stats  # noqa: E402
from shardkl.kernels import eager, triton_kl  # noqa: E402

if _previous is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _previous

from tests.kernels.cases import (  # noqa: E402
    TINY_KL_BOUNDS,
    case,
    check_edge_rows,
    check_public_api_against_eager,
    edge_rows,
    saved,
    tiny_kl_inputs,
)

F32 = torch.float32
# the interpreter evaluates both sides of every `where` in numpy, which warns about the discarded side's inf/NaN
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_kernels_run_in_the_interpreter() -> None:
    assert type(triton_kl._stats_kernel).__name__ == "InterpretedFunction"
    assert type(triton_kl._grads_kernel).__name__ == "InterpretedFunction"


def test_exp_gap_is_accurate_across_scales() -> None:
    mags = torch.logspace(-8, 1.5, 400, dtype=torch.float64)
    d = torch.cat(
        [mags, -mags, torch.tensor([0.0, 0.4999, 0.5, 0.5001, -0.5, float("inf"), float("-inf")], dtype=torch.float64)]
    )
    d32 = d.float()
    got = triton_kl.exp_gap(d32).double()
    want = torch.expm1(d32.double()) - d32.double()
    finite = torch.isfinite(want)
    rel = ((got - want).abs() / want.abs().clamp_min(1e-300))[finite & (want != 0)]
    assert rel.max() < 2e-6, rel.max()
    assert got[d == 0].item() == 0.0
    assert (got[d.isinf()] == float("inf")).all()
    assert (got[finite] >= 0).all()


@pytest.mark.parametrize(
    ("shape", "dtype", "temperature", "block"),
    [
        ((9, 300), F32, 0.7, 64),
        ((9, 300), torch.bfloat16, 1.0, 128),
        ((3, 1271), F32, 1.0, 256),
        ((3, 1271), torch.float16, 0.7, 512),
        ((9, 2000), F32, 1.0, 2048),
    ],
)
@pytest.mark.parametrize("two_inputs", [True, False])
def test_stats_match_eager(shape, dtype, temperature, block, two_inputs) -> None:
    a, b, _ = case(shape, dtype)
    if shape[0] >= 8:
        a, b = edge_rows(a, b)
    bb = b if two_inputs else None
    got = triton_kl.kl_stats(a, bb, temperature=temperature, dtype=F32, block=block)
    want = eager.kl_stats(a, bb, temperature=temperature, dtype=F32)
    assert got.shape == want.shape == (4 if two_inputs else 2, shape[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    if shape[0] >= 8:
        check_edge_rows(got, two_inputs)


def test_entropy_off_keeps_the_other_rows() -> None:
    a, b, _ = case((5, 700), F32)
    want = eager.kl_stats(a, b, temperature=1.0, dtype=F32)
    got = triton_kl.kl_stats(a, b, temperature=1.0, dtype=F32, entropy=False, block=128)
    rows = [_stats.LA, _stats.LB, _stats.KL]
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-5, atol=1e-6)


def test_tiles_merged_by_the_chain_rule_keep_a_tiny_kl() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 1000, generator=g, dtype=torch.float64) * 3
    b = a + 1e-3 * torch.randn(4, 1000, generator=g, dtype=torch.float64) + 3.0
    got = triton_kl.kl_stats(a.float(), b.float(), temperature=1.0, dtype=F32, block=128)[_stats.KL].double()
    a32, b32 = a.float().double(), b.float().double()
    want = (torch.softmax(a32, -1) * (torch.log_softmax(a32, -1) - torch.log_softmax(b32, -1))).sum(-1)
    assert (got > 0).all() and (want < 1e-5).all()  # KL ~ 5e-7: the textbook formula loses every digit here
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)


@pytest.mark.parametrize(("true_kl", "eps", "bound"), TINY_KL_BOUNDS)
def test_tiny_kl_meets_the_bound_at_a_152k_vocabulary(true_kl, eps, bound) -> None:
    a, b, want = tiny_kl_inputs(eps, tokens=4)
    # the smallest autotuned tile: the most merges per row
    got = triton_kl.kl_stats(a, b, temperature=1.0, dtype=F32, block=1024)[_stats.KL].double()
    assert (got > 0).all()
    worst = ((got - want).abs() / want).max().item()
    assert worst < bound, f"worst relative error {worst:.2e} at KL {true_kl:g}"


def test_identical_inputs_give_exactly_zero() -> None:
    a, _, _ = case((4, 900), F32)
    assert (triton_kl.kl_stats(a, a.clone(), temperature=0.7, dtype=F32, block=128)[_stats.KL] == 0).all()


def test_strided_views_and_fp64_fallback() -> None:
    a, b, _ = case((300, 6), F32)
    a, b = a.t(), b.t()  # column stride != 1: copied
    torch.testing.assert_close(triton_kl.kl_stats(a, b, temperature=0.7, dtype=F32),
                               eager.kl_stats(a, b, temperature=0.7, dtype=F32))
    a, b, _ = case((5, 400), F32)
    view_a, view_b = a[1:4, 50:333], b[1:4, 50:333]  # row stride 400, 283 columns
    torch.testing.assert_close(triton_kl.kl_stats(view_a, view_b, temperature=1.0, dtype=F32, block=64),
                               eager.kl_stats(view_a, view_b, temperature=1.0, dtype=F32))
    d = triton_kl.kl_stats(a.double(), b.double(), temperature=1.0, dtype=torch.float64)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d, eager.kl_stats(a.double(), b.double(), temperature=1.0, dtype=torch.float64))


@pytest.mark.parametrize(
    ("shape", "dtype", "temperature", "block", "present", "two_inputs"),
    [
        ((6, 300), F32, 0.7, 64, "kepqt", True),
        ((6, 300), torch.bfloat16, 1.0, 128, "kept", True),
        ((3, 1271), F32, 0.7, 256, "kqt", True),
        ((3, 1271), F32, 1.0, 512, "ept", False),
        ((6, 300), F32, 1.0, 64, "e", True),
        ((6, 300), F32, 0.7, 64, "kepq", True),
    ],
)
def test_grads_match_eager(shape, dtype, temperature, block, present, two_inputs) -> None:
    a, b, tokens = case(shape, dtype)
    bb = b if two_inputs else None
    inputs = saved(a, bb, tokens, temperature, present)
    got_a, got_b = torch.empty_like(a), torch.empty_like(b)
    triton_kl.kl_grads(a, bb, temperature=temperature, dtype=F32, inputs=inputs, grad_a=got_a,
                    grad_b=got_b if two_inputs else None, block=block)
    want_a, want_b = torch.empty_like(a), torch.empty_like(b)
    eager.kl_grads(a, bb, temperature=temperature, dtype=F32, inputs=inputs, grad_a=want_a, grad_b=want_b)
    tol = 1e-5 if dtype == F32 else 1e-2
    torch.testing.assert_close(got_a, want_a, rtol=tol, atol=tol * 0.02)
    if two_inputs:
        torch.testing.assert_close(got_b, want_b, rtol=tol, atol=tol * 0.02)


@pytest.mark.parametrize(("shape", "dtype", "temperature"), [((6, 300), F32, 0.7), ((3, 1271), torch.bfloat16, 1.0)])
def test_public_api_matches_eager(monkeypatch, shape, dtype, temperature) -> None:
    monkeypatch.setattr(triton_kl, "DEFAULT_BLOCK", 256)  # several tiles per row
    check_public_api_against_eager("triton", shape, dtype, temperature)


def test_triton_needs_cuda_or_the_interpreter(monkeypatch) -> None:
    assert _dispatch.resolve("triton", torch.device("cpu"), F32).name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        triton_kl.kernels(torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        shardkl.exact_kl(torch.zeros(2, 3), torch.zeros(2, 3), options=shardkl.Options(impl="triton"))


_COMPILE_FOR_CUDA = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.errors import CompilationError
from shardkl.kernels import triton_kl

def compile_(fn, signature, constexprs, capability, warps):
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    try:
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
    except CompilationError as exc:
        print("COMPILATION_ERROR", capability, constexprs, exc)
        sys.exit(1)
    except Exception as exc:  # no CUDA backend or ptxas here: not a bug of the kernels
        print("UNAVAILABLE", type(exc).__name__, exc)
        sys.exit(0)
    assert "ptx" in compiled.asm and "cubin" in compiled.asm

stats = dict(a_ptr="*bf16", b_ptr="*bf16", out_ptr="*fp32", rows="i32", cols="i32", stride_a="i64", stride_b="i64",
             inv_t="fp32")
grads = {name: "*fp32" for name in ("lse_a_ptr", "lse_b_ptr", "kl_ptr", "ent_ptr", "grad_kl_ptr", "grad_ent_ptr",
                                    "grad_logp_ptr", "grad_logq_ptr")}
grads.update(a_ptr="*bf16", b_ptr="*bf16", grad_a_ptr="*bf16", grad_b_ptr="*bf16", token_cols_ptr="*i64", cols="i32",
             stride_a="i64", stride_b="i64", inv_t="fp32")
names = ("HAS_B", "HAS_KL", "HAS_ENT", "HAS_LOGP", "HAS_LOGQ", "WRITE_A", "WRITE_B")
for capability in (80, 90):
    # every autotuner config of the common variants, and the other variants with one config
    for block, warps in triton_kl.CONFIGS:
        compile_(triton_kl._stats_kernel, stats, {"HAS_B": True, "ENTROPY": False, "BLOCK": block}, capability, warps)
        flags = dict(zip(names, (1, 1, 0, 0, 0, 1, 1)))
        compile_(triton_kl._grads_kernel, grads, dict(flags, BLOCK=block), capability, warps)
    for has_b, entropy in ((True, True), (False, True)):
        compile_(triton_kl._stats_kernel, stats, {"HAS_B": has_b, "ENTROPY": entropy, "BLOCK": 2048}, capability, 8)
    for flags in [(1, 1, 1, 1, 1, 1, 1), (0, 0, 1, 1, 0, 1, 0), (1, 0, 0, 0, 1, 0, 1)]:
        compile_(triton_kl._grads_kernel, grads, dict(zip(names, map(bool, flags)), BLOCK=2048), capability, 8)
print("COMPILED")
"""


def test_kernels_compile_for_sm80_and_sm90_without_a_gpu(monkeypatch) -> None:
    """The interpreter accepts Python that the Triton compiler rejects: compile ahead of time for both targets."""
    import subprocess

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_CUDA], capture_output=True, text=True, env=env, timeout=600, cwd=root
    )
    assert done.returncode == 0, done.stdout + done.stderr
    if "UNAVAILABLE" in done.stdout:
        pytest.skip(done.stdout.strip())
    assert "COMPILED" in done.stdout, done.stdout + done.stderr
