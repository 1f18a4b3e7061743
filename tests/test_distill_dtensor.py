"""jsd and topk_kl through the DTensor front door: ceil-chunk layouts (an empty last shard), replicated teacher
tensors, a LinearLogits with a DTensor weight; float64 references."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import shardkl
from tests._distill_reference import bucket_reference, jsd_reference, teacher_topk
from tests._distributed import run_ranks


def _check(rank: int, world: int, vocab: int) -> None:
    mesh = DeviceMesh("cpu", torch.arange(world))
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 4, vocab, generator=g, dtype=torch.float64) * 2
    b = a + 0.6 * torch.randn(3, 4, vocab, generator=g, dtype=torch.float64)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)

    for beta in (0.3, 1.0):
        ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
        (jsd_reference(ar, br, beta) * w).sum().backward()
        x = distribute_tensor(a, mesh, [Shard(-1)]).requires_grad_()
        y = distribute_tensor(b, mesh, [Shard(-1)]).requires_grad_()
        got = shardkl.jsd(x, y, beta=beta)
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, jsd_reference(a, b, beta), rtol=1e-12, atol=1e-14)
        (got * w).sum().backward()
        for mine, full in ((x.grad, ar.grad), (y.grad, br.grad)):
            assert tuple(mine.placements) == (Shard(2),)
            torch.testing.assert_close(mine.full_tensor(), full, rtol=1e-10, atol=1e-13)

    ids, logprobs = teacher_topk(b, 3)
    for replicated in (False, True):
        ar = a.clone().requires_grad_()
        (bucket_reference(ar, ids, logprobs, "reverse") * w).sum().backward()
        x = distribute_tensor(a, mesh, [Shard(-1)]).requires_grad_()
        teacher = (distribute_tensor(ids, mesh, [Replicate()]), distribute_tensor(logprobs, mesh, [Replicate()]))
        got = shardkl.topk_kl(x, *(teacher if replicated else (ids, logprobs)), direction="reverse")
        torch.testing.assert_close(got, bucket_reference(a, ids, logprobs, "reverse"), rtol=1e-12, atol=1e-14)
        (got * w).sum().backward()
        torch.testing.assert_close(x.grad.full_tensor(), ar.grad, rtol=1e-10, atol=1e-13)
    # teacher tensors sharded instead of replicated over the vocabulary mesh dimension are refused
    with pytest.raises(ValueError, match="teacher_ids as a DTensor must be Replicate"):
        shardkl.topk_kl(x.detach(), distribute_tensor(ids, mesh, [Shard(0)]), logprobs)

    # from hidden states with a DTensor weight (Shard(0)) and replicated hidden states
    hidden = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, 6, generator=g, dtype=torch.float64)
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (bucket_reference(hr @ wr.T, ids, logprobs, "forward") * w).sum().backward()
    h = distribute_tensor(hidden, mesh, [Replicate()]).requires_grad_()
    wd = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    got = shardkl.topk_kl(shardkl.LinearLogits(h, wd), ids, logprobs)
    torch.testing.assert_close(got, bucket_reference(hidden @ weight.T, ids, logprobs, "forward"))
    (got * w).sum().backward()
    torch.testing.assert_close(h.grad.full_tensor(), hr.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(wd.grad.full_tensor(), wr.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(("world", "vocab"), [(2, 11), (3, 4)])
def test_dtensor_inputs(world: int, vocab: int) -> None:
    # vocab 4 over 3 ranks: ceil chunks of 2, 2 and 0 ids
    run_ranks(_check, world, vocab)
