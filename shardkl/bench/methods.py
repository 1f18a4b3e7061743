"""What the benchmark times: functions of this rank's logits shards ``(a, b)`` (``[tokens, V_local]`` each).

- ``floor``: read both inputs once (``a.sum() + b.sum()``), the memory-bandwidth floor the ratios refer to.
- ``student_floor`` (the headline point): read the student's logits ``a`` once, the floor of ``topk_kl``.
- ``grad_memory``: allocate and write two input-sized tensors, what a backward's two gradients cost by
  themselves (on CPU mostly the operating system's page faults on fresh memory). Not a KL method: a reference.
- ``naive_pytorch`` (one rank): ``log_softmax`` x2 + ``kl_div`` over the full vocabulary, today's practice.
- ``allgather_baseline`` (several ranks): all-gather the logits, then ``naive_pytorch``.
- ``megatron_baseline`` (several ranks): separate all-reduces of the max, the sums of exponentials and the
  P-weighted sum, then the textbook one-pass KL (Megatron-core's cross-entropy pattern).
- ``shardkl[<impl>]``: ``shardkl.exact_kl``; ``shardkl[auto]`` is the default call, with no options at all, and
  any other impl passes ``Options(impl=...)``.
- ``jsd[<impl>]`` and ``topk_kl[<impl>]`` (the headline point; ``auto`` unless ``--divergences`` names more):
  ``shardkl.jsd`` (β = 0.5) and ``shardkl.topk_kl`` (K = 32, the teacher's ids and log-probs given, computed from
  ``b`` before the timing), with the same options as the ``shardkl[<impl>]`` rows. ``topk_kl`` reads only the
  student's logits: its ratio refers to ``student_floor`` and its memory to the student's logits.

The two baselines issue their own collectives, through ``torch.distributed.nn.functional`` (differentiable);
everything else communicates only through shardkl.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

import shardkl

Fn = Callable[[Tensor, Tensor], Tensor]

# the JSD's mixture weight and the top-k teacher's K in the divergence rows
JSD_BETA = 0.5
TOPK = 32


@dataclass(frozen=True)
class Method:
    """One timed function and how its figures are read.

    Attributes:
        fn: ``fn(a, b)`` on this rank's shards; forward+backward differentiates ``fn(a, b).sum()``.
        reads: ``"both"`` (both logits, whose gradients a backward writes) or ``"student"`` (``a`` only): the
            bytes that the memory share refers to and that forward+backward's gradients take.
        floor: the method whose median time this one's ratio refers to.
        forward_only: no forward+backward (the floors and ``grad_memory``).
    """

    fn: Fn
    reads: Literal["both", "student"] = "both"
    floor: str = "floor"
    forward_only: bool = False


def floor(a: Tensor, b: Tensor) -> Tensor:
    """Read both inputs once."""
    return a.sum() + b.sum()


def student_floor(a: Tensor, b: Tensor) -> Tensor:
    """Read the student's logits once (``topk_kl`` reads nothing else of size V)."""
    return a.sum()


def grad_memory(a: Tensor, b: Tensor) -> Tensor:
    """Allocate and write two tensors shaped like the inputs, as a backward's gradients."""
    grad_a = torch.empty_like(a).fill_(1.0)
    grad_b = torch.empty_like(b).fill_(1.0)
    return grad_a[0, 0] + grad_b[0, 0]


def naive_pytorch(a: Tensor, b: Tensor) -> Tensor:
    """``log_softmax`` x2 + ``kl_div`` in fp32 over the full vocabulary (one rank)."""
    logp = F.log_softmax(a.float(), dim=-1)
    logq = F.log_softmax(b.float(), dim=-1)
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


def allgather_baseline(a: Tensor, b: Tensor, group: Any) -> Tensor:
    """All-gather the full logits (the baseline's own two collectives), then :func:`naive_pytorch`."""
    import torch.distributed.nn.functional as dnn

    # the baseline's collectives: V-sized traffic and memory per rank
    full_a = torch.cat(dnn.all_gather(a.contiguous(), group=group), dim=-1)
    full_b = torch.cat(dnn.all_gather(b.contiguous(), group=group), dim=-1)
    return naive_pytorch(full_a, full_b)


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


def _options(impl: str) -> shardkl.Options | None:
    # "auto" is the call a user writes, with no options at all
    return None if impl == "auto" else shardkl.Options(impl=impl)  # type: ignore[arg-type]


def _exact_kl(a: Tensor, b: Tensor, *, group: Any, impl: str) -> Tensor:
    return shardkl.exact_kl(a, b, group=group, options=_options(impl))


def _jsd(a: Tensor, b: Tensor, *, group: Any, impl: str) -> Tensor:
    return shardkl.jsd(a, b, beta=JSD_BETA, group=group, options=_options(impl))


def _topk_kl(a: Tensor, b: Tensor, *, ids: Tensor, logprobs: Tensor, group: Any, impl: str) -> Tensor:
    return shardkl.topk_kl(a, ids, logprobs, group=group, options=_options(impl))


def topk_teacher(b: Tensor, k: int = TOPK) -> tuple[Tensor, Tensor]:
    """The teacher's top-``k`` global ids and their log-probabilities under ``softmax(b)`` (one rank's full
    vocabulary), as a caller would hand them to ``topk_kl``."""
    logprobs, ids = torch.log_softmax(b.detach().float(), dim=-1).topk(min(k, b.shape[-1]), dim=-1)
    return ids, logprobs


def methods(impls: list[str], world: int, group: Any, *, teacher: tuple[Tensor, Tensor] | None = None,
            divergence_impls: tuple[str, ...] = ()) -> dict[str, Method]:
    """The methods of one point, in table order.

    Args:
        impls: the ``impl`` of each ``exact_kl`` row (``"auto"``: no options).
        world: the number of ranks; the baselines differ between one rank and several.
        group: the process group, or ``None`` for one rank.
        teacher: the ``topk_kl`` teacher's ``(ids, logprobs)``, to add a ``jsd`` and a ``topk_kl`` row for each of
            ``divergence_impls`` (one rank only); ``None``: ``exact_kl`` only.
        divergence_impls: the ``impl`` of each ``jsd`` and ``topk_kl`` row.
    """
    divergences = teacher is not None and bool(divergence_impls)
    out: dict[str, Method] = {"floor": Method(floor, forward_only=True)}
    if divergences:
        out["student_floor"] = Method(student_floor, reads="student", floor="student_floor", forward_only=True)
    out["grad_memory"] = Method(grad_memory, forward_only=True)
    if world == 1:
        out["naive_pytorch"] = Method(naive_pytorch)
    else:
        out["allgather_baseline"] = Method(functools.partial(allgather_baseline, group=group))
        out["megatron_baseline"] = Method(functools.partial(megatron_baseline, group=group))
    for impl in impls:
        out[f"shardkl[{impl}]"] = Method(functools.partial(_exact_kl, group=group, impl=impl))
    if divergences:
        assert teacher is not None
        ids, logprobs = teacher
        for impl in divergence_impls:
            out[f"jsd[{impl}]"] = Method(functools.partial(_jsd, group=group, impl=impl))
        for impl in divergence_impls:
            out[f"topk_kl[{impl}]"] = Method(
                functools.partial(_topk_kl, ids=ids, logprobs=logprobs, group=group, impl=impl),
                reads="student", floor="student_floor",
            )
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


__all__ = ["JSD_BETA", "TOPK", "Method", "floor", "grad_memory", "inputs", "methods", "naive_pytorch",
           "student_floor", "topk_teacher"]
