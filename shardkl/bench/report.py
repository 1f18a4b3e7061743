"""The benchmark's table, summary and plot, from its rows (:class:`shardkl.bench.measure.Row`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shardkl.bench.measure import Row

EXPLAIN = (
    "x floor = median time / median time of `floor` (reading both inputs once, a.sum() + b.sum()) at the same "
    "point in the same run: 1.0 is the memory-bandwidth floor, lower is better; topk_kl reads only the student's "
    "logits, so its rows refer to `student_floor` (a.sum()) and their memory to the student's logits. extra = peak "
    "memory allocated during the call beyond the inputs (and, for forward+backward, beyond the gradients), in % of "
    "the inputs. shardkl[auto] is the default call (no options); naive_pytorch is log_softmax x2 + kl_div."
)

# reading order: the floors, the reference, the baselines, then each shardkl function by implementation
_METHOD_ORDER = ("floor", "student_floor", "grad_memory", "naive_pytorch", "allgather_baseline", "megatron_baseline")
_FAMILIES = ("shardkl", "jsd", "topk_kl")
_IMPL_ORDER = ("auto", "compiled", "triton", "eager")
# what is not a KL method: references for the time and memory of the others
REFERENCES = ("floor", "student_floor", "grad_memory")
NAIVE = "naive PyTorch"


def _method_key(name: str) -> tuple[int, int, int, str]:
    if name in _METHOD_ORDER:
        return (0, _METHOD_ORDER.index(name), 0, name)
    family, _, impl = name.partition("[")
    impl = impl.rstrip("]")
    return (1, _FAMILIES.index(family) if family in _FAMILIES else len(_FAMILIES),
            _IMPL_ORDER.index(impl) if impl in _IMPL_ORDER else len(_IMPL_ORDER), name)


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


def speed(ours_s: float, theirs_s: float, name: str) -> str:
    """``"N.Nx faster than NAME"``, or ``"N.Nx slower than NAME"`` when ``ours_s`` is the longer time (never a
    speed-up below 1)."""
    ratio = max(ours_s, theirs_s) / min(ours_s, theirs_s)
    # two digits where one would read "1.0x faster"
    text = f"{ratio:.1f}x" if ratio >= 1.1 else f"{ratio:.2f}x"
    return f"{text} {'faster' if ours_s <= theirs_s else 'slower'} than {name}"


def _share(row: Row) -> str:
    return f"{100 * row.peak_extra_bytes / row.input_bytes:.2f}%" if row.peak_extra_bytes is not None else "-"


def _naive(world: int) -> tuple[str, str]:
    """The method that is today's practice at this world size, and its name in sentences."""
    return ("naive_pytorch", NAIVE) if world == 1 else ("allgather_baseline", f"all-gather + {NAIVE}")


def summary(rows: list[Row], *, tokens: int, vocab: int) -> list[str]:
    """Plain sentences about the headline point, the default at every point, and the collectives, from rows
    measured in one run."""
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
        measured = sorted({r.method for r in rows if "[" in r.method and (r.tokens, r.vocab, r.world_size, r.dtype)
                           == (tokens, vocab, 1, dtype)}, key=_method_key)
        for method in measured:
            for passes in ("forward", "forward+backward"):
                ours = _get(rows, method=method, passes=passes, **at)
                if ours is None:
                    continue
                name = f"{method} (the default)" if method == "shardkl[auto]" else method
                floor_name = "the floor" if ours.floor == "floor" else "the student's floor"
                text = f"  {name} {passes}: {ours.ratio:.2f}x {floor_name} ({ours.median_s * 1e3:.1f} ms)"
                ref = _get(rows, method="naive_pytorch", passes=passes, **at) if method.startswith("shardkl[") else None
                if ref is not None:
                    text += ", " + speed(ours.median_s, ref.median_s, NAIVE)
                if ours.peak_extra_bytes is not None:
                    what = "the inputs" if ours.floor == "floor" else "the student's logits"
                    text += f"; extra memory {_share(ours)} of {what}"
                    if ref is not None and ref.peak_extra_bytes is not None:
                        text += f" ({NAIVE}: {100 * ref.peak_extra_bytes / ref.input_bytes:.0f}%)"
                out.append(text)
        if grads is not None:
            out.append(f"  (allocating and writing two input-sized gradients alone takes {grads.ratio:.1f}x the "
                       f"floor here{'' if grads.huge_pages else '; see --huge-pages'})")
    out += _default_everywhere(rows)
    multi = [r for r in rows if r.world_size > 1 and r.method.startswith("shardkl[") and not r.error]
    for impl in sorted({r.method for r in multi}, key=_method_key):
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


