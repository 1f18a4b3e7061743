"""Every op × every CPU implementation × both sources against float64, with the edge rows, on 1-3 uneven ranks.

The ops (``shardkl._ops``): KL statistics, the JSD's two rounds, the top-k buckets. The implementations:
``eager`` and ``compiled`` (the native CPU kernels; Triton's are checked in ``tests/kernels``). The sources: a
logits tensor, or hidden states times this rank's output-layer rows (``LinearLogits``). The edge rows: a padded
vocabulary tail (``valid_vocab_size``), a column where P underflows while Q has mass, a tiny divergence, an empty
shard (world 3), K = V and a teacher with no tail.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import shardkl
from tests._distill_reference import bucket_reference, jsd_reference
from tests._distributed import run_ranks
from tests.reference import reference

VOCAB, VALID, HIDDEN, ROWS = 203, 200, 12, 6
IMPLS = ["eager", "compiled"]
CUTS = {1: [0, VOCAB], 2: [0, 120, VOCAB], 3: [0, 0, 90, VOCAB]}  # world 3: rank 0 holds no column


def _model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    h_p = torch.randn(ROWS, HIDDEN, generator=g, dtype=torch.float64)
    w_p = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * 0.5
    h_q = h_p + 0.2 * torch.randn(ROWS, HIDDEN, generator=g, dtype=torch.float64)
    w_q = w_p.clone()
    w_q[:, 0] += 0.1 * torch.randn(VOCAB, generator=g, dtype=torch.float64)
    return {"h_p": h_p, "w_p": w_p, "h_q": h_q, "w_q": w_q}


def _logits(m: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = (m["h_p"].float().double() @ m["w_p"].float().double().T).float().double(), m["h_q"] @ m["w_q"].T
    a[0, 7] = -300.0  # P underflows to 0 where Q has mass
    # a tiny divergence (KL ~ 5e-9) in row 1; a shift of Q's logits changes nothing
    noise = torch.randn(VOCAB, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    b[1] = a[1] + 1e-4 * noise + 3
    return a, b.float().double()


def _teacher(b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs, ids = torch.log_softmax(b[..., :VALID], -1).topk(k, dim=-1)
    return ids, logprobs


def _check(rank: int, world: int, impl: str, linear: bool) -> None:
    cuts = CUTS[world]
    lo, hi = cuts[rank], cuts[rank + 1]
    layout = shardkl.VocabLayout(lo, hi, group=dist.group.WORLD if world > 1 else None, valid_vocab_size=VALID)
    options = shardkl.Options(impl=impl)
    m = _model()
    a, b = _logits(m)
    if linear:
        # P from hidden states: the fp32 operands' exact product (no underflowing column to edit in)
        a = m["h_p"].float().double() @ m["w_p"].float().double().T
    valid_a, valid_b = a[:, :VALID], b[:, :VALID]

    def sources(grad: bool) -> tuple[object, torch.Tensor, torch.Tensor]:
        """This rank's P (logits or LinearLogits, fp32) and Q (logits), and the leaf P's gradient lands in."""
        if linear:
            h = m["h_p"].float().requires_grad_(grad)
            return shardkl.LinearLogits(h, m["w_p"][lo:hi].float(), hidden_grad="full"), h, b[:, lo:hi].float()
        x = a[:, lo:hi].float().requires_grad_(grad)
        return x, x, b[:, lo:hi].float()

    def grad_of_p(ref_grad: torch.Tensor) -> torch.Tensor:
        full = torch.cat([ref_grad, torch.zeros(ROWS, VOCAB - VALID, dtype=ref_grad.dtype)], -1)
        return full @ m["w_p"] if linear else full[:, lo:hi]

    tokens = torch.tensor([3, 150, 7, 199, 0, 42])
    p, leaf, q = sources(True)
    stats = shardkl.kl_stats(p, q, tokens, layout=layout, options=options)
    ref_a = valid_a.clone().requires_grad_()
    ref = reference(ref_a, valid_b, tokens)
    for name in ("exact_kl", "entropy", "p_logprobs", "q_logprobs"):
        torch.testing.assert_close(getattr(stats, name).double(), ref[name], rtol=2e-5, atol=2e-6,
                                   msg=lambda text, name=name: f"{name}: {text}")
    # the tiny row keeps its sign and its digits
    assert 0 < stats.exact_kl[1] < 1e-7
    assert abs(stats.exact_kl[1].item() / ref["exact_kl"][1].item() - 1) < 1e-2
    (stats.exact_kl.sum() + stats.p_logprobs.sum()).backward()
    (ref["exact_kl"].sum() + ref["p_logprobs"].sum()).backward()
    torch.testing.assert_close(leaf.grad.double(), grad_of_p(ref_a.grad), rtol=1e-4, atol=1e-5)

    for beta in (0.0, 0.35, 1.0):
        p, leaf, q = sources(True)
        got = shardkl.jsd(p, q, beta=beta, layout=layout, options=options)
        ref_a = valid_a.clone().requires_grad_()
        want = jsd_reference(ref_a, valid_b, beta)
        torch.testing.assert_close(got.double(), want, rtol=5e-5, atol=2e-7, msg=f"jsd {beta}")
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(leaf.grad.double(), grad_of_p(ref_a.grad), rtol=1e-4, atol=1e-5)

    for k, direction in ((5, "forward"), (5, "reverse"), (VALID, "forward"), (VALID, "reverse")):
        ids, logprobs = _teacher(b, k)
        if k == 5:
            # a teacher with no tail in row 2: its top-5 carry all its mass (renormalised)
            logprobs = logprobs.clone()
            logprobs[2] = torch.log_softmax(logprobs[2], -1)
        p, leaf, _ = sources(True)
        got = shardkl.topk_kl(p, ids, logprobs.float(), direction=direction, layout=layout, options=options)
        ref_a = valid_a.clone().requires_grad_()
        want = bucket_reference(ref_a, ids, logprobs.float().double(), direction)
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite), (k, direction, got, want)
        torch.testing.assert_close(got.double()[finite], want[finite], rtol=5e-5, atol=5e-6, msg=f"topk {k}")
        got[finite].sum().backward()
        want[finite].sum().backward()
        torch.testing.assert_close(leaf.grad.double(), grad_of_p(ref_a.grad), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("linear", [False, True], ids=["logits", "linear"])
def test_every_op_on_one_process(impl: str, linear: bool) -> None:
    _check(0, 1, impl, linear)


@pytest.mark.parametrize(
    ("world", "impl", "linear"), [(2, "compiled", True), (3, "compiled", False), (3, "eager", True)]
)
def test_every_op_on_uneven_ranks_with_an_empty_shard(world: int, impl: str, linear: bool) -> None:
    run_ranks(_check, world, impl, linear)


def test_the_reverse_bucket_kl_of_a_teacher_without_a_tail_is_infinite_where_the_student_has_one() -> None:
    # KL(S‖T) with T = 0 outside the ids: +inf wherever the student puts mass there, and a zero gradient to it
    s = torch.tensor([[2.0, 1.0, 0.0, -1.0]], requires_grad=True)
    got = shardkl.topk_kl(s, torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.6, 0.4]])), direction="reverse")
    assert got.item() == math.inf
