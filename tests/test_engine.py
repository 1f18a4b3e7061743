"""The one engine (``shardkl._engine``, ``shardkl._ops``, ``shardkl._sources``): every function runs through the
same autograd Function, tiles and merges, and the defects a differential fuzzer found stay fixed."""

from __future__ import annotations

import math

import pytest
import torch

import shardkl
from shardkl import _engine, _sources
from tests.reference import reference

IMPLS = ["eager", "compiled", "auto"]


def _engine_nodes(out: torch.Tensor) -> list[str]:
    """Names of the autograd nodes behind ``out``."""
    seen, names, stack = set(), [], [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_every_function_runs_through_one_autograd_function() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 50, generator=g, requires_grad=True)
    b = torch.randn(3, 50, generator=g, requires_grad=True)
    tokens = torch.randint(0, 50, (3,), generator=g)
    ids, logprobs = torch.tensor([[1, 2]] * 3), torch.full((3, 2), -2.0)
    linear = shardkl.LinearLogits(torch.randn(3, 8, generator=g, requires_grad=True), torch.randn(50, 8, generator=g))
    outputs = {
        "exact_kl": shardkl.exact_kl(a, b),
        "kl_stats": shardkl.kl_stats(a, b, tokens).k3,
        "entropy": shardkl.entropy(a),
        "token_logprobs": shardkl.token_logprobs(linear, tokens),
        "jsd": shardkl.jsd(a, b, beta=0.3),
        "topk_kl": shardkl.topk_kl(linear, ids, logprobs),
        "kl_penalty": shardkl.kl_penalty(a, linear, tokens, estimator="k3"),
    }
    for name, out in outputs.items():
        nodes = _engine_nodes(out)
        assert nodes.count("EngineFunctionBackward") == 1, (name, nodes)


def _spiky_linear(vocab: int, spike: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """float64 hidden states and weights whose Q logits peak at column ``spike`` (far from P's)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(6, 16, generator=g, dtype=torch.float64)
    w_p = torch.randn(vocab, 16, generator=g, dtype=torch.float64) * 0.3
    w_q = w_p + 0.05 * torch.randn(vocab, 16, generator=g, dtype=torch.float64)
    bias_q = torch.zeros(vocab, dtype=torch.float64)
    bias_q[spike] = 6.0
    return h, w_p, w_q, bias_q


@pytest.mark.parametrize("spike_block", [7, 8, 16, 17])
def test_many_vocabulary_blocks_are_all_merged(spike_block: int) -> None:
    # 512-column blocks on CPU: 18 blocks, folded MERGE_GROUP (8) at a time as they come; the spike sits in the last
    # block of a group, the first after a merge, or the last block of the call
    assert _engine.MERGE_GROUP == 8
    vocab = 17 * _sources.MAX_TILE_COLS + 100
    spike = spike_block * _sources.MAX_TILE_COLS + 7
    h, w_p, w_q, bias_q = _spiky_linear(vocab, spike)
    got = shardkl.kl_stats(shardkl.LinearLogits(h, w_p), shardkl.LinearLogits(h, w_q, bias_q))
    ref = reference(h @ w_p.T, h @ w_q.T + bias_q, None, 1.0)
    torch.testing.assert_close(got.exact_kl, ref["exact_kl"], rtol=1e-10, atol=0)
    torch.testing.assert_close(got.entropy, ref["entropy"], rtol=1e-10, atol=0)


def test_token_logprobs_from_hidden_states_are_never_positive() -> None:
    # a dominant token: its logit from an elementwise dot product and the lse from the matmul used to disagree by a
    # few ulp, which made log P(x) positive (up to 2.3e-5)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(256, 256, generator=g) * 4  # logits of size ~64: fp32 rounds them to ~1e-5
    weight = torch.randn(4000, 256, generator=g)
    tokens = (hidden @ weight.T).argmax(-1)
    got = shardkl.token_logprobs(shardkl.LinearLogits(hidden, weight), tokens)
    assert (got <= 0).all(), got.max()  # 61 of these 256 were positive before
    ref = torch.log_softmax((hidden.double() @ weight.double().T), -1).gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=5e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_finite_kl_is_never_reported_infinite(impl: str) -> None:
    # issue 18, defect 7: two vocabulary chunks (> 32,768 columns) merged in fp32 overflowed the gap term
    options = shardkl.Options(impl=impl)
    a = torch.zeros(1, 65536)
    a[0, 0] = 100
    b = torch.zeros(1, 65536)
    b[0, 40000] = 100
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    kl = shardkl.exact_kl(x, y, options=options)
    want = reference(a.double(), b.double(), None, 1.0)["exact_kl"]
    torch.testing.assert_close(kl.double(), want, rtol=1e-5, atol=0)
    kl.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    # realistic logits: 3·randn with a +30 peak, at T = 0.3
    g = torch.Generator().manual_seed(0)
    a = 3 * torch.randn(4, 65536, generator=g)
    b = 3 * torch.randn(4, 65536, generator=g)
    a[:, 5] += 30
    b[:, 50000] += 30
    kl = shardkl.exact_kl(a, b, temperature=0.3, options=options)
    want = reference(a.double(), b.double(), None, 0.3)["exact_kl"]
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_keeps_the_tail_gradient_where_the_students_tail_underflows(impl: str) -> None:
    # issue 18, defect 8: S_v of a tail column underflows in fp32 (e^-110), its share of the tail does not
    s = torch.tensor([[110.0, 0.0, 0.0]], requires_grad=True)
    kl = shardkl.topk_kl(s, torch.tensor([[0]]), torch.tensor([[math.log(0.9)]]),
                         options=shardkl.Options(impl=impl))
    kl.sum().backward()
    torch.testing.assert_close(s.grad, torch.tensor([[0.1, -0.05, -0.05]]), rtol=1e-5, atol=1e-7)
    # the value: KL(T‖S) with T = (0.9, 0.1) and S = (1 - 2e^-110, 2e^-110)
    want = 0.9 * math.log(0.9) + 0.1 * (math.log(0.1) - (math.log(2) - 110))
    torch.testing.assert_close(kl.double(), torch.tensor([want], dtype=torch.float64), rtol=1e-6, atol=0)
