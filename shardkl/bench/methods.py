"""What the benchmark times: functions of this rank's logits shards ``(a, b)`` (``[tokens, V_local]`` each).

- ``floor``: read both inputs once (``a.sum() + b.sum()``), the memory-bandwidth floor every ratio refers to.
- ``grad_memory``: allocate and write two input-sized tensors, what a backward's two gradients cost by
  themselves (on CPU mostly the operating system's page faults on fresh memory).
- ``eager_reference`` (one rank): ``log_softmax`` x2 + ``kl_div`` over the full vocabulary, today's practice.
- ``allgather_baseline`` (several ranks): all-gather the logits, then the eager reference.
- ``megatron_baseline`` (several ranks): separate all-reduces of the max, the sums of exponentials and the
  P-weighted sum, then the textbook one-pass KL (Megatron-core's cross-entropy pattern).
- ``shardkl[<impl>]``: ``shardkl.exact_kl`` with ``Options(impl=...)``.

The two baselines issue their own collectives, through ``torch.distributed.nn.functional`` (differentiable);
everything else communicates only through shardkl.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import shardkl

Method = Callable[[Tensor, Tensor], Tensor]

# methods that only have a forward pass
FORWARD_ONLY = ("floor", "grad_memory")


def floor(a: Tensor, b: Tensor) -> Tensor:
    """Read both inputs once."""
    return a.sum() + b.sum()


def grad_memory(a: Tensor, b: Tensor) -> Tensor:
    """Allocate and write two tensors shaped like the inputs, as a backward's gradients."""
    grad_a = torch.empty_like(a).fill_(1.0)
    grad_b = torch.empty_like(b).fill_(1.0)
    return grad_a[0, 0] + grad_b[0, 0]


def eager_reference(a: Tensor, b: Tensor) -> Tensor:
    """``log_softmax`` x2 + ``kl_div`` in fp32 over the full vocabulary (one rank)."""
    logp = F.log_softmax(a.float(), dim=-1)
    logq = F.log_softmax(b.float(), dim=-1)
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


def allgather_baseline(a: Tensor, b: Tensor, group: Any) -> Tensor:
    """All-gather the full logits (the baseline's own two collectives), then the eager reference."""
    import torch.distributed.nn.functional as dnn

    # the baseline's collectives: V-sized traffic and memory per rank
    full_a = torch.cat(dnn.all_gather(a.contiguous(), group=group), dim=-1)
    full_b = torch.cat(dnn.all_gather(b.contiguous(), group=group), dim=-1)
    return eager_reference(full_a, full_b)


def megatron_baseline(a: Tensor, b: Tensor, group: Any) -> Tensor:
    """Megatron-core's pattern: three all-reduces (the baseline's own), then the textbook one-pass KL."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dnn

    a, b = a.float(), b.float()
    # the baseline's all-reduce of the max, for a stable log-sum-exp (detached, as in Megatron-core)
    m = dnn.all_reduce(torch.stack([a.detach().amax(-1), b.detach().amax(-1)]), op=dist.ReduceOp.MAX, group=group)
    ea, eb = torch.exp(a - m[0].unsqueeze(-1)), torch.exp(b - m[1].unsqueeze(-1))
    # the baseline's all-reduce of the sums of exponentials
    sums = dnn.all_reduce(torch.stack([ea.sum(-1), eb.sum(-1)]), group=group)
    # the baseline's all-reduce of the P-weighted sum of a - b; KL = E_P[a - b] - (lse_a - lse_b)
    weighted = dnn.all_reduce((ea * (a - b)).sum(-1), group=group)
    lse_a, lse_b = m[0] + torch.log(sums[0]), m[1] + torch.log(sums[1])
    return weighted / sums[0] - (lse_a - lse_b)


def _shardkl(a: Tensor, b: Tensor, *, group: Any, impl: str) -> Tensor:
    return shardkl.exact_kl(a, b, group=group, options=shardkl.Options(impl=impl))  # type: ignore[arg-type]


def methods(impls: list[str], world: int, group: Any) -> dict[str, Method]:
    """The methods of one point, in table order."""
    out: dict[str, Method] = {"floor": floor, "grad_memory": grad_memory}
    if world == 1:
        out["eager_reference"] = eager_reference
    else:
        out["allgather_baseline"] = functools.partial(allgather_baseline, group=group)
        out["megatron_baseline"] = functools.partial(megatron_baseline, group=group)
    for impl in impls:
        out[f"shardkl[{impl}]"] = functools.partial(_shardkl, group=group, impl=impl)
    return out


def inputs(
    tokens: int, vocab: int, rank: int, world: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """This rank's shards of two close logits tensors, ``b = a + 0.1 noise``, made on ``device``."""
    start, stop = shardkl.shard_bounds(vocab, world, rank)
    # generated on the device: a GPU point holds billions of logits
    g = torch.Generator(device=device).manual_seed(1234 + start)
    a = torch.randn(tokens, stop - start, generator=g, device=device)
    b = torch.randn(tokens, stop - start, generator=g, device=device).mul_(0.1).add_(a)
    return a.to(dtype), b.to(dtype)


__all__ = ["FORWARD_ONLY", "Method", "floor", "grad_memory", "inputs", "methods"]