def _default_everywhere(rows: list[Row]) -> list[str]:
    """One line per point: the default (``shardkl[auto]``) against today's practice and ``impl="compiled"``."""
    out: list[str] = []
    points = sorted({(r.world_size, r.dtype, r.tokens, r.vocab) for r in rows if r.method == "shardkl[auto]"},
                    key=lambda p: (p[0], p[1] != "float32", p[1], p[2], p[3]))
    for world, dtype, tokens, vocab in points:
        at = {"world_size": world, "dtype": dtype, "tokens": tokens, "vocab": vocab}
        naive_method, naive_name = _naive(world)
        parts = []
        for passes in ("forward", "forward+backward"):
            ours = _get(rows, method="shardkl[auto]", passes=passes, **at)
            if ours is None:
                continue
            text = f"{passes} {ours.median_s * 1e3:.2f} ms"
            naive = _get(rows, method=naive_method, passes=passes, **at)
            if naive is not None:
                text += ", " + speed(ours.median_s, naive.median_s, naive_name)
            compiled = _get(rows, method="shardkl[compiled]", passes=passes, **at)
            if compiled is not None:
                text += f", {ours.median_s / compiled.median_s:.2f}x the time of shardkl[compiled]"
            parts.append(text)
        if parts:
            if not out:
                out.append("The default call (shardkl[auto], no options) at every point:")
            out.append(f"  world size {world}, {dtype}, {tokens} x {vocab}: " + "; ".join(parts))
    return out


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
# each method's markers sit this far apart (a fraction of a decade of the vocabulary axis), so equal values show
_DODGE = 0.025


def _style(methods: list[str]) -> dict[str, tuple[str, str]]:
    return {m: (_MARKERS[i % len(_MARKERS)], f"C{i % 10}") for i, m in enumerate(methods)}


