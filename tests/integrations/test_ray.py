"""Ray workers that own one tensor-parallel rank each (verl's layout) call shardkl with their own group.

One local Ray instance for the module (each start costs seconds on 2 cores), shut down at the end; the actor
classes are defined here and shipped to the workers by value (``register_pickle_by_value``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

import shardkl  # noqa: E402
from tests._distributed import free_port, split_sizes  # noqa: E402
from tests.reference import reference  # noqa: E402

# a Ray instance per test or module: in `pytest -m slow`
pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
VOCAB, PADDED = 1001, 1004


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

    def kl(self, p_logits: torch.Tensor, q_logits: torch.Tensor, tokens: torch.Tensor, start: int) -> dict[str, Any]:
        """:func:`shardkl.integrations.ray.kl_stats_on_worker` on an uneven split given by an explicit layout."""
        from shardkl.integrations.ray import kl_stats_on_worker

        layout = shardkl.VocabLayout(start, start + p_logits.shape[-1], group=self.tp_group)
        return kl_stats_on_worker(p_logits, q_logits, tokens, layout=layout)


@pytest.fixture(scope="module")
def workers() -> Iterator[list[Any]]:
    import ray.cloudpickle

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor class is defined in this file
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}})
    try:
        actor = ray.remote(num_cpus=1)(TPWorker)
        port = free_port()
        group = [actor.remote(rank, 2, port) for rank in range(2)]
        yield group
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_ray_workers_match_one_process(workers: list[Any]) -> None:
    g = torch.Generator().manual_seed(0)
    policy = torch.randn(2, 6, PADDED, generator=g, dtype=torch.float64)
    ref = policy + 0.3 * torch.randn(2, 6, PADDED, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (2, 6), generator=g)
    for kind in ("exact", "k3+"):
        results = ray.get([w.penalty.remote(policy, ref, tokens, kind) for w in workers], timeout=120)
        full = policy[..., :VOCAB].clone().requires_grad_()
        expected = shardkl.kl_penalty(full, ref[..., :VOCAB], tokens, estimator=kind)
        expected.backward()
        grad = torch.cat([r[1] for r in results], dim=-1)
        for loss, _ in results:
            torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad[..., :VOCAB], full.grad, rtol=1e-10, atol=1e-14)
        assert (grad[..., VOCAB:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_stats_on_worker_matches_float64_reference(workers: list[Any], dtype: torch.dtype) -> None:
    vocab = 1003
    g = torch.Generator().manual_seed(7)
    p = torch.randn(3, 4, vocab, generator=g, dtype=torch.float64) * 2
    q = p + 0.05 * torch.randn(3, 4, vocab, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (3, 4), generator=g)
    sizes = split_sizes(vocab, 2)  # uneven: 601 + 402
    bounds = [(sum(sizes[:r]), sum(sizes[: r + 1])) for r in range(2)]
    refs = [w.kl.remote(p[..., lo:hi].to(dtype), q[..., lo:hi].to(dtype), tokens, lo)
            for w, (lo, hi) in zip(workers, bounds, strict=True)]
    per_worker = ray.get(refs, timeout=120)
    expected = reference(p.to(dtype).double(), q.to(dtype).double(), tokens)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name in ("exact_kl", "entropy", "p_logprobs", "q_logprobs"):
        got = per_worker[0][name]
        assert isinstance(got, np.ndarray) and got.shape == (3, 4)
        assert got.dtype == (np.float64 if dtype == torch.float64 else np.float32)
        np.testing.assert_allclose(got, expected[name].numpy(), rtol=tol, atol=tol, err_msg=name)
        np.testing.assert_array_equal(per_worker[1][name], got)  # every rank returns the same arrays
    assert set(per_worker[0]) == {"exact_kl", "entropy", "p_logprobs", "q_logprobs", "k1", "k2", "k3"}
    log_ratio = per_worker[0]["q_logprobs"] - per_worker[0]["p_logprobs"]
    np.testing.assert_allclose(per_worker[0]["k1"], -log_ratio, rtol=1e-6, atol=1e-12)
