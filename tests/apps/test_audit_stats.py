"""The audit's statistics against numpy written out by hand, its report, and its progress lines."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest

from shardkl.apps.audit import store
from shardkl.apps.audit.progress import AuditProgress
from shardkl.apps.audit.stats import QUANTILES, describe, format_report, summarise


def _columns(n: int = 1000, samples: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    logp_p = -rng.gamma(2.0, 1.5, size=n)
    out = {
        "doc": rng.integers(0, 37, size=n),
        "pos": rng.integers(0, 100, size=n),
        "token": rng.integers(0, 5, size=n),
        "kl_pq": rng.lognormal(-5, 2, size=n),
        "kl_qp": rng.lognormal(-5.2, 2.1, size=n),
        "logp_p": logp_p,
        "logp_q": logp_p + rng.normal(0, 0.1, size=n),
        "entropy_p": rng.random(n) * 3,
        "entropy_q": rng.random(n) * 3,
        "top1_p": rng.integers(0, 5, size=n),
        "top1_q": rng.integers(0, 5, size=n),
    }
    if samples:
        out.update({k: rng.normal(1e-2, 0.1, size=(n, samples)) for k in ("k1", "k2", "k3")})
    return out


def test_describe_is_numpy_order_statistics_and_moments() -> None:
    x = np.random.default_rng(1).lognormal(size=2001)
    d = describe(x)
    assert list(d) == ["mean", "std", "stderr", "min", *[name for name, _ in QUANTILES], "max"]
    assert d["mean"] == pytest.approx(x.sum() / x.size, rel=1e-12)
    assert d["std"] == pytest.approx(math.sqrt(((x - x.mean()) ** 2).sum() / (x.size - 1)), rel=1e-12)
    assert d["stderr"] == pytest.approx(d["std"] / math.sqrt(x.size), rel=1e-12)
    ordered = np.sort(x)
    # with 2001 values, the q-quantile of linear interpolation is exactly the order statistic at q * 2000
    for name, q in QUANTILES:
        at = q * 2000
        lo = int(math.floor(at))
        expected = ordered[lo] + (at - lo) * (ordered[min(lo + 1, 2000)] - ordered[lo])
        assert d[name] == pytest.approx(expected, rel=1e-12), name
    assert d["min"] == ordered[0] and d["max"] == ordered[-1] and d["median"] == ordered[1000]
    single = describe(np.array([0.5]))
    assert single["std"] == 0 and single["p01"] == single["p999"] == 0.5
    with pytest.raises(ValueError, match="at least one value"):
        describe(np.array([]))


def test_summary_formulas() -> None:
    c = _columns()
    s = summarise(c)
    assert s["tokens"] == 1000 and s["documents"] == len(set(c["doc"].tolist()))
    assert s["ppl_p"] == pytest.approx(math.exp(-c["logp_p"].mean()), rel=1e-12)
    assert s["ppl_q"] == pytest.approx(math.exp(-c["logp_q"].mean()), rel=1e-12)
    assert s["ln_ppl_ratio"] == pytest.approx(math.log(s["ppl_q"] / s["ppl_p"]), rel=1e-9)
    assert s["ln_ppl_ratio_stderr"] == pytest.approx((c["logp_p"] - c["logp_q"]).std(ddof=1) / math.sqrt(1000))
    assert s["top1_agreement"] == pytest.approx(np.mean(c["top1_p"] == c["top1_q"]))
    assert s["accuracy_q"] == pytest.approx(np.mean(c["top1_q"] == c["token"]))
    delta = np.exp(c["logp_q"]) - np.exp(c["logp_p"])
    assert s["delta_p"]["mean"] == pytest.approx(delta.mean(), rel=1e-12)
    assert s["delta_p"]["rms"] == pytest.approx(math.sqrt((delta**2).mean()), rel=1e-12)
    assert s["delta_p"]["p1"] == pytest.approx(np.percentile(delta, 1), rel=1e-12)
    assert s["delta_p"]["p99"] == pytest.approx(np.percentile(delta, 99), rel=1e-12)
    assert s["kl_qp"]["p999"] == pytest.approx(np.percentile(c["kl_qp"], 99.9), rel=1e-12)
    assert s["kl_pq"]["p01"] == pytest.approx(np.percentile(c["kl_pq"], 0.1), rel=1e-12)
    assert "estimators" not in s


def test_estimator_statistics_are_over_every_draw_against_the_exact_mean() -> None:
    c = _columns(400, samples=3)
    s = summarise(c)["estimators"]
    exact = c["kl_pq"].mean()
    assert s["samples"] == 3 and s["draws"] == 1200
    for name in ("k1", "k2", "k3"):
        draws = c[name].reshape(-1)
        assert s[name]["mean"] == pytest.approx(draws.mean(), rel=1e-12)
        assert s[name]["bias"] == pytest.approx(draws.mean() - exact, rel=1e-9)
        assert s[name]["std"] == pytest.approx(draws.std(ddof=1), rel=1e-12)
        assert s[name]["stderr"] == pytest.approx(draws.std(ddof=1) / math.sqrt(1200), rel=1e-12)
        assert s[name]["rel_bias"] == pytest.approx(abs(draws.mean() - exact) / exact, rel=1e-9)


def test_report_shows_both_directions_side_by_side() -> None:
    c = _columns(samples=2)
    summary = {**summarise(c), "p_model": "/m/p", "q_model": "/m/q", "p_dtype": "float32", "q_dtype": "bfloat16",
               "data": "/d.txt", "context": 64}
    text = format_report(summary)
    lines = text.splitlines()
    documents = summary["documents"]
    assert lines[0] == f"shardkl KL audit: 1,000 tokens scored in {documents} documents (windows of 64 tokens)"
    assert lines[1] == "P (reference): /m/p (float32)" and lines[2] == "Q (audited):   /m/q (bfloat16)"
    header = next(line for line in lines if line.startswith("per-token KL"))
    assert header.split()[-2:] == ["KL(P||Q)", "KL(Q||P)"]
    p99 = next(line for line in lines if line.startswith("99%"))
    assert p99.split()[1:] == [f"{summary['kl_pq']['p99']:.4e}", f"{summary['kl_qp']['p99']:.4e}"]
    assert any(line.startswith("k3 ") for line in lines) and "mass-covering" in text and "mode-seeking" in text
    assert text.endswith("\n") and "nan" not in text.lower()


def test_progress_lines_count_own_batches_and_other_groups_shards_from_disk(tmp_path: Path) -> None:
    now = [0.0]
    out = io.StringIO()
    progress = AuditProgress(tmp_path, {0: 100, 1: 300}, interval_s=5, stream=out, terminal=False,
                             clock=lambda: now[0])
    now[0] = 2.0
    progress.advance(0, 40)
    assert out.getvalue() == ""  # within the interval
    now[0] = 10.0
    progress.advance(0, 60)
    assert out.getvalue().splitlines() == ["[shardkl] scored 100 of 400 tokens (25%), 10 tokens/s, 00:30 left"]
    # shard 1 belongs to another group: it counts once its file appears
    store.write_shard(tmp_path, 1, {name: np.zeros(1) for name in store.COLUMNS})
    now[0] = 20.0
    progress.poll()
    assert progress.done == 400 and out.getvalue().splitlines()[-1].startswith("[shardkl] scored 400 of 400 tokens")
    progress.close()
    assert "\r" not in out.getvalue()


def test_driver_progress_starts_its_clock_at_the_first_shard(tmp_path: Path) -> None:
    now = [0.0]
    out = io.StringIO()
    progress = AuditProgress(tmp_path, {0: 100, 1: 100}, interval_s=1, stream=out, terminal=False,
                             clock=lambda: now[0], start_at_first=True)
    now[0] = 30.0  # the workers are starting: no line while nothing is counted
    progress.poll(force=True)
    assert out.getvalue() == "" and progress.rate() is None
    store.write_shard(tmp_path, 0, {name: np.zeros(1) for name in store.COLUMNS})
    progress.poll(force=True)
    now[0] = 40.0
    store.write_shard(tmp_path, 1, {name: np.zeros(1) for name in store.COLUMNS})
    progress.poll(force=True)
    # 100 tokens in the 10 s since the first shard, not 200 in 40 s
    assert progress.rate() == pytest.approx(10.0)