def plot(rows: list[Row], path: Path, *, headline: tuple[int, int] | None = None) -> bool:
    """The benchmark's figure, drawn from ``rows`` (those of one run, in the folder of ``path``).

    Top (when ``headline`` = (tokens, vocab) was measured on one rank): every method at that point, forward and
    forward+backward time as a ratio to its floor (log scale) and extra memory in % of its inputs, each value
    written next to its marker. Below, small multiples: one column per (world size, dtype), against the vocabulary
    size at the sweep's token count; rows: the same three measures. ``grad_memory`` and the floors are references,
    not KL methods, and are not drawn. Returns ``False`` when there is nothing to draw (or no matplotlib).
    """
    rows = [r for r in logits_rows(rows) if not r.error]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return False
    drawn = [r for r in rows if r.method not in REFERENCES]
    if not drawn:
        return False
    methods = sorted({r.method for r in drawn}, key=_method_key)
    style = _style(methods)
    head = _headline_rows(drawn, headline)
    # the sweep: exact KL against the baselines (jsd and topk_kl are measured at the headline point only)
    swept = [r for r in drawn if not r.method.startswith(("jsd[", "topk_kl["))]
    panels = sorted({(r.world_size, r.dtype) for r in swept}, key=lambda p: (p[0], p[1] != "float32", p[1]))
    # per panel, the token count with the most vocabulary sizes
    sweep: dict[tuple[int, str], int] = {}
    for ws, dtype in panels:
        counts: dict[int, set[int]] = {}
        for r in swept:
            if (r.world_size, r.dtype) == (ws, dtype):
                counts.setdefault(r.tokens, set()).add(r.vocab)
        sweep[(ws, dtype)] = max(counts, key=lambda t: (len(counts[t]), t))
    measures = [("forward", "forward time, x floor"), ("forward+backward", "forward+backward time,\nx floor"),
                ("memory", "extra memory, forward,\n% of inputs")]
    legend_width, top_margin, gap, sweep_height = 2.4, 1.0, 1.1, 7.6
    ncols = max(3, len(panels))
    head_height = 0.0 if head is None else 0.4 + 0.3 * len({r.method for r in head})
    height = top_margin + head_height + (gap if head else 0.0) + sweep_height + 0.6
    fig = plt.figure(figsize=(3.4 * ncols + legend_width, height))
    # room on the left for the headline's method names
    left = 1.45 / fig.get_figwidth()
    fig.subplots_adjust(left=left, right=1 - legend_width / fig.get_figwidth(), top=1 - top_margin / height,
                        bottom=0.6 / height)
    outer = fig.add_gridspec(2 if head else 1, 1, height_ratios=[head_height, sweep_height] if head else [1],
                             hspace=gap / ((head_height + sweep_height) / 2))
    if head:
        fig.text(left, 1 - 0.55 / height, f"Headline: {headline[0]} tokens x {headline[1]:,} vocabulary, "  # type: ignore[index]
                 f"{head[0].dtype}, one rank, every method (lower is better)", fontsize=9.5, fontweight="bold")
        _plot_headline(fig, outer[0].subgridspec(1, 3, wspace=0.06), head, style)
        fig.text(left, (0.6 + sweep_height + 0.42) / height, "Vocabulary sweep, exact KL (lower is better)",
                 fontsize=9.5, fontweight="bold")
    grid = outer[-1].subgridspec(len(measures), ncols, hspace=0.12, wspace=0.3)

    def vocab_label(v: float, _: object) -> str:
        return f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"

    for col, (ws, dtype) in enumerate(panels):
        tokens = sweep[(ws, dtype)]
        here = [r for r in swept if (r.world_size, r.dtype, r.tokens) == (ws, dtype, tokens)]
        vocabs = sorted({r.vocab for r in here})
        present = [m for m in methods if any(r.method == m for r in here)]
        first = None
        for row_i, (measure, ylabel) in enumerate(measures):
            ax = fig.add_subplot(grid[row_i, col], sharex=first)
            first = first or ax
            top = 0.0
            for i, method in enumerate(present):
                passes = "forward" if measure == "memory" else measure
                pts = sorted((r.vocab, r) for r in here if (r.method, r.passes) == (method, passes))
                if not pts:
                    continue
                if measure == "memory":
                    ys = [math.nan if r.peak_extra_bytes is None else 100 * r.peak_extra_bytes / r.input_bytes
                          for _, r in pts]
                else:
                    ys = [r.ratio for _, r in pts]
                top = max([top, *[y for y in ys if not math.isnan(y)]])
                shift = 10 ** (_DODGE * (i - (len(present) - 1) / 2))
                marker, color = style[method]
                ax.plot([v * shift for v, _ in pts], ys, marker=marker, color=color, label=method, linewidth=1.1,
                        markersize=5, markerfacecolor="white" if method.endswith("[compiled]") else color,
                        clip_on=False, zorder=3)
            ax.set_xscale("log")
            ax.set_xticks(vocabs)
            ax.xaxis.set_major_formatter(FuncFormatter(vocab_label))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(min(vocabs) / 1.35, max(vocabs) * 1.35)
            if measure == "memory":
                # below zero, so that a method with no extra memory shows its markers on the axis
                ax.set_ylim(-0.06 * max(top, 1.0), 1.08 * max(top, 1.0))
                ax.axhline(0.0, color="0.4", linewidth=0.8)
            else:
                ax.set_yscale("log")
                ax.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8)
            ax.grid(True, which="both", alpha=0.25)
            if row_i == 0:
                ax.set_title(f"world size {ws}, {dtype}, {tokens} tokens", fontsize=9)
            if row_i == len(measures) - 1:
                ax.set_xlabel("vocabulary size")
            else:
                ax.tick_params(labelbottom=False)
            if col == 0:
                ax.set_ylabel(ylabel + "\n(lower is better)", fontsize=8.5)
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=False):
            handles.setdefault(label, h)
    ordered = sorted(handles, key=_method_key)
    fig.legend([handles[m] for m in ordered], ordered, loc="center right", fontsize=8, frameon=False,
               title="lower is better everywhere;\ndashed line: the floor (x 1)\nshardkl[auto]: the default call",
               title_fontsize=8)
    info = rows[0].machine
    where = info.get("cuda") or f"{info.get('processor')}, {info.get('cpus')} CPUs"
    run = f" (run {rows[0].run})" if rows[0].run else ""
    fig.suptitle(f"shardkl benchmark{run}: {where}, torch {info.get('torch')}\ntime as a multiple of reading the "
                 "inputs once (the floor), memory beyond the inputs: lower is better", fontsize=10,
                 y=1 - 0.08 / height, va="top")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _headline_rows(rows: list[Row], headline: tuple[int, int] | None) -> list[Row] | None:
    """The one-rank rows at the headline point, float32 where it was measured (else its first dtype)."""
    if headline is None:
        return None
    at = [r for r in rows if (r.tokens, r.vocab, r.world_size) == (*headline, 1)]
    if not at:
        return None
    dtype = "float32" if any(r.dtype == "float32" for r in at) else sorted({r.dtype for r in at})[0]
    return [r for r in at if r.dtype == dtype]


