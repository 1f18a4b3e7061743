"""The benchmark's table, summary and plot, from its rows (:class:`shardkl.bench.measure.Row`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shardkl.bench.measure import Row

EXPLAIN = (
    "x floor = median time / median time of `floor` (reading both inputs once, a.sum() + b.sum()) at the same "
    "point in the same run: 1.0 is the memory-bandwidth floor, lower is better. extra = peak memory allocated "
    "during the call beyond the inputs (and, for forward+backward, beyond the two gradients), in % of the inputs."
)

_METHOD_ORDER = ("floor", "grad_memory", "eager_reference", "allgather_baseline", "megatron_baseline")


def _method_key(name: str) -> tuple[int, str]:
    return (_METHOD_ORDER.index(name), name) if name in _METHOD_ORDER else (len(_METHOD_ORDER), name)


def _sorted(rows: Iterable[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (r.world_size, r.dtype != "float32", r.dtype, r.tokens, r.vocab,
                                       _method_key(r.method), r.passes != "forward"))


def _bandwidth(row: Row) -> tuple[float, float | None] | None:
    """Achieved GB/s and % of the device's peak on CUDA: forward reads both inputs once; forward+backward also
    reads them again and writes both gradients (3x the bytes)."""
    if row.device != "cuda" or not row.median_s or math.isnan(row.median_s):
        return None
    moved = row.input_bytes * (3 if row.passes == "forward+backward" else 1)
    achieved = moved / row.median_s
    peak = row.machine.get("hbm_bytes_per_s")
    return achieved / 1e9, None if not peak else 100 * achieved / peak


def logits_rows(rows: Iterable[Row]) -> list[Row]:
    """The rows of the logits methods (the fused-linear rows have their own table, ``shardkl.bench.fused``)."""
    return [r for r in rows if not r.method.startswith("linear:")]


def format_table(rows: list[Row]) -> str:
    """One line per (point, method, pass), grouped by world size and dtype."""
    rows = logits_rows(rows)
    cuda = any(r.device == "cuda" for r in rows)
    head = (f"{'ws':>2} {'dtype':<8} {'tokens':>6} {'vocab':>7}  {'method':<22}{'pass':<17}{'x floor':>8}"
            f"{'median ms':>11}{'p20-p80 ms':>17}{'extra MiB':>11}{'extra':>8}{'coll':>5}{'B/tok/rank':>11}")
    if cuda:
        head += f"{'GB/s':>8}{'% HBM':>7}"
    lines = [head, "-" * len(head)]
    group = None
    for r in _sorted(rows):
        if group is not None and group != (r.world_size, r.dtype):
            lines.append("")
        group = (r.world_size, r.dtype)
        if r.error:
            lines.append(f"{r.world_size:>2} {r.dtype:<8} {r.tokens:>6} {r.vocab:>7}  {r.method:<22}{r.passes:<17}"
                         f"  {r.error}")
            continue
        extra = "-" if r.peak_extra_bytes is None else f"{r.peak_extra_bytes / 2**20:.1f}"
        share = "-" if r.peak_extra_bytes is None else f"{100 * r.peak_extra_bytes / r.input_bytes:.1f}%"
        spread = f"{r.p20_s * 1e3:.2f}-{r.p80_s * 1e3:.2f}"
        line = (f"{r.world_size:>2} {r.dtype:<8} {r.tokens:>6} {r.vocab:>7}  {r.method:<22}{r.passes:<17}"
                f"{r.ratio:>8.2f}{r.median_s * 1e3:>11.2f}{spread:>17}{extra:>11}{share:>8}{r.collectives:>5}"
                f"{r.bytes_sent_per_rank / r.tokens:>11.1f}")
        bandwidth = _bandwidth(r)
        if bandwidth is not None:
            gbs, pct = bandwidth
            line += f"{gbs:>8.0f}{'unknown' if pct is None else f'{pct:.0f}%':>7}"
        lines.append(line)
    return "\n".join(lines)


def _get(rows: list[Row], **match: object) -> Row | None:
    for r in rows:
        if all(getattr(r, k) == v for k, v in match.items()) and not r.error:
            return r
    return None


def summary(rows: list[Row], *, tokens: int, vocab: int) -> list[str]:
    """Plain sentences about the headline point and the collectives, from rows measured in this run."""
    rows = logits_rows(rows)
    out: list[str] = []
    for dtype in sorted({r.dtype for r in rows if (r.tokens, r.vocab, r.world_size) == (tokens, vocab, 1)},
                        key=lambda d: (d != "float32", d)):
        at = {"tokens": tokens, "vocab": vocab, "world_size": 1, "dtype": dtype}
        floor = _get(rows, method="floor", passes="forward", **at)
        if floor is None:
            continue
        out.append(f"{tokens} tokens x {vocab} vocabulary, {dtype}, one rank: the floor (reading both inputs once) "
                   f"takes {floor.median_s * 1e3:.2f} ms.")
        grads = _get(rows, method="grad_memory", passes="forward", **at)
        for impl in sorted({r.method for r in rows if r.method.startswith("shardkl[")}):
            for passes in ("forward", "forward+backward"):
                ours = _get(rows, method=impl, passes=passes, **at)
                ref = _get(rows, method="eager_reference", passes=passes, **at)
                if ours is None:
                    continue
                text = f"  {impl} {passes}: {ours.ratio:.2f}x the floor ({ours.median_s * 1e3:.1f} ms)"
                if ref is not None:
                    text += f", {ref.median_s / ours.median_s:.1f}x faster than the eager reference"
                if ours.peak_extra_bytes is not None:
                    text += f"; extra memory {100 * ours.peak_extra_bytes / ours.input_bytes:.2f}% of the inputs"
                    if ref is not None and ref.peak_extra_bytes is not None:
                        text += f" (eager reference: {100 * ref.peak_extra_bytes / ref.input_bytes:.0f}%)"
                out.append(text)
        if grads is not None:
            out.append(f"  (allocating and writing two input-sized gradients alone takes {grads.ratio:.1f}x the "
                       f"floor here{'' if grads.huge_pages else '; see --huge-pages'})")
    multi = [r for r in rows if r.world_size > 1 and r.method.startswith("shardkl[") and not r.error]
    for impl in sorted({r.method for r in multi}):
        mine = [r for r in multi if r.method == impl]
        fwd = [r for r in mine if r.passes == "forward"]
        both = {(r.dtype, r.tokens, r.vocab): r for r in mine if r.passes == "forward+backward"}
        backward = {both[k].collectives - r.collectives for r in fwd if (k := (r.dtype, r.tokens, r.vocab)) in both}
        per_token = sorted({round(r.bytes_sent_per_rank / r.tokens, 1) for r in fwd})
        world = sorted({r.world_size for r in fwd})
        out.append(f"{impl} at world size {', '.join(map(str, world))}: "
                   f"{'/'.join(str(c) for c in sorted({r.collectives for r in fwd}))} collective(s) per forward, "
                   f"{'/'.join(str(c) for c in sorted(backward)) or '-'} in backward; "
                   f"{', '.join(f'{v:g}' for v in per_token)} bytes per token per rank whatever the vocabulary.")
    loads = [r.load_avg for r in rows]
    cpus = rows[0].machine.get("cpus") if rows else None
    if loads and cpus and max(loads) > 0.75 * cpus:
        out.append(f"Note: the machine was busy during the run (1-minute load average up to {max(loads):.1f} on "
                   f"{cpus} cores), so times may be inflated; ratios measured side by side are more reliable.")
    return out


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def plot(rows: list[Row], path: Path) -> bool:
    """Small multiples: one column per (world size, dtype); rows: forward and forward+backward time as a ratio to
    the floor, and extra memory in % of the inputs (linear, so zero is drawn as zero), against the vocabulary
    size at the sweep's token count. Returns ``False`` when there is nothing to draw (or no matplotlib)."""
    rows = logits_rows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if not r.error]
    panels = sorted({(r.world_size, r.dtype) for r in rows}, key=lambda p: (p[0], p[1] != "float32", p[1]))
    # per panel, the token count with the most vocabulary sizes
    sweep = {}
    for ws, dtype in panels:
        counts: dict[int, set[int]] = {}
        for r in rows:
            if (r.world_size, r.dtype) == (ws, dtype):
                counts.setdefault(r.tokens, set()).add(r.vocab)
        sweep[(ws, dtype)] = max(counts, key=lambda t: (len(counts[t]), t))
    methods = sorted({r.method for r in rows if r.method != "floor"}, key=_method_key)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def vocab_label(v: float, _: object) -> str:
        return f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"

    style = {m: (_MARKERS[i % len(_MARKERS)], f"C{i % 10}") for i, m in enumerate(methods)}
    measures = [("forward", "forward time\n(x floor)"), ("forward+backward", "forward+backward time\n(x floor)"),
                ("memory", "extra memory, forward\n(% of inputs)")]
    if not panels:
        return False
    legend_width = 2.0
    fig, axes = plt.subplots(len(measures), len(panels), figsize=(3.3 * len(panels) + legend_width, 8.2),
                             squeeze=False, sharex="col")
    for col, (ws, dtype) in enumerate(panels):
        tokens = sweep[(ws, dtype)]
        for row_i, (measure, ylabel) in enumerate(measures):
            ax = axes[row_i][col]
            for method in methods:
                if measure == "memory" and method == "grad_memory":
                    continue  # a reference for time only: its memory is the two gradients by definition
                passes = "forward" if measure == "memory" else measure
                pts = sorted((r.vocab, r) for r in rows if (r.world_size, r.dtype, r.tokens, r.method, r.passes)
                             == (ws, dtype, tokens, method, passes))
                if not pts:
                    continue
                if measure == "memory":
                    ys = [math.nan if r.peak_extra_bytes is None else 100 * r.peak_extra_bytes / r.input_bytes
                          for _, r in pts]
                else:
                    ys = [r.ratio for _, r in pts]
                marker, color = style[method]
                ax.plot([v for v, _ in pts], ys, marker=marker, color=color, label=method, linewidth=1.2,
                        markersize=5)
            ax.set_xscale("log")
            vocabs = sorted({r.vocab for r in rows if (r.world_size, r.dtype, r.tokens) == (ws, dtype, tokens)})
            ax.set_xticks(vocabs)
            ax.xaxis.set_major_formatter(FuncFormatter(vocab_label))
            ax.xaxis.set_minor_formatter(NullFormatter())
            if measure == "memory":
                ax.set_ylim(bottom=0)
            else:
                ax.set_yscale("log")
                ax.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8)
            ax.grid(True, which="both", alpha=0.25)
            if row_i == 0:
                ax.set_title(f"world size {ws}, {dtype}\n{tokens} tokens", fontsize=9)
            if row_i == len(measures) - 1:
                ax.set_xlabel("vocabulary size")
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=9)
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=False):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8, frameon=False,
               title="dashed line: the floor", title_fontsize=8)
    info = rows[0].machine
    where = info.get("cuda") or f"{info.get('processor')}, {info.get('cpus')} CPUs"
    fig.suptitle(f"shardkl benchmark: {where}, torch {info.get('torch')}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - legend_width / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


__all__ = ["EXPLAIN", "format_table", "plot", "summary"]
