"""The command line of ``python -m shardkl.bench``: presets, the sweep, and what it prints and writes."""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
import time
from pathlib import Path

from shardkl.bench import fused, measure, report

DESCRIPTION = """\
Time shardkl against the read-once floor and the usual baselines, side by side in one run.

The default run (CPU) takes about two minutes on a 2-core machine (more with other jobs on its cores) and peaks
at about 3 GB of memory: the headline point (2048 tokens x 32,000 vocabulary, float32, one rank, every method,
forward and forward+backward, with shardkl.jsd and shardkl.topk_kl next to exact_kl: see --divergences), a
vocabulary sweep at 256 tokens (float32 and bfloat16), and the same sweep on two gloo ranks. shardkl[auto] is the
default call (no options), measured next to naive PyTorch (log_softmax x2 + kl_div) and the other implementations.
Each world size runs in fresh processes.

Each run writes into a new folder OUT/RUN-ID/ and never touches an earlier run's: rows are appended to its
results.jsonl as each point finishes (a progress bar on stderr); the table and a summary (also in table.txt) and
plot.png, drawn from the rows beside it, follow at the end. --from RUN-FOLDER prints and redraws a finished run.

Every time is also given as a ratio to the floor (x floor): the time to read both inputs once (a.sum() + b.sum())
at the same point in the same run. --device cuda adds the achieved memory bandwidth and its share of the GPU's
peak (see --preset gpu).

--preset fused (about five minutes) measures exact KL straight from hidden states (shardkl.LinearLogits) against
the same two matmuls followed by exact_kl, on one and two ranks, at 2048 tokens x 512 hidden x 32,000 vocabulary:
time, the fused time against its recomputation bound, and peak memory in % of one side's logits.
"""

PRESETS: dict[str, dict[str, object]] = {
    "default": {"target": "2048x32000", "target_dtypes": "float32", "sweep_tokens": 256,
                "vocabs": "4000,32000,128000", "dtypes": "float32,bfloat16", "world_sizes": "1,2",
                "impls": "auto,compiled,eager", "reps": 5, "fused": "none", "logits": True},
    "quick": {"target": "64x3000", "target_dtypes": "float32", "sweep_tokens": 64, "vocabs": "500,3000",
              "dtypes": "float32", "world_sizes": "1,2", "impls": "auto,eager", "reps": 3,
              "fused": "64x32x3000", "logits": True},
    # exact KL from hidden states (LinearLogits) against two matmuls + exact_kl, one and two ranks (~3 min)
    "fused": {"target": "2048x32000", "target_dtypes": "float32", "sweep_tokens": 256, "vocabs": "32000",
              "dtypes": "float32", "world_sizes": "1,2", "impls": "compiled", "reps": 5, "fused": "2048x512x32000",
              "logits": False},
    # one GPU: a TP=8 shard of a 152k vocabulary at 32k tokens (the design's roofline point), and a sweep
    "gpu": {"target": "32768x19008", "target_dtypes": "bfloat16,float32", "sweep_tokens": 8192,
            "vocabs": "19008,64000,151936", "dtypes": "bfloat16,float32", "world_sizes": "1",
            "impls": "auto,triton,compiled", "reps": 10, "fused": "8192x4096x19008", "logits": True},
}
IMPLS = ("auto", "compiled", "triton", "eager")
# what the benchmark needs beyond the library: the progress bar of the measuring processes and the plot
EXTRA = ("tqdm", "matplotlib")
HINT = "the benchmark needs the bench extra (matplotlib, tqdm): pip install -e '.[bench]'"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _point(text: str) -> tuple[int, int]:
    tokens, _, vocab = text.partition("x")
    return int(tokens), int(vocab)


def parser() -> argparse.ArgumentParser:
    """The argument parser (``--help`` lists every option with its default)."""
    p = argparse.ArgumentParser(prog="python -m shardkl.bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a sweep: default (CPU), quick (seconds, a smoke test), gpu (the default with --device cuda)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--target", help="headline point TOKENSxVOCAB, every method (preset: 2048x32000)")
    p.add_argument("--target-dtypes", help="dtypes of the headline point, comma-separated (preset: float32)")
    p.add_argument("--sweep-tokens", type=int, help="tokens of the vocabulary sweep (preset: 256)")
    p.add_argument("--vocabs", help="vocabulary sizes of the sweep, comma-separated (preset: 4000,32000,128000)")
    p.add_argument("--dtypes", help=f"dtypes of the sweep, comma-separated, of {', '.join(measure.DTYPES)} "
                                    "(preset: float32,bfloat16)")
    p.add_argument("--world-sizes", help="comma-separated gloo world sizes; the headline point runs on 1 only")
    p.add_argument("--impls", help=f"shardkl implementations, of {', '.join(IMPLS)}; auto is the default call, with no "
                                   "options (preset: auto,compiled,eager)")
    p.add_argument("--divergences", default="auto",
                   help="impls of the shardkl.jsd and shardkl.topk_kl rows at the headline point, comma-separated, or "
                        "none; each is called with the same options as the exact_kl row of that impl (default: "
                        "%(default)s, the default call)")
    p.add_argument("--reps", type=int, help="timed rounds per point (preset: 5; at least 3)")
    p.add_argument("--forward-only", action="store_true", help="skip forward+backward")
    p.add_argument("--fused", help="exact KL from hidden states (LinearLogits) against two matmuls + exact_kl, at "
                                   "TOKENSxHIDDENxVOCAB on every world size, float32 on CPU, bfloat16 on CUDA "
                                   "(preset default: none; fused: 2048x512x32000; gpu: 8192x4096x19008)")
    p.add_argument("--logits", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the logits methods (preset fused: no)")
    p.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: let PyTorch back large tensors with transparent huge pages (THP_MEM_ALLOC_ENABLE=1) in "
                        "the measuring processes; without them, fresh gradients cost page faults that dominate "
                        "forward+backward on a VM (default: on)")
    p.add_argument("--out", default="results/bench",
                   help="each run writes OUT/RUN-ID/ (results.jsonl, table.txt, plot.png), a new folder that no later "
                        "run touches (default: %(default)s)")
    p.add_argument("--from", dest="from_run", metavar="RUN-FOLDER",
                   help="measure nothing: print the table and summary of a finished run and redraw its plot.png from "
                        "its results.jsonl")
    return p


