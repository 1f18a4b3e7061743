"""The seed experiment: what does not depend on the world size (bit for bit, or to float32 rounding), its table."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from shardkl.apps.experiment import (
    STAGES,
    ExperimentConfig,
    compute_stats,
    format_table,
    make_logits,
    run_rank,
    sample,
)
from shardkl.layout import VocabLayout
from tests._distributed import run_ranks

CPU = torch.device("cpu")
# uneven over 3 ranks (334 + 333 + 333), two samples per position
CONFIG = ExperimentConfig(vocab_size=1000, seq_len=20, batch_size=2, samples=2)
EPS32 = torch.finfo(torch.float32).eps


def _per_token(config: ExperimentConfig, layout: VocabLayout) -> dict[str, torch.Tensor]:
    ref, new = make_logits(config, layout, CPU)
    tokens = sample(config, layout, ref)
    stats = compute_stats(config, layout, ref, new, tokens)
    return {"tokens": tokens, "ref": ref, "new": new, **{k: v for k, v in stats._asdict().items() if v is not None}}


def _save_rank(rank: int, world: int, config: ExperimentConfig, out: str) -> None:
    values = _per_token(config, VocabLayout.split(config.vocab_size, dist.group.WORLD, "balanced"))
    torch.save(values, f"{out}.{rank}")


@pytest.fixture(scope="module")
def per_world(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, torch.Tensor]]]:
    out = tmp_path_factory.mktemp("invariance")
    results = {1: [_per_token(CONFIG, VocabLayout.full(CONFIG.vocab_size))]}
    for world in (2, 3):
        run_ranks(_save_rank, world, CONFIG, str(out / f"w{world}"))
        results[world] = [torch.load(out / f"w{world}.{rank}") for rank in range(world)]
    return results


def test_logits_and_tokens_are_the_same_bit_for_bit_for_every_world_size(per_world) -> None:
    one = per_world[1][0]
    for world in (2, 3):
        ranks = per_world[world]
        for name in ("ref", "new"):
            assert torch.equal(torch.cat([r[name] for r in ranks], dim=-1), one[name]), (world, name)
        for r in ranks:
            assert torch.equal(r["tokens"], one["tokens"]), world


def test_per_token_statistics_agree_to_float32_rounding(per_world) -> None:
    one = per_world[1][0]
    for world in (2, 3):
        for got in per_world[world]:
            # every rank returns the same values
            assert torch.equal(got["exact_kl"], per_world[world][0]["exact_kl"])
            # log-probabilities of size log V: within a few float32 ulps (the partial sums merge in another order)
            for name in ("p_logprobs", "q_logprobs", "entropy"):
                bound = 4 * EPS32 * one[name].abs().double()
                assert ((got[name].double() - one[name].double()).abs() <= bound).all(), (world, name)
            # k1 is the difference of two log-probabilities, so its error is theirs, not relative to k1
            bound = 4 * EPS32 * (one["p_logprobs"].abs() + one["q_logprobs"].abs()).double()
            assert ((got["k1"].double() - one["k1"].double()).abs() <= bound).all(), world
            # the exact KL per token (about 5e-3) agrees to 1e-7 absolute (measured: under 1e-8)
            assert (got["exact_kl"].double() - one["exact_kl"].double()).abs().max() <= 1e-7, world


def test_run_rank_reports_its_stages_in_order_and_the_table_explains_its_columns() -> None:
    seen: list[str] = []
    result = run_rank(CONFIG, progress=lambda stage, message: seen.append(stage))
    assert tuple(seen) == STAGES
    assert result["tokens"] == 40 and result["samples"] == 2 and result["world_size"] == 1
    for s in result["estimators"].values():
        assert s["rel_error"] == pytest.approx(abs(s["bias"]) / result["exact_kl"])
    table = format_table(result)
    header = next(line for line in table.splitlines() if line.startswith("estimator"))
    assert header.split() == ["estimator", "mean", "bias", "std", "std", "error", "|bias|/KL"]
    assert f"exact KL(reference||new) per token, mean: {result['exact_kl']:.6e}" in table
    # the legend under the table names every column and the number of draws behind it
    assert "of the estimator's 80 per-token values" in table and "std / sqrt(80)" in table
    assert "bias: mean - exact KL" in table and "|bias|/KL: the bias relative to the exact KL" in table


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vocab_size": 0}, "vocab_size must be >= 1, got 0"),
        ({"delta": -0.1}, "delta must be >= 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"dtype": "int8"}, "dtype must be one of float32, bfloat16, float16, float64, got 'int8'"),
        ({"backend": "mpi"}, "backend must be one of auto, gloo, nccl"),
    ],
)
def test_bad_experiment_config_raises_value_error(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(**changes)


def test_configs_seed_gives_the_documented_exact_kl() -> None:
    result = run_rank(ExperimentConfig())
    assert f"{result['exact_kl']:.6e}" == "4.961407e-03"
