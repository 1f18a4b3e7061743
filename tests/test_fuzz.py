"""A differential fuzzer: random calls of every divergence against float64, on 1-3 ranks.

Each case draws a vocabulary size and a random split of it over the ranks (empty shards included), a dtype, a
temperature, a kind of logits (ordinary, nearly identical, peaked, huge, padded with ``-inf``, underflowing, at the
dtype's limits), an implementation, a source (logits, or hidden states with output-layer rows) and a divergence
(``kl_stats`` with tokens, ``jsd`` at a random β, ``topk_kl`` with a random K and direction, ``compare_stats``
with K ids per position). Every rank checks values (and, for every other case, gradients) against a float64
reference of the whole vocabulary, that nothing is negative, and that every rank holds bit-identical results. The
case stream is seeded: a failure names its case.

``SHARDKL_FUZZ_CASES`` sets the number of cases per world size (default 24; thousands pass locally).
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist

import shardkl
from tests._distill_reference import bucket_reference, jsd_reference
from tests._distributed import run_ranks
from tests.reference import reference

CASES = int(os.environ.get("SHARDKL_FUZZ_CASES", "24"))
DTYPES = [torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64]
KINDS = ["normal", "close", "peaked", "huge", "padded", "underflow", "extreme"]


@dataclass
class Case:
    """One random call."""

    index: int
    rows: int
    vocab: int
    cuts: list[int]
    dtype: torch.dtype
    temperature: float
    kind: str
    impl: str
    linear: bool
    op: str
    beta: float
    k: int
    direction: str
    grads: bool
    seed: int

    def __str__(self) -> str:
        return (
            f"case {self.index}: {self.op} rows={self.rows} vocab={self.vocab} cuts={self.cuts} {self.dtype} "
            f"T={self.temperature} {self.kind} impl={self.impl} linear={self.linear} beta={self.beta} k={self.k} "
            f"{self.direction}"
        )


def draw(index: int, world: int, seed: int) -> Case:
    r = random.Random(seed * 1000 + index)
    vocab = r.choice([2, 3, 17, 100, 257, 1003, 4096, 40_000])
    cuts = sorted([0, vocab, *(r.randint(0, vocab) for _ in range(world - 1))])
    op = r.choice(["kl", "kl", "jsd", "topk", "compare"])
    kind = r.choice(KINDS)
    dtype = r.choice(DTYPES)
    linear = op != "kl" and dtype in (torch.float32, torch.float64) and kind == "normal" and r.random() < 0.5
    linear = linear or (op in ("kl", "compare") and dtype in (torch.float32, torch.float64) and r.random() < 0.25)
    # hidden states of a real model give ordinary logits; Q may still be of any kind
    linear = linear and kind not in ("huge", "extreme")
    temperature = 1.0 if kind == "extreme" else r.choice([1.0, 1.0, 0.3, 0.7, 2.5])
    return Case(
        index=index, rows=r.randint(1, 5), vocab=vocab, cuts=cuts, dtype=dtype, temperature=temperature, kind=kind,
        impl=r.choice(["eager", "compiled", "auto"]), linear=linear, op=op, beta=r.choice([0.1, 0.5, 0.9]),
        k=r.randint(1, min(vocab, 40)) if r.random() < 0.8 else vocab, direction=r.choice(["forward", "reverse"]),
        grads=index % 2 == 0 and op != "compare", seed=seed * 1000 + index,
    )


def logits_pair(case: Case) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(a, b, magnitude)``: float64 logits of P and Q in the case's dtype's values, and the largest finite |logit|."""
    g = torch.Generator().manual_seed(case.seed)
    shape = (case.rows, case.vocab)
    a = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    b = a + 0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)
    if case.kind == "close":
        b = a + 1e-4 * torch.randn(*shape, generator=g, dtype=torch.float64) + 3  # KL ~ 5e-9 (a shift is free)
    elif case.kind == "peaked":
        a[:, 0] += 30
        b[:, -1] += 30
    elif case.kind == "huge":
        a, b = a * 2e3, b * 2e3
    elif case.kind == "padded" and case.vocab > 2:
        a[:, -2:], b[:, -2:] = float("-inf"), float("-inf")
    elif case.kind == "underflow" and case.vocab > 2:
        a[:, 1] = -300.0  # P underflows to 0 where Q has mass
    elif case.kind == "extreme" and case.vocab > 2:
        # both concentrated on one column at the dtype's largest value; Q without mass on another (its lowest)
        info = torch.finfo(case.dtype)
        a[:, 0], b[:, 0], b[:, -1] = info.max, info.max, info.min
    a, b = a.to(case.dtype).double(), b.to(case.dtype).double()
    finite = torch.cat([a[torch.isfinite(a)], b[torch.isfinite(b)]]).abs()
    return a, b, float(finite.max()) if finite.numel() else 0.0


