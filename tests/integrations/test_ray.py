"""Ray workers that own one tensor-parallel rank each (verl's layout) call shardkl with their own group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

import shardkl  # noqa: E402
from tests._distributed import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VOCAB, PADDED = 1001, 1004


@ray.remote(num_cpus=1)
class TPWorker:
    """One rank: joins the process group, holds a padded vocabulary slice, returns its loss and gradient."""

    def __init__(self, rank: int, world: int, port: int) -> None:
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        # the trainer's own tensor-parallel group (here: all ranks); shardkl keeps no global state
        self.tp_group = dist.new_group(list(range(world)))
        self.rank, self.world = rank, world

    def penalty(self, policy: torch.Tensor, ref: torch.Tensor, tokens: torch.Tensor, kind: str):
        local = PADDED // self.world
        cols = slice(self.rank * local, (self.rank + 1) * local)
        x = policy[..., cols].clone().requires_grad_()
        loss = shardkl.kl_penalty(x, ref[..., cols], tokens, estimator=kind, group=self.tp_group,
                                  valid_vocab_size=VOCAB)
        loss.backward()
        return loss.detach(), x.grad


@pytest.mark.ray
def test_ray_workers_match_one_process() -> None:
    g = torch.Generator().manual_seed(0)
    policy = torch.randn(2, 6, PADDED, generator=g, dtype=torch.float64)
    ref = policy + 0.3 * torch.randn(2, 6, PADDED, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (2, 6), generator=g)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    try:
        port = free_port()
        workers = [TPWorker.remote(rank, 2, port) for rank in range(2)]
        for kind in ("exact", "k3+"):
            results = ray.get([w.penalty.remote(policy, ref, tokens, kind) for w in workers])
            full = policy[..., :VOCAB].clone().requires_grad_()
            expected = shardkl.kl_penalty(full, ref[..., :VOCAB], tokens, estimator=kind)
            expected.backward()
            grad = torch.cat([r[1] for r in results], dim=-1)
            for loss, _ in results:
                torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(grad[..., :VOCAB], full.grad, rtol=1e-10, atol=1e-14)
            assert (grad[..., VOCAB:] == 0).all()
    finally:
        ray.shutdown()
