"""The statistics of an audit from its per-token values (numpy, float64), and the report a person reads.

Everything here is exact over every scored token: quantiles are numpy's (``np.quantile``, its default linear
interpolation between order statistics) of the full column, not a sketch. ``std`` is the sample standard deviation
(``ddof=1``; 0 for one token) and ``stderr = std / sqrt(n)``, the standard error of the mean treating tokens as
independent (neighbouring tokens are correlated, so read it as a lower bound).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

QUANTILES: tuple[tuple[str, float], ...] = (
    ("p01", 0.001),
    ("p1", 0.01),
    ("p5", 0.05),
    ("p10", 0.10),
    ("median", 0.50),
    ("p90", 0.90),
    ("p95", 0.95),
    ("p99", 0.99),
    ("p999", 0.999),
)
"""The quantiles of ``kl_pq``/``kl_qp`` in the summary: ``p01`` is the 0.1st percentile, ``p999`` the 99.9th."""

_LABELS = {"p01": "0.1%", "p1": "1%", "p5": "5%", "p10": "10%", "median": "median", "p90": "90%", "p95": "95%",
           "p99": "99%", "p999": "99.9%"}


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined statistic is ``None``."""
    return float(value) if math.isfinite(value) else None


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if values.size > 1 else 0.0


def describe(values: np.ndarray) -> dict[str, float]:
    """``mean``, ``std``, ``stderr``, ``min``, the :data:`QUANTILES`, ``max`` of ``values`` (float64).

    Args:
        values: 1-D, at least one value.

    Returns:
        The statistics in that order (a JSON object in ``summary.json``).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("describe needs at least one value")
    std = _std(x)
    quantiles = np.quantile(x, [q for _, q in QUANTILES])
    out = {"mean": float(x.mean()), "std": std, "stderr": std / math.sqrt(x.size), "min": float(x.min())}
    out.update({name: float(v) for (name, _), v in zip(QUANTILES, quantiles, strict=True)})
    out["max"] = float(x.max())
    return out


def summarise(columns: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The statistics of the summary from the per-token columns of every shard.

    Args:
        columns: ``doc``, ``kl_pq``, ``kl_qp``, ``logp_p``, ``logp_q``, ``entropy_p``, ``entropy_q``, ``top1_p``,
            ``top1_q``, ``token`` (1-D, one row per scored token), and with estimators ``k1``, ``k2``, ``k3``
            (``[tokens, samples]``).

    Returns:
        ``tokens``, ``documents`` (with at least one scored token), ``kl_pq``, ``kl_qp`` (:func:`describe`),
        ``ppl_p``, ``ppl_q``, ``ln_ppl_ratio`` (ln(PPL_Q / PPL_P)) and its ``ln_ppl_ratio_stderr``,
        ``top1_agreement``, ``accuracy_p``/``accuracy_q`` (top-1 = the actual next token), ``entropy_p``/
        ``entropy_q`` (means), ``delta_p`` (Q(next) - P(next): ``mean``, ``rms``, ``p1``, ``p99``) and, with
        estimators, ``estimators`` (:func:`estimator_stats`).
    """
    logp_p = np.asarray(columns["logp_p"], dtype=np.float64)
    logp_q = np.asarray(columns["logp_q"], dtype=np.float64)
    n = logp_p.size
    if n == 0:
        raise ValueError("the audit scored no tokens")
    log_ratio = logp_p - logp_q  # per token, ln P(next) - ln Q(next); its mean is ln(PPL_Q / PPL_P)
    delta = np.exp(logp_q) - np.exp(logp_p)
    top1_p, top1_q, token = (np.asarray(columns[k]) for k in ("top1_p", "top1_q", "token"))
    out: dict[str, Any] = {
        "tokens": int(n),
        "documents": int(np.unique(np.asarray(columns["doc"])).size),
        "kl_pq": describe(columns["kl_pq"]),
        "kl_qp": describe(columns["kl_qp"]),
        "ppl_p": _finite_or_none(math.exp(-logp_p.mean())),
        "ppl_q": _finite_or_none(math.exp(-logp_q.mean())),
        "ln_ppl_ratio": _finite_or_none(float(log_ratio.mean())),
        "ln_ppl_ratio_stderr": _finite_or_none(_std(log_ratio) / math.sqrt(n)),
        "top1_agreement": float(np.mean(top1_p == top1_q)),
        "accuracy_p": float(np.mean(top1_p == token)),
        "accuracy_q": float(np.mean(top1_q == token)),
        "entropy_p": float(np.mean(np.asarray(columns["entropy_p"], dtype=np.float64))),
        "entropy_q": float(np.mean(np.asarray(columns["entropy_q"], dtype=np.float64))),
        "delta_p": {
            "mean": float(delta.mean()),
            "rms": float(math.sqrt(np.mean(delta * delta))),
            "p1": float(np.quantile(delta, 0.01)),
            "p99": float(np.quantile(delta, 0.99)),
        },
    }
    if "k1" in columns:
        out["estimators"] = estimator_stats(columns, exact_kl=out["kl_pq"]["mean"])
    return out