def _tolerance(case: Case, magnitude: float) -> tuple[float, float]:
    """``(rtol, atol)``: fp32 compute rounds each scaled logit by ~6e-8 of its size, and the tiny KLs keep ~6e-3."""
    if case.dtype == torch.float64 and not case.linear:
        return 1e-9, 1e-12 * (1 + magnitude / case.temperature)
    return 6e-3, 2e-6 * (1 + magnitude / case.temperature)


def _local(x: torch.Tensor, case: Case, rank: int) -> torch.Tensor:
    return x[..., case.cuts[rank] : case.cuts[rank + 1]]


def _layout(case: Case, rank: int, world: int) -> shardkl.VocabLayout:
    group = dist.group.WORLD if world > 1 else None
    return shardkl.VocabLayout(case.cuts[rank], case.cuts[rank + 1], group=group)


def run_case(case: Case, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Run the case on this rank, check it against float64, and return what every rank must agree on."""
    a, b, magnitude = logits_pair(case)
    options = shardkl.Options(impl=case.impl)
    layout = _layout(case, rank, world)
    g = torch.Generator().manual_seed(case.seed + 1)
    hidden = None
    if case.linear:
        # the same logits up to rounding, as hidden states times output-layer rows: hidden = I-ish projection
        width = 8
        h_a = torch.randn(case.rows, width, generator=g, dtype=torch.float64)
        w_a = torch.randn(case.vocab, width, generator=g, dtype=torch.float64)
        a = (h_a @ w_a.T).to(case.dtype).double()
        hidden = (h_a.to(case.dtype), w_a.to(case.dtype))
        magnitude = max(magnitude, float(a.abs().max()))
    leaf_a = _local(a, case, rank).to(case.dtype).clone().requires_grad_(case.grads)
    leaf_b = _local(b, case, rank).to(case.dtype).clone().requires_grad_(case.grads)
    source_a: Any = leaf_a
    leaf_h = None
    if hidden is not None:
        leaf_h = hidden[0].clone().requires_grad_(case.grads)
        rows_of_head = hidden[1][case.cuts[rank] : case.cuts[rank + 1]]
        source_a = shardkl.LinearLogits(leaf_h, rows_of_head, hidden_grad="full")
    ref_a = a.clone().requires_grad_(case.grads)
    ref_b = b.clone().requires_grad_(case.grads)
    t = case.temperature
    if case.op == "kl":
        tokens = torch.randint(0, max(1, case.vocab - (2 if case.kind == "padded" else 0)), (case.rows,), generator=g)
        stats = shardkl.kl_stats(source_a, leaf_b, tokens, layout=layout, temperature=t, options=options)
        got = {"exact_kl": stats.exact_kl, "entropy": stats.entropy, "p_logprobs": stats.p_logprobs,
               "q_logprobs": stats.q_logprobs}
        want = reference(ref_a, ref_b, tokens, t)
        # a log-prob of -inf (a padded column, or an underflow) is compared as such
    elif case.op == "compare":
        real = max(1, case.vocab - (2 if case.kind == "padded" else 0))
        ids = torch.randint(0, real, (case.rows, min(case.k, 3)), generator=g)
        stats = shardkl.compare_stats(source_a, leaf_b, ids, layout=layout, temperature=t, options=options)
        got = {"kl_pq": stats.kl_pq, "kl_qp": stats.kl_qp, "entropy_p": stats.entropy_p,
               "entropy_q": stats.entropy_q, "p_logprobs": stats.p_logprobs, "q_logprobs": stats.q_logprobs}
        forward, reverse = reference(ref_a, ref_b, None, t), reference(ref_b, ref_a, None, t)
        logp, logq = torch.log_softmax(ref_a / t, -1), torch.log_softmax(ref_b / t, -1)
        want = {"kl_pq": forward["exact_kl"], "kl_qp": reverse["exact_kl"], "entropy_p": forward["entropy"],
                "entropy_q": reverse["entropy"], "p_logprobs": logp.gather(-1, ids), "q_logprobs": logq.gather(-1, ids)}
        for name, top1, x in (("top1_p", stats.top1_p, a), ("top1_q", stats.top1_q, b)):
            if case.linear and name == "top1_p":
                # logits from a matmul: a near tie may go either way, but the id holds the largest logit
                picked = x.gather(-1, top1.unsqueeze(-1))[:, 0]
                assert (picked >= x.max(-1).values - 1e-5 * (1 + magnitude)).all(), (str(case), name)
            else:
                assert torch.equal(top1, x.argmax(-1)), (str(case), name, top1)
            got[name] = top1
    elif case.op == "jsd":
        got = {"jsd": shardkl.jsd(source_a, leaf_b, beta=case.beta, layout=layout, temperature=t, options=options)}
        want = {"jsd": jsd_reference(ref_a, ref_b, case.beta, t)}
    else:
        teacher = torch.log_softmax(b / t, -1)
        ids = torch.stack([torch.randperm(case.vocab, generator=g)[: case.k] for _ in range(case.rows)])
        logprobs = teacher.gather(-1, ids).detach()
        teacher_lp = logprobs.to(torch.float32)
        got = {"topk": shardkl.topk_kl(source_a, ids, teacher_lp, direction=case.direction, layout=layout,
                                       temperature=t, options=options)}
        # the teacher's fp32 log-probs sum to 1 only up to their rounding; a tail within that rounding is empty
        # (shardkl's rule, documented in topk_kl), and the non-negative form of the terms differs from the textbook
        # sum by the excess of the teacher's total over 1
        excess = torch.logsumexp(teacher_lp.double(), -1).expm1()
        want = {"topk": bucket_reference(ref_a, ids, teacher_lp.double(), case.direction, t)}
    rtol, atol = _tolerance(case, magnitude)
    if case.op == "topk":
        sizes = want["topk"].detach().abs().nan_to_num(posinf=0.0)
        atol += 4 * float(excess.abs().nan_to_num().max()) * (1 + float(sizes.max()))
    for name, value in got.items():
        assert value is not None, (str(case), name)
        if name.startswith("top1"):
            continue  # checked above
        expected = want[name].detach()
        if name not in ("p_logprobs", "q_logprobs"):
            assert (value >= 0).all(), (str(case), name, value)
        # the textbook reference itself gives NaN at float64's limits (-inf - -inf); shardkl must stay a number
        known = ~torch.isnan(expected)
        if name == "jsd":
            # bounded by the mixture's entropy (for 0 < beta < 1): a reference inf is its own underflow of M
            bound = -case.beta * math.log(case.beta) - (1 - case.beta) * math.log1p(-case.beta)
            assert (value <= bound + rtol * bound + atol).all(), (str(case), name, value)
            known &= torch.isfinite(expected)
        assert not torch.isnan(value[~known]).any(), (str(case), name, value)
        if value.dtype != torch.float64:
            # a log-prob beyond fp32's range (-6.8e38 at bf16's limits) is -inf there
            beyond = known & (expected.abs() > torch.finfo(torch.float32).max)
            assert torch.equal(value[beyond].double(), expected[beyond].sign() * float("inf")), (str(case), name)
            known &= ~beyond
        torch.testing.assert_close(value.double()[known], expected[known], rtol=rtol, atol=atol,
                                   msg=lambda m, case=case, name=name: f"{case} {name}: {m}")
    if case.grads:
        loss = sum((v.double() * (i + 1)).sum() for i, v in enumerate(got.values()) if v is not None)
        ref_loss = sum(
            (want[n].double() * (i + 1)).masked_fill(~torch.isfinite(want[n]), 0).sum() for i, n in enumerate(got)
        )
        if torch.isfinite(loss) and torch.isfinite(ref_loss):
            loss.backward()
            ref_loss.backward()
            assert ref_a.grad is not None
            pairs = []
            if hidden is None:
                pairs.append((leaf_a.grad, _local(ref_a.grad, case, rank), "grad of p"))
            else:
                # hidden_grad="full": every rank holds the gradient of the whole vocabulary's logits
                assert leaf_h is not None
                pairs.append((leaf_h.grad, ref_a.grad @ hidden[1].double(), "grad of hidden"))
            if ref_b.grad is not None:  # a top-k teacher's log-probs take no gradient
                pairs.append((leaf_b.grad, _local(ref_b.grad, case, rank), "grad of q"))
            for grad, expected, name in pairs:
                assert grad is not None, (str(case), name)
                # the textbook reference differentiates through 0 * log 0 at the dtype's limits: NaN there
                known = torch.isfinite(expected)
                scale = 1 + float(expected[known].abs().max()) if known.any() else 1.0
                torch.testing.assert_close(grad.double()[known], expected[known], rtol=rtol * 4,
                                           atol=atol * 4 * scale,
                                           msg=lambda m, case=case, name=name: f"{case} {name}: {m}")
    return {name: value.detach().double() for name, value in got.items() if value is not None}


def _fuzz(rank: int, world: int, cases: int, seed: int) -> None:
    for index in range(cases):
        case = draw(index, world, seed)
        try:
            results = run_case(case, rank, world)
        except Exception as exc:
            raise AssertionError(f"rank {rank} of {world}, {case}: {exc}") from exc
        if world > 1:
            for name, value in results.items():
                # every rank holds bit-identical results
                everyone = [torch.empty_like(value) for _ in range(world)]
                dist.all_gather(everyone, value.contiguous())
                for other in everyone[1:]:
                    assert torch.equal(torch.nan_to_num(other), torch.nan_to_num(everyone[0])), (str(case), name)


def test_random_calls_on_one_process_match_float64() -> None:
    _fuzz(0, 1, CASES, seed=1)


@pytest.mark.parametrize("world", [2, 3])
def test_random_calls_on_several_ranks_match_float64_on_every_rank(world: int) -> None:
    run_ranks(_fuzz, world, CASES, 1 + world)


def test_the_case_stream_covers_every_axis() -> None:
    # the default number of cases per world still draws every divergence, dtype and kind of logits
    drawn = [draw(i, w, seed) for w, seed in ((1, 1), (2, 3), (3, 4)) for i in range(CASES)]
    assert {c.op for c in drawn} == {"kl", "jsd", "topk", "compare"}
    assert {c.dtype for c in drawn} == set(DTYPES)
    assert {c.impl for c in drawn} == {"eager", "compiled", "auto"}
    assert len({c.kind for c in drawn}) >= len(KINDS) - 1 and any(c.linear for c in drawn)
    assert any(0 in (hi - lo for lo, hi in zip(c.cuts, c.cuts[1:], strict=False)) for c in drawn if len(c.cuts) > 2)
    assert not math.isnan(sum(c.temperature for c in drawn))
