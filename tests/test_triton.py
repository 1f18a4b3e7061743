"""The Triton kernels (run by the Triton interpreter on CPU) give the eager path's values and gradients."""

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
from shardkl import _stats, kernels  # noqa: E402
from shardkl.kernels import eager, triton_kl  # noqa: E402

if _previous is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _previous

from tests.reference import reference  # noqa: E402

F32 = torch.float32
# the interpreter evaluates both sides of every `where` in numpy, which warns about the discarded side's inf/NaN
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_kernels_run_in_the_interpreter() -> None:
    assert type(triton_kl._leaf_kernel).__name__ == "InterpretedFunction"
    assert type(triton_kl._grads_kernel).__name__ == "InterpretedFunction"


def _case(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g) * 2
    b = a + 0.3 * torch.randn(*shape, generator=g)
    a[:, -3:] = float("-inf")  # a padded tail
    b[:, -3:] = float("-inf")
    a[0, 5] = -200.0  # P underflows to 0 where Q has mass
    a[1, 100:140] = -300.0  # a run of such columns
    tokens = torch.randint(0, shape[-1] - 3, shape[:-1], generator=g)
    return a.to(dtype), b.to(dtype), tokens


def _edge_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 2.. of a copy: all -inf, NaN, +inf, Q = 0 where P > 0, b all -inf."""
    a, b = a.clone(), b.clone()
    a[2] = float("-inf")
    b[2] = float("-inf")
    a[3, 7] = float("nan")
    a[4, 9] = float("inf")
    if a.shape[0] > 5:
        b[5, 11] = float("-inf")
    return a, b


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
        ((6, 300), F32, 0.7, 64),
        ((6, 300), torch.bfloat16, 1.0, 128),
        ((3, 1271), F32, 1.0, 256),
        ((3, 1271), torch.float16, 0.7, 512),
    ],
)
@pytest.mark.parametrize("two_inputs", [True, False])
def test_leaf_matches_eager(shape, dtype, temperature, block, two_inputs) -> None:
    a, b, _ = _case(shape, dtype)
    if shape[0] >= 5:
        a, b = _edge_rows(a, b)
    bb = b if two_inputs else None
    got = triton_kl.leaf(a, bb, temperature, F32, block=block)
    want = eager.leaf(a, bb, temperature, F32)
    assert got.shape == want.shape == (4 if two_inputs else 2, shape[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    if shape[0] >= 5:
        assert got[_stats.LA, 2] == float("-inf") and got[_stats.ENT, 2] == 0
        assert got[_stats.LA, 3].isnan() and got[_stats.LA, 4] == float("inf")
        assert torch.isfinite(got[:, [0, 1]]).all()
        if two_inputs and shape[0] > 5:
            assert got[_stats.KL, 5] == float("inf")


def test_leaf_merged_over_tiles_is_accurate_for_tiny_kl() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 1000, generator=g, dtype=torch.float64) * 3
    b = a + 1e-3 * torch.randn(4, 1000, generator=g, dtype=torch.float64) + 3.0
    got = triton_kl.leaf(a.float(), b.float(), 1.0, F32, block=128)[_stats.KL].double()
    a32, b32 = a.float().double(), b.float().double()
    want = (torch.softmax(a32, -1) * (torch.log_softmax(a32, -1) - torch.log_softmax(b32, -1))).sum(-1)
    assert (got > 0).all() and (want < 1e-5).all()  # KL ~ 5e-7: the textbook formula loses every digit here
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)


def test_leaf_of_strided_chunks_and_fp64_fallback() -> None:
    a, b, _ = _case((300, 6), F32)
    a, b = a.t(), b.t()  # column stride != 1: copied per chunk
    torch.testing.assert_close(triton_kl.leaf(a, b, 0.7, F32), eager.leaf(a, b, 0.7, F32))
    a, b, _ = _case((5, 400), F32)
    view_a, view_b = a[1:4, 50:333], b[1:4, 50:333]  # row stride 400, 283 columns
    torch.testing.assert_close(
        triton_kl.leaf(view_a, view_b, 1.0, F32, block=64), eager.leaf(view_a, view_b, 1.0, F32)
    )
    d = triton_kl.leaf(a.double(), b.double(), 1.0, torch.float64)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d, eager.leaf(a.double(), b.double(), 1.0, torch.float64))


def _saved(a: torch.Tensor, b: torch.Tensor | None, tokens: torch.Tensor, temperature: float, present: str) -> dict:
    stats = _stats.leaf_stats(
        kernels.scaled(a, F32, temperature), None if b is None else kernels.scaled(b, F32, temperature)
    )
    rows = a.shape[0]
    g = torch.Generator().manual_seed(2)

    def grad(flag: str) -> torch.Tensor | None:
        return torch.randn(rows, generator=g) if flag in present else None

    token_cols = tokens.clone()
    token_cols[::2] = -1  # some rows hold their token in another chunk
    return {
        "lse_a": stats[_stats.LA],
        "lse_b": None if b is None else stats[_stats.LB],
        "kl": None if b is None else stats[_stats.KL],
        "ent": stats[_stats.ENT],
        "grad_kl": None if b is None else grad("k"),
        "grad_ent": grad("e"),
        "grad_logp": grad("p"),
        "grad_logq": None if b is None else grad("q"),
        "token_cols": token_cols if "t" in present else None,
    }


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
    a, b, tokens = _case(shape, dtype)
    bb = b if two_inputs else None
    saved = _saved(a, bb, tokens, temperature, present)
    ga, gb = triton_kl.grads(a, bb, temperature, F32, block=block, **saved)
    ea, eb = eager.tile_grads(a, bb, temperature, F32, kernels.GradInputs(**saved))
    assert ga.dtype == F32 and ga.shape == a.shape
    torch.testing.assert_close(ga, ea, rtol=1e-5, atol=1e-7)
    if two_inputs:
        assert gb is not None and eb is not None
        torch.testing.assert_close(gb, eb, rtol=1e-5, atol=1e-7)
    else:
        assert gb is None


@pytest.mark.parametrize(("shape", "dtype", "temperature"), [((6, 300), F32, 0.7), ((3, 1271), torch.bfloat16, 1.0)])
def test_public_api_matches_eager(monkeypatch, shape, dtype, temperature) -> None:
    monkeypatch.setattr(triton_kl, "MAX_BLOCK", 256)  # several tiles per row
    a, b, tokens = _case(shape, dtype)
    results = {}
    for impl in ("eager", "triton"):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        stats = shardkl.kl_stats(x, y, tokens, temperature=temperature, options=shardkl.Options(impl=impl))
        (stats.exact_kl.sum() + 0.3 * stats.entropy.sum() + stats.k3.sum() + stats.p_logprobs.sum()).backward()
        results[impl] = (stats, x.grad, y.grad)
    (s_e, ga_e, gb_e), (s_t, ga_t, gb_t) = results["eager"], results["triton"]
    for name in ("exact_kl", "entropy", "p_logprobs", "q_logprobs", "k3"):
        torch.testing.assert_close(getattr(s_t, name), getattr(s_e, name), rtol=1e-5, atol=1e-6, msg=name)
    tol = 1e-5 if dtype == F32 else 1e-2
    torch.testing.assert_close(ga_t, ga_e, rtol=tol, atol=tol * 0.2)
    torch.testing.assert_close(gb_t, gb_e, rtol=tol, atol=tol * 0.2)
    ref = reference(a[..., :-3], b[..., :-3], tokens, temperature)["exact_kl"]
    torch.testing.assert_close(s_t.exact_kl.double(), ref, rtol=1e-5, atol=1e-6)


def test_triton_needs_cuda_or_the_interpreter(monkeypatch) -> None:
    assert kernels.resolve("triton", torch.device("cpu"), 10).name == "triton"
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

def compile_(fn, signature, constexprs):
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    try:
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    except CompilationError as exc:
        print("COMPILATION_ERROR", exc)
        sys.exit(1)
    except Exception as exc:  # no CUDA backend or ptxas here: not a bug of the kernels
        print("UNAVAILABLE", type(exc).__name__, exc)
        sys.exit(0)
    assert "ptx" in compiled.asm

leaf = dict(a_ptr="*bf16", b_ptr="*bf16", out_ptr="*fp32", rows="i32", cols="i32", stride_a="i64", stride_b="i64",
            temperature="fp32")
for has_b in (True, False):
    compile_(triton_kl._leaf_kernel, leaf, {"HAS_B": has_b, "BLOCK": 1024})
grads = {name: "*fp32" for name in ("a_ptr", "b_ptr", "grad_a_ptr", "grad_b_ptr", "lse_a_ptr", "lse_b_ptr", "kl_ptr",
                                    "ent_ptr", "grad_kl_ptr", "grad_ent_ptr", "grad_logp_ptr", "grad_logq_ptr")}
grads.update(token_cols_ptr="*i64", cols="i32", stride_a="i64", stride_b="i64", temperature="fp32", inv_t="fp32")
for flags in [(1, 1, 1, 1, 1), (0, 0, 1, 1, 0), (1, 0, 0, 0, 1), (1, 1, 0, 0, 0)]:
    names = ("HAS_B", "HAS_KL", "HAS_ENT", "HAS_LOGP", "HAS_LOGQ")
    compile_(triton_kl._grads_kernel, grads, dict(zip(names, map(bool, flags)), BLOCK=512))
print("COMPILED")
"""


def test_kernels_compile_for_cuda_without_a_gpu(monkeypatch) -> None:
    """The interpreter accepts Python that the Triton compiler rejects: compile ahead of time for sm_90 too."""
    import subprocess

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_CUDA], capture_output=True, text=True, env=env, timeout=300, cwd=root
    )
    assert done.returncode == 0, done.stdout + done.stderr
    if "UNAVAILABLE" in done.stdout:
        pytest.skip(done.stdout.strip())
    assert "COMPILED" in done.stdout, done.stdout + done.stderr