def estimator_stats(columns: Mapping[str, np.ndarray], *, exact_kl: float) -> dict[str, Any]:
    """Schulman's k1, k2, k3 over every draw against the exact mean KL(P‖Q) of the same positions.

    Args:
        columns: ``k1``, ``k2``, ``k3``, each ``[tokens, draws]``.
        exact_kl: the mean exact KL(P‖Q) over the same tokens.

    Returns:
        ``{"samples": S, "draws": tokens x S, "k1": {mean, bias, std, stderr, rel_bias}, ...}``; ``bias`` is the
        estimator's mean minus ``exact_kl``, ``rel_bias`` is ``|bias| / exact_kl`` (``None`` when the KL is 0).
    """
    out: dict[str, Any] = {}
    for name in ("k1", "k2", "k3"):
        draws = np.asarray(columns[name], dtype=np.float64)
        out.setdefault("samples", int(draws.shape[1]))
        out.setdefault("draws", int(draws.size))
        values = draws.reshape(-1)
        mean, std = float(values.mean()), _std(values)
        bias = mean - exact_kl
        out[name] = {
            "mean": mean,
            "bias": bias,
            "std": std,
            "stderr": std / math.sqrt(values.size),
            "rel_bias": abs(bias) / exact_kl if exact_kl > 0 else None,
        }
    return out


def _number(value: float | None, width: int = 14) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.4e}"


def _percent(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def format_report(summary: Mapping[str, Any]) -> str:
    """``report.txt``: the summary as one reads it, both KL directions side by side, then what they mean.

    Args:
        summary: ``summary.json``'s content.

    Returns:
        The report, ending in a newline.
    """
    p_dtype, q_dtype = summary.get("p_dtype", "?"), summary.get("q_dtype", "?")
    lines = [
        f"shardkl KL audit: {summary['tokens']:,} tokens scored in {summary['documents']:,} documents "
        f"(windows of {summary.get('context', '?')} tokens)",
        f"P (reference): {summary.get('p_model', '?')} ({p_dtype})",
        f"Q (audited):   {summary.get('q_model', '?')} ({q_dtype})",
        f"data:          {summary.get('data', '?')}",
        "",
        f"{'per-token KL, nats':<22}{'KL(P||Q)':>14}{'KL(Q||P)':>14}",
    ]
    forward, reverse = summary["kl_pq"], summary["kl_qp"]
    rows = [("mean", "mean"), ("std", "std"), ("stderr of the mean", "stderr"), ("min", "min")]
    rows += [(_LABELS[name], name) for name, _ in QUANTILES]
    rows.append(("max", "max"))
    for label, key in rows:
        lines.append(f"{label:<22}{_number(forward[key])}{_number(reverse[key])}")
    ppl = (summary["ppl_p"], summary["ppl_q"])
    delta = summary["delta_p"]
    ratio, ratio_err = summary["ln_ppl_ratio"], summary["ln_ppl_ratio_stderr"]
    ratio_text = "n/a" if ratio is None else f"{ratio:.6f} ± {ratio_err:.6f}" if ratio_err is not None else f"{ratio}"
    lines += [
        "",
        f"{'':<22}{'P':>14}{'Q':>14}",
        f"{'perplexity':<22}" + "".join("         n/a" if v is None else f"{v:>14.4f}" for v in ppl),
        f"{'mean entropy, nats':<22}{summary['entropy_p']:>14.4f}{summary['entropy_q']:>14.4f}",
        f"{'top-1 accuracy':<22}{_percent(summary['accuracy_p']):>14}{_percent(summary['accuracy_q']):>14}",
        "",
        f"ln(PPL_Q / PPL_P):     {ratio_text}",
        f"top-1 agreement:       {_percent(summary['top1_agreement'])} of tokens (P's and Q's most likely next token "
        "are the same)",
        f"Δp = Q(next) - P(next): mean {_percent(delta['mean'], 3)}, RMS {_percent(delta['rms'], 3)}, "
        f"1st percentile {_percent(delta['p1'], 3)}, 99th {_percent(delta['p99'], 3)}",
    ]
    estimators = summary.get("estimators")
    if estimators:
        exact = forward["mean"]
        lines += [
            "",
            f"Schulman's estimators of KL(P||Q) at {estimators['samples']} token(s) drawn from P per position "
            f"({estimators['draws']:,} draws), against the exact mean {exact:.4e}:",
            f"{'estimator':<10}{'mean':>13}{'bias':>13}{'std':>13}{'stderr':>13}{'|bias|/KL':>11}",
        ]
        for name in ("k1", "k2", "k3"):
            s = estimators[name]
            rel = "n/a" if s["rel_bias"] is None else f"{s['rel_bias']:.4f}"
            lines.append(f"{name:<10}{s['mean']:>13.4e}{s['bias']:>13.3e}{s['std']:>13.3e}{s['stderr']:>13.3e}"
                         f"{rel:>11}")
        lines.append("bias: mean - exact KL; stderr: std / sqrt(draws). A bias within about two stderr is noise.")
    lines += [
        "",
        "KL(P||Q) = E_P[ln P - ln Q] is mass-covering for Q: it is large where P puts probability that Q lacks.",
        "KL(Q||P) = E_Q[ln Q - ln P] is mode-seeking: it is large where Q puts probability that P lacks.",
        "Quantiles are exact over every scored token; PPL = exp(-mean ln prob of the actual next token).",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["QUANTILES", "describe", "estimator_stats", "format_report", "summarise"]
