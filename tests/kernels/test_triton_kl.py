"""The Triton kernels' tests that need no GPU: the interpreter suites, each in a child process, and every kernel
compiled ahead of time for sm_80 and sm_90 (every autotuner config of the common variants).

Why child processes. Triton decides when a kernel is decorated whether it runs in its CPU interpreter
(``TRITON_INTERPRET=1``) or is compiled for a GPU, and the choice holds for the whole process. The interpreter
tests used to run in the pytest process, so ``test_cuda.py`` found the kernels interpreted and skipped itself: a
full ``python -m pytest`` on a GPU machine never ran the CUDA kernels. Now the pytest process never loads Triton for
the interpreter: ``interpreted_triton_kl.py`` (the KL entries) and ``interpreted_triton_ops.py`` (JSD and top-k),
named so that pytest does not collect them, each run in a fresh ``python -m pytest`` child with
``TRITON_INTERPRET=1``, and ``test_cuda.py`` in this process gets the compiled kernels. The child's JUnit XML says
what ran: the wrapper fails on any failure or error and when nothing passed, with the failing tests and the tail of
the child's output in its message. To select interpreter tests, run a suite directly and alone in its process:
``pytest tests/kernels/interpreted_triton_ops.py -k jsd``.

The other way round (the CUDA tests in a child) was not chosen: the interpreter suites run on every machine, and in
the pytest process they were fragile there too: any test module that imported triton before they were collected
(``torch.compile`` does) made them skip silently.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITES = ("interpreted_triton_kl.py", "interpreted_triton_ops.py")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_suite(suite: str, markers: str, tmp_path: Path) -> None:
    """Run one ``interpreted_triton_*.py`` suite's tests selected by ``markers`` with pytest in a fresh process under
    ``TRITON_INTERPRET=1``; fail on any failure or error, and when nothing passed."""
    report = tmp_path / "report.xml"
    command = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "kernels" / suite), "-q", "-p", "no:cacheprovider",
               "-m", markers, f"--junitxml={report}"]
    done = subprocess.run(command, capture_output=True, text=True, env=_child_env(TRITON_INTERPRET="1"), cwd=ROOT,
                          timeout=1800)
    tail = (done.stdout + done.stderr)[-6000:]
    assert report.exists(), f"the child pytest wrote no report (exit status {done.returncode}):\n{tail}"
    cases = list(ET.parse(report).getroot().iter("testcase"))
    failed = [f"{c.get('name')}: {bad.get('message', '')[:300]}" for c in cases for bad in c
              if bad.tag in ("failure", "error")]
    skipped = sum(1 for c in cases for x in c if x.tag == "skipped")
    assert not failed and done.returncode == 0, "\n".join(failed) + f"\n{tail}"
    assert len(cases) - skipped > 0, f"nothing passed in {suite}:\n{tail}"


@pytest.mark.parametrize("suite", SUITES)
def test_interpreter_suite_in_a_child_process(suite: str, tmp_path: Path) -> None:
    _run_suite(suite, "not slow", tmp_path)


@pytest.mark.slow
def test_slow_interpreter_tests_in_a_child_process(tmp_path: Path) -> None:
    # the 152k-vocabulary accuracy bounds
    _run_suite("interpreted_triton_kl.py", "slow", tmp_path)


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
        print("COMPILATION_ERROR", fn.__name__, capability, constexprs, exc)
        sys.exit(1)
    except Exception as exc:  # no CUDA backend or ptxas here: not a bug of the kernels
        print("UNAVAILABLE", type(exc).__name__, exc)
        sys.exit(0)
    assert "ptx" in compiled.asm and "cubin" in compiled.asm

def typed(signature, half):
    # the logits and their gradients in `half` (bf16 logits, or fp32 matmul tiles of LinearLogits)
    return {k: half if v == "*x" else v for k, v in signature.items()}

stats = dict(a_ptr="*x", b_ptr="*x", out_ptr="*fp32", rows="i32", cols="i32", stride_a="i64", stride_b="i64",
             inv_t="fp32")
grads = {name: "*fp32" for name in ("lse_a_ptr", "lse_b_ptr", "kl_ptr", "ent_ptr", "grad_kl_ptr", "grad_ent_ptr",
                                    "grad_logp_ptr", "grad_logq_ptr")}
grads.update(a_ptr="*x", b_ptr="*x", grad_a_ptr="*x", grad_b_ptr="*x", token_cols_ptr="*i64", cols="i32",
             stride_a="i64", stride_b="i64", inv_t="fp32")
jsd_terms = dict(a_ptr="*x", b_ptr="*x", lse_a_ptr="*fp32", lse_b_ptr="*fp32", out_ptr="*fp64", rows="i32",
                 cols="i32", stride_a="i64", stride_b="i64", inv_t="fp32", beta="fp32", rest="fp32")
jsd_grads = dict(a_ptr="*x", b_ptr="*x", grad_a_ptr="*x", grad_b_ptr="*x", lse_a_ptr="*fp32", lse_b_ptr="*fp32",
                 kl_pm_ptr="*fp32", kl_qm_ptr="*fp32", grad_ptr="*fp32", cols="i32", stride_a="i64", stride_b="i64",
                 inv_t="fp32", beta="fp32", rest="fp32")
topk_stats = dict(s_ptr="*x", ids_ptr="*i64", out_ptr="*fp64", rows="i32", cols="i32", stride_s="i64", K="i32",
                  inv_t="fp32")
topk_grads = dict(s_ptr="*x", ids_ptr="*i64", grad_ptr="*x", lse_excl_ptr="*fp32", tail_coef_ptr="*fp32",
                  id_coef_ptr="*fp32", cols="i32", stride_s="i64", K="i32", inv_t="fp32")
names = ("HAS_B", "HAS_KL", "HAS_ENT", "HAS_LOGP", "HAS_LOGQ", "WRITE_A", "WRITE_B")
for capability in (80, 90):
    bf16 = lambda s: typed(s, "*bf16")  # noqa: E731
    # every autotuner config of the common variants (exact_kl, the JSD's two rounds and backward, top-k)
    for block, warps in triton_kl.CONFIGS:
        for flags in ({"HAS_B": True, "ENTROPY": False, "KL": True}, {"HAS_B": True, "ENTROPY": False, "KL": False}):
            compile_(triton_kl._stats_kernel, bf16(stats), dict(flags, BLOCK=block), capability, warps)
        flags = dict(zip(names, (1, 1, 0, 0, 0, 1, 1)))
        compile_(triton_kl._grads_kernel, bf16(grads), dict(flags, BLOCK=block), capability, warps)
        compile_(triton_kl._jsd_terms_kernel, bf16(jsd_terms), {"BLOCK": block}, capability, warps)
        compile_(triton_kl._jsd_grads_kernel, bf16(jsd_grads), {"WRITE_A": True, "WRITE_B": True, "BLOCK": block},
                 capability, warps)
        compile_(triton_kl._topk_stats_kernel, bf16(topk_stats), {"BLOCK": block, "IDS_BLOCK": 32}, capability, warps)
        compile_(triton_kl._topk_grads_kernel, bf16(topk_grads), {"BLOCK": block, "IDS_BLOCK": 32}, capability, warps)
    # the other variants with one config
    for has_b, entropy, kl in ((True, True, True), (False, True, True), (True, True, False), (False, False, True)):
        flags = {"HAS_B": has_b, "ENTROPY": entropy, "KL": kl, "BLOCK": 2048}
        compile_(triton_kl._stats_kernel, bf16(stats), flags, capability, 8)
    for flags in [(1, 1, 1, 1, 1, 1, 1), (0, 0, 1, 1, 0, 1, 0), (1, 0, 0, 0, 1, 0, 1)]:
        compile_(triton_kl._grads_kernel, bf16(grads), dict(zip(names, map(bool, flags)), BLOCK=2048), capability, 8)
    for write_a, write_b in ((True, False), (False, True)):
        flags = {"WRITE_A": write_a, "WRITE_B": write_b, "BLOCK": 2048}
        compile_(triton_kl._jsd_grads_kernel, bf16(jsd_grads), flags, capability, 8)
    for kernel, signature in ((triton_kl._topk_stats_kernel, topk_stats), (triton_kl._topk_grads_kernel, topk_grads)):
        compile_(kernel, bf16(signature), {"BLOCK": 2048, "IDS_BLOCK": triton_kl.MAX_IDS_BLOCK}, capability, 8)
    # fp32 logits (LinearLogits' matmul tiles)
    fp32 = lambda s: typed(s, "*fp32")  # noqa: E731
    compile_(triton_kl._stats_kernel, fp32(stats), {"HAS_B": True, "ENTROPY": True, "KL": True, "BLOCK": 1024},
             capability, 4)
    compile_(triton_kl._jsd_terms_kernel, fp32(jsd_terms), {"BLOCK": 1024}, capability, 4)
    compile_(triton_kl._jsd_grads_kernel, fp32(jsd_grads), {"WRITE_A": True, "WRITE_B": True, "BLOCK": 1024},
             capability, 4)
    compile_(triton_kl._topk_stats_kernel, fp32(topk_stats), {"BLOCK": 1024, "IDS_BLOCK": 16}, capability, 4)
    compile_(triton_kl._topk_grads_kernel, fp32(topk_grads), {"BLOCK": 1024, "IDS_BLOCK": 16}, capability, 4)
print("COMPILED")
"""


@pytest.mark.slow  # ahead-of-time compiles of every autotuner config, in a subprocess
def test_kernels_compile_for_sm80_and_sm90_without_a_gpu() -> None:
    """The interpreter accepts Python that the Triton compiler rejects: compile ahead of time for both targets."""
    env = _child_env(TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_CUDA], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    if "UNAVAILABLE" in done.stdout:
        pytest.skip(done.stdout.strip())
    assert "COMPILED" in done.stdout, done.stdout + done.stderr