def _pct(share: float) -> str:
    return "0%" if share == 0 else "<0.01%" if share < 0.01 else f"{share:.2g}%" if share < 10 else f"{share:.0f}%"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


def _times(ratio: float) -> str:
    return f"{ratio:.3g}x" if ratio < 100 else f"{ratio:.0f}x"


def _plot_headline(fig: Any, grid: Any, rows: list[Row], style: dict[str, tuple[str, str]]) -> None:
    """Every method at the headline point: one line per method, its value next to its marker."""
    methods = sorted({r.method for r in rows}, key=_method_key)
    ys = {m: len(methods) - 1 - i for i, m in enumerate(methods)}
    labels = [f"{m} *" if any(r.method == m and r.floor != "floor" for r in rows) else m for m in methods]
    titles = (("forward", "forward time, x floor"), ("forward+backward", "forward+backward time, x floor"),
              ("memory", "extra memory, forward, % of inputs"))
    axes: list[Any] = []
    for col, (measure, title) in enumerate(titles):
        ax = fig.add_subplot(grid[0, col], sharey=axes[0] if axes else None)
        axes.append(ax)
        values: dict[str, tuple[float, str]] = {}
        for r in rows:
            if measure == "memory" and r.passes == "forward" and r.peak_extra_bytes is not None:
                share = 100 * r.peak_extra_bytes / r.input_bytes
                values[r.method] = (share, _pct(share))
            elif measure != "memory" and r.passes == measure:
                values[r.method] = (r.ratio, f"{_times(r.ratio)}  ({_ms(r.median_s)})")
        base = 0.0 if measure == "memory" else 1.0
        for method, (value, text) in values.items():
            marker, color = style[method]
            y = ys[method]
            ax.plot([base, value], [y, y], color=color, linewidth=2.0, alpha=0.45, solid_capstyle="butt")
            ax.plot([value], [y], marker=marker, color=color, markersize=7, clip_on=False, zorder=3,
                    markerfacecolor="white" if method.endswith("[compiled]") else color)
            ax.annotate(text, (value, y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=7.5)
        if measure == "memory":
            top = max([v for v, _ in values.values()] or [1.0])
            ax.set_xlim(-0.04 * top, 1.45 * top)
            ax.axvline(0.0, color="0.4", linewidth=0.8)
        else:
            ax.set_xscale("log")
            lo = min([v for v, _ in values.values()] + [1.0])
            hi = max([v for v, _ in values.values()] + [1.0])
            ax.set_xlim(lo / 1.6, hi * 10 ** (0.45 * math.log10(hi / lo) + 0.6))
            ax.axvline(1.0, color="0.4", linestyle="--", linewidth=0.8)
        ax.set_yticks(range(len(methods)), labels[::-1], fontsize=8)
        ax.tick_params(axis="y", labelleft=col == 0)
        ax.set_ylim(-0.7, len(methods) - 0.3)
        ax.grid(True, axis="x", which="both", alpha=0.25)
        ax.set_title(title, fontsize=9)
    if any(r.floor != "floor" for r in rows):
        axes[-1].text(1.0, -0.2, "* reads the student's logits only: its floor and memory refer to them",
                      transform=axes[-1].transAxes, fontsize=7.5, ha="right", va="top")


__all__ = ["EXPLAIN", "REFERENCES", "format_table", "plot", "speed", "summary"]
