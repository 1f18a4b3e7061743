"""The plots of an audit (matplotlib, written by rank 0 next to ``summary.json``).

- ``kl_histogram.png``: how many tokens have each per-token KL, both directions, on a log axis (log-spaced bins, so
  every decade gets the same number of bins); tokens whose KL is exactly 0 cannot sit on a log axis and are counted
  in the legend instead.
- ``kl_by_position.png``: the mean per-token KL at each position of the window (top) and how many tokens each
  position holds (bottom): early positions see little context, late ones exist only in long documents.
- ``estimators.png`` (with ``--estimators``): tokens grouped by their exact KL(P‖Q) (equal-count groups), and in
  each group the mean of k1, k2 and k3 over its draws against the group's mean exact KL; an unbiased estimator sits
  on the diagonal, error bars are two standard errors.

``matplotlib.figure.Figure`` is used directly (no pyplot): no global state and no display backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

HISTOGRAM = "kl_histogram.png"
BY_POSITION = "kl_by_position.png"
ESTIMATORS = "estimators.png"
_COLOURS = {"kl_pq": "tab:blue", "kl_qp": "tab:orange", "k1": "tab:green", "k2": "tab:purple", "k3": "tab:red"}
_NAMES = {"kl_pq": "KL(P‖Q)", "kl_qp": "KL(Q‖P)"}


def _figure(rows: int = 1, height: float = 4.2) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(8, height * rows), dpi=110, layout="constrained")


def histogram(path: Path, columns: Mapping[str, np.ndarray], tokens: int) -> None:
    """``kl_histogram.png``: per-token KL of both directions, log-spaced bins on a log axis.

    Args:
        path: the PNG to write.
        columns: ``kl_pq`` and ``kl_qp`` of every scored token.
        tokens: scored tokens, for the title.
    """
    fig = _figure()
    ax = fig.add_subplot()
    positive = [np.asarray(columns[k], dtype=np.float64) for k in ("kl_pq", "kl_qp")]
    lows = [v[v > 0].min() for v in positive if (v > 0).any()]
    if not lows:
        ax.text(0.5, 0.5, "every per-token KL is 0: the two models agree exactly", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    else:
        low = min(lows)
        high = max(v.max() for v in positive)
        high = high * 1.0001 if high > low else low * 10
        bins = np.geomspace(low, high, int(min(80, max(20, 12 * np.log10(high / low)))) + 1)
        for name, values in zip(("kl_pq", "kl_qp"), positive, strict=True):
            zeros = int((values <= 0).sum())
            label = f"{_NAMES[name]}: mean {values.mean():.3g}, median {np.median(values):.3g}"
            if zeros:
                label += f" ({zeros:,} tokens at 0, not shown)"
            ax.hist(values[values > 0], bins=bins, histtype="step", linewidth=1.6, color=_COLOURS[name],
                    label=label)
            ax.axvline(values.mean(), color=_COLOURS[name], linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("per-token KL, nats (log scale; dashed: the mean)")
        ax.set_ylabel("tokens per bin")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
    ax.set_title(f"Per-token KL between P and Q over {tokens:,} tokens")
    fig.savefig(path)


def by_position(path: Path, columns: Mapping[str, np.ndarray], context: int) -> None:
    """``kl_by_position.png``: mean KL per position in the window, and tokens per position.

    Args:
        path: the PNG to write.
        columns: ``pos``, ``kl_pq`` and ``kl_qp`` of every scored token.
        context: the window length (a token's position in its window is ``pos % (context - 1)``).
    """
    position = np.asarray(columns["pos"]) % (context - 1)
    last = int(position.max()) + 1
    # at most 64 groups of positions, each 1, 2 or 5 x 10^k positions wide
    width = next(w for w in (m * 10**k for k in range(12) for m in (1, 2, 5)) if -(-last // w) <= 64)
    group = position // width
    groups = int(group.max()) + 1
    count = np.bincount(group, minlength=groups)
    x = (np.arange(groups) * width + (width - 1) / 2)[count > 0]
    fig = _figure(2, 3.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1))
    means = []
    for name in ("kl_pq", "kl_qp"):
        total = np.bincount(group, weights=np.asarray(columns[name], dtype=np.float64), minlength=groups)
        means.append(total[count > 0] / count[count > 0])
        top.plot(x, means[-1], marker="." if len(x) < 40 else None, color=_COLOURS[name],
                 label=f"mean {_NAMES[name]}")
    low, high = min(m.min() for m in means), max(m.max() for m in means)
    if low > 0 and high / low > 10:  # a log axis only where the means span more than a decade
        top.set_yscale("log")
    else:
        top.set_ylim(bottom=0)
    top.set_ylabel("mean per-token KL, nats")
    top.legend(fontsize=8)
    top.grid(True, alpha=0.3)
    span = "each position" if width == 1 else f"positions grouped by {width}"
    top.set_title(f"KL by position in the window ({span}; a window is at most {context} tokens)")
    bottom.bar(x, count[count > 0], width=width * 0.9, color="0.6")
    bottom.set_ylabel("tokens")
    bottom.set_xlabel("position in the window (0: its first token, which sees no earlier context)")
    bottom.grid(True, alpha=0.3)
    fig.savefig(path)


def estimators(path: Path, columns: Mapping[str, np.ndarray], summary: Mapping[str, Any]) -> None:
    """``estimators.png``: k1, k2, k3 (mean over each group's draws) against the exact KL(P‖Q) of the group.

    Args:
        path: the PNG to write.
        columns: ``kl_pq`` and ``k1``/``k2``/``k3`` (``[tokens, draws]``) of every scored token.
        summary: the summary (its ``estimators``, for the legend).
    """
    exact = np.asarray(columns["kl_pq"], dtype=np.float64)
    order = np.argsort(exact, kind="stable")
    parts = np.array_split(order, min(12, max(1, exact.size // 20)))
    fig = _figure()
    ax = fig.add_subplot()
    xs = np.array([exact[p].mean() for p in parts])
    lowest = []
    for offset, name in zip((-0.04, 0.0, 0.04), ("k1", "k2", "k3"), strict=True):
        draws = np.asarray(columns[name], dtype=np.float64)
        means = np.array([draws[p].mean() for p in parts])
        errors = np.array([2 * draws[p].std(ddof=1) / np.sqrt(draws[p].size) if draws[p].size > 1 else 0.0
                           for p in parts])
        stats = summary["estimators"][name]
        ax.errorbar(xs * (1 + offset), means, yerr=errors, fmt="o", markersize=4, capsize=2, color=_COLOURS[name],
                    label=f"{name}: overall bias {stats['bias']:+.2e}, std {stats['std']:.2e}")
        lowest.append((means - errors).min())
    span = np.array([xs.min(), xs.max()])
    ax.plot(span, span, color="0.3", linewidth=1, linestyle="--", label="estimate = exact KL")
    ax.set_xscale("log")
    if min(lowest) > 0:
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=max(xs.min(), 1e-12))
    ax.set_xlabel("exact KL(P‖Q) per token, mean of the group (log scale)")
    ax.set_ylabel("estimator, mean of the group's draws")
    samples = summary["estimators"]["samples"]
    ax.set_title(f"Schulman's estimators against the exact KL ({len(parts)} groups of tokens, {samples} draw(s) "
                 "from P per token; bars: ±2 stderr)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    fig.savefig(path)


def write_plots(out: str | Path, columns: Mapping[str, np.ndarray], *, context: int,
                summary: Mapping[str, Any]) -> list[Path]:
    """Write the plots of an audit.

    Args:
        out: the output folder.
        columns: the per-token columns of every shard.
        context: the window length.
        summary: the summary.

    Returns:
        The paths written.
    """
    folder = Path(out)
    written = [folder / HISTOGRAM, folder / BY_POSITION]
    histogram(written[0], columns, int(summary["tokens"]))
    by_position(written[1], columns, context)
    if "k1" in columns and summary.get("estimators"):
        written.append(folder / ESTIMATORS)
        estimators(written[-1], columns, summary)
    return written


__all__ = ["BY_POSITION", "ESTIMATORS", "HISTOGRAM", "by_position", "estimators", "histogram", "write_plots"]
