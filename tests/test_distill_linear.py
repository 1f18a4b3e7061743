"""jsd, topk_kl and distillation_loss from hidden states (shardkl.LinearLogits), never the logits.

References materialise ``hidden @ weight.T + bias`` in float64. The teacher's and the student's hidden sizes differ.
Gradients of ``hidden`` are each rank's partial sums over its vocabulary rows, so the test sums them over the ranks,
as the layer that replicated ``hidden`` does.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import shardkl
from shardkl import _sources
from shardkl.testing import count_collectives
from tests._distill_reference import bucket_reference, jsd_reference
from tests._distributed import local_layout, run_ranks, split_sizes

VOCAB, H_TEACHER, H_STUDENT = 211, 16, 9
STUDENT_LEAVES = ("h_s", "w_s", "b_s")


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "h_t": torch.randn(2, 4, H_TEACHER, generator=g, dtype=torch.float64),
        "w_t": torch.randn(VOCAB, H_TEACHER, generator=g, dtype=torch.float64) * 0.5,
        "h_s": torch.randn(2, 4, H_STUDENT, generator=g, dtype=torch.float64),
        "w_s": torch.randn(VOCAB, H_STUDENT, generator=g, dtype=torch.float64) * 0.5,
        "b_s": torch.randn(VOCAB, generator=g, dtype=torch.float64) * 0.3,
        "weights": torch.randn(2, 4, generator=g, dtype=torch.float64),
    }


def _logits(m: dict[str, torch.Tensor], leaves: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = leaves.get("h_t", m["h_t"]) @ leaves.get("w_t", m["w_t"]).T
    student = leaves["h_s"] @ leaves["w_s"].T + leaves["b_s"]
    return teacher, student


def _check(rank: int, world: int) -> None:
    _sources.TILE_ELEMENTS, _sources.MAX_TILE_COLS = 96, 16  # several row and vocabulary blocks per shard
    sizes = split_sizes(VOCAB, world)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    layout = local_layout(sizes, rank)
    m = _model()
    teacher_full = m["h_t"] @ m["w_t"].T
    logprobs, ids = torch.log_softmax(teacher_full, -1).topk(7, dim=-1)

    def run(kind: str, value_of, reference_of, frozen_teacher: bool, collectives: int = 1) -> None:
        names = STUDENT_LEAVES if frozen_teacher else (*STUDENT_LEAVES, "h_t", "w_t")
        ref_leaves = {k: m[k].clone().requires_grad_() for k in names}
        teacher, student = _logits(m, ref_leaves)
        want = reference_of(teacher, student)
        (want * m["weights"]).sum().backward()
        leaves = {k: (m[k][start:stop] if k.startswith(("w_", "b_")) else m[k]).clone().requires_grad_() for k in names}
        teacher_w = leaves.get("w_t", m["w_t"][start:stop])
        # each rank's partial gradient of the hidden states, summed below as the replicating layer would
        teacher_src = shardkl.LinearLogits(leaves.get("h_t", m["h_t"]), teacher_w, hidden_grad="partial")
        student_src = shardkl.LinearLogits(leaves["h_s"], leaves["w_s"], leaves["b_s"], hidden_grad="partial")
        with count_collectives() as forward:
            got = value_of(teacher_src, student_src, layout)
        torch.testing.assert_close(got, want.detach(), rtol=1e-11, atol=1e-14, msg=kind)
        with count_collectives() as backward:
            (got * m["weights"]).sum().backward()
        assert backward.total == 0, (kind, backward.calls)
        if world > 1:
            assert forward.total == collectives, (kind, forward.calls)
        for name, leaf in leaves.items():
            grad = leaf.grad
            assert grad is not None, (kind, name)
            if name.startswith("h_") and world > 1:
                grad = grad.clone()
                dist.all_reduce(grad)
            full = ref_leaves[name].grad
            expected = full if name.startswith("h_") else full[start:stop]
            torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12, msg=f"{kind} {name}")

    for beta in (0.0, 0.3, 1.0):
        run(
            f"jsd {beta}",
            lambda t, s, lay, b=beta: shardkl.jsd(t, s, beta=b, layout=lay),
            lambda t, s, b=beta: jsd_reference(t, s, b),
            frozen_teacher=False,
            collectives=1 if beta in (0.0, 1.0) else 2,
        )
    for direction in ("forward", "reverse"):
        run(
            f"topk {direction}",
            lambda t, s, lay, d=direction: shardkl.topk_kl(s, ids, logprobs, direction=d, layout=lay),
            lambda t, s, d=direction: bucket_reference(s, ids, logprobs, d),
            frozen_teacher=True,
        )
    # the loss helper with a frozen teacher given by its hidden states: gradients to the student only
    run(
        "distillation_loss jsd",
        lambda t, s, lay: shardkl.distillation_loss(s, t, divergence="jsd", beta=0.7, layout=lay, reduction="none"),
        lambda t, s: jsd_reference(t, s, 0.7),
        frozen_teacher=True,
        collectives=2,
    )


@pytest.mark.parametrize("world", [1, 2, 3])
def test_linear_logits_match_materialised_float64_logits(world: int) -> None:
    run_ranks(_check, world)


def test_linear_logits_mixed_with_a_logits_tensor() -> None:
    m = _model(seed=1)
    teacher = m["h_t"] @ m["w_t"].T
    h = m["h_s"].clone().requires_grad_()
    got = shardkl.jsd(teacher, shardkl.LinearLogits(h, m["w_s"], m["b_s"]), beta=0.5, temperature=1.3)
    h_ref = m["h_s"].clone().requires_grad_()
    want = jsd_reference(teacher, h_ref @ m["w_s"].T + m["b_s"], 0.5, temperature=1.3)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad)
    # the hidden states of the response positions only, selected like logits
    sub = shardkl.LinearLogits(m["h_s"], m["w_s"], m["b_s"])[:, 1:]
    torch.testing.assert_close(
        shardkl.jsd(teacher[:, 1:], sub), jsd_reference(teacher[:, 1:], (m["h_s"] @ m["w_s"].T + m["b_s"])[:, 1:], 0.5)
    )