def _config_points(args: argparse.Namespace, world: int) -> tuple[measure.Point, ...]:
    if not args.logits:
        return ()
    target = _point(args.target)
    points = []
    if world == 1:
        points += [measure.Point(*target, dtype, full=not args.forward_only, divergences=True)
                   for dtype in args.target_dtypes]
    points += [measure.Point(args.sweep_tokens, vocab, dtype, full=not args.forward_only)
               for dtype in args.dtypes for vocab in args.vocabs
               if world > 1 or (args.sweep_tokens, vocab) != target or dtype not in args.target_dtypes]
    return tuple(points)


def missing_extra() -> list[str]:
    """The modules of the bench extra that cannot be imported here."""
    missing = []
    for module in EXTRA:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install, or a module entry set to None
            found = False
        if not found:
            missing.append(module)
    return missing


def new_run_folder(root: Path) -> Path:
    """A fresh folder ``root/YYYYmmdd-HHMMSS[-N]`` for one run (created here; never an existing one)."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        folder = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"no free run folder {root / stamp}-N after 1000 tries")


def report_run(folder: Path, *, headline: tuple[int, int]) -> str:
    """The table, the summary and the plot of the run in ``folder``, all from its ``results.jsonl``: writes
    ``table.txt`` and ``plot.png`` beside it and returns the text."""
    results = folder / "results.jsonl"
    rows = measure.read_rows(results)
    parts = []
    if report.logits_rows(rows):
        parts += [report.format_table(rows), report.EXPLAIN]
    table = fused.format_fused(rows)
    if table:
        parts.append(table)
    parts.append("\n".join(report.summary(rows, tokens=headline[0], vocab=headline[1])))
    text = "\n\n".join(parts)
    (folder / "table.txt").write_text(text + "\n")
    plotted = report.plot(rows, folder / "plot.png", headline=headline)
    info = rows[0].machine if rows else {}
    where = info.get("cuda") or f"{info.get('processor')}, {info.get('cpus')} CPUs"
    written = " and ".join(str(folder / name) for name in ("table.txt", "plot.png")[: 2 if plotted else 1])
    return f"{text}\n\nwrote {written} from {results}\nmeasured on {where}, torch {info.get('torch')}"


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    missing = missing_extra()
    if missing:
        # before any measuring process exists: one line, as the launchers do, not a traceback from each rank
        print(f"{p.prog}: error: {HINT} (missing: {', '.join(missing)})", file=sys.stderr)
        return 1
    preset = PRESETS[args.preset or ("gpu" if args.device == "cuda" else "default")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        headline = _point(args.target)
        args.vocabs, args.world_sizes = _ints(args.vocabs), _ints(args.world_sizes)
    except ValueError as exc:
        p.error(f"bad --target, --vocabs or --world-sizes: {exc}")
    if args.from_run is not None:
        folder = Path(args.from_run)
        if not (folder / "results.jsonl").is_file():
            p.error(f"--from: no results.jsonl in {folder}")
        print(report_run(folder, headline=headline))
        return 0
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.target_dtypes = [d for d in args.target_dtypes.split(",") if d]
    args.impls = [i for i in args.impls.split(",") if i]
    args.divergences = [] if args.divergences == "none" else [i for i in args.divergences.split(",") if i]
    for dtype in args.dtypes + args.target_dtypes:
        if dtype not in measure.DTYPES:
            p.error(f"unknown dtype {dtype!r}; choose from {', '.join(measure.DTYPES)}")
    for impl in args.impls + args.divergences:
        if impl not in IMPLS:
            p.error(f"unknown impl {impl!r}; choose from {', '.join(IMPLS)}")
    if args.reps < 3:
        p.error("--reps must be at least 3 (a median and a spread need them)")
    fused_points: tuple[fused.FusedPoint, ...] = ()
    if args.fused and args.fused != "none":
        try:
            fused_points = (fused.fused_point(args.fused, "bfloat16" if args.device == "cuda" else "float32"),)
        except ValueError as exc:
            p.error(f"bad --fused: {exc}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device here")
        if args.world_sizes != [1]:
            p.error("--device cuda measures one GPU: use --world-sizes 1")
    folder = new_run_folder(Path(args.out))
    results = folder / "results.jsonl"
    results.touch()
    huge_pages = args.huge_pages and args.device == "cpu"
    if huge_pages:
        # read by PyTorch's CPU allocator in the measuring processes (spawned below, so they inherit it)
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    print(f"shardkl benchmark on {args.device}: results stream to {results}", flush=True)
    for world in args.world_sizes:
        config = measure.Config(
            points=_config_points(args, world), impls=tuple(args.impls), reps=args.reps, device=args.device,
            out_file=str(results), huge_pages=huge_pages, fused_points=fused_points, run=folder.name,
            divergence_impls=tuple(args.divergences),
        )
        measure.run_world(world, config)
    print()
    print(report_run(folder, headline=headline), end="")
    # the largest resident set of one measuring process (Linux reports KiB)
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(f"{', huge pages' if huge_pages else ''}; peak memory of a measuring process {peak_rss / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
