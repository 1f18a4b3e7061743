"""Benchmark rows of exact KL from hidden states (:class:`shardkl.LinearLogits`) against the unfused path.

At one point ``tokens x hidden x vocab`` (each rank holds ``vocab / ws`` rows of both output layers), three methods:

- ``linear:matmuls``: the two logits matmuls alone, ``h_p @ W_p.T`` and ``h_q @ W_q.T``: what every ratio refers to;
- ``linear:unfused``: the two matmuls, then ``shardkl.exact_kl`` on the logits (two ``[tokens, V_local]`` tensors);
- ``linear:fused``: ``shardkl.exact_kl(LinearLogits(h_p, W_p), LinearLogits(h_q, W_q))``, tile by tile.

and three passes: ``forward``, ``forward+backward`` (both sides require grad) and ``fwd+bwd frozen q`` (only the
policy side does). The fused backward recomputes each logit tile, so its floor is the unfused matmul work times
8/6 (both sides: 8 matmuls against 6) or 6/4 (a frozen side: 6 against 4); the summary states each fused time
against that bound. Memory is the peak extra of the call in % of **one side's logits** (``tokens x V_local x 4``
bytes); for the backward passes, beyond the gradients themselves.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import shardkl
import shardkl.testing
from shardkl.bench.measure import DTYPES, Row, _agree_max, _barrier, _percentile, _sync, peak_extra_bytes
from shardkl.distributed import rank_and_size
from shardkl.layout import VocabLayout

PASSES = ("forward", "forward+backward", "fwd+bwd frozen q")
# the fused backward's matmul work over the unfused one's (recomputing each tile), per pass
RECOMPUTE_BOUND = {"forward": 1.0, "forward+backward": 8 / 6, "fwd+bwd frozen q": 6 / 4}


@dataclass(frozen=True)
class FusedPoint:
    """One shape: tokens, hidden size (both models) and global vocabulary."""

    tokens: int
    hidden: int
    vocab: int
    dtype: str


def _inputs(point: FusedPoint, layout: VocabLayout, device: torch.device) -> dict[str, torch.Tensor]:
    dtype = DTYPES[point.dtype]
    g = torch.Generator().manual_seed(7)
    # every rank draws the same global weights and keeps its rows: the same model on any number of ranks
    w_p = torch.randn(point.vocab, point.hidden, generator=g) * point.hidden**-0.5
    w_q = w_p + 0.1 * point.hidden**-0.5 * torch.randn(point.vocab, point.hidden, generator=g)
    rows = slice(layout.start, layout.stop)
    return {
        "h_p": torch.randn(point.tokens, point.hidden, generator=g).to(device, dtype),
        "h_q": torch.randn(point.tokens, point.hidden, generator=g).to(device, dtype),
        "w_p": w_p[rows].to(device, dtype),
        "w_q": w_q[rows].to(device, dtype),
    }


def _calls(inputs: dict[str, torch.Tensor], layout: VocabLayout) -> dict[tuple[str, str], Callable[[], Any]]:
    h_p, h_q, w_p, w_q = inputs["h_p"], inputs["h_q"], inputs["w_p"], inputs["w_q"]

    def kl(fused: bool, p: tuple[torch.Tensor, torch.Tensor], q: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if fused:
            # the trainer's usual contract: each rank's partial hidden-state gradient, summed by its TP layer
            p_src = shardkl.LinearLogits(*p, hidden_grad="partial")
            return shardkl.exact_kl(p_src, shardkl.LinearLogits(*q, hidden_grad="partial"), layout=layout)
        return shardkl.exact_kl(p[0] @ p[1].T, q[0] @ q[1].T, layout=layout)

    def forward(fused: bool | None) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                if fused is None:
                    return h_p @ w_p.T, h_q @ w_q.T
                return kl(fused, (h_p, w_p), (h_q, w_q))

        return call

    def both(fused: bool, frozen_q: bool) -> Callable[[], Any]:
        def call() -> None:
            p = (h_p.detach().requires_grad_(), w_p.detach().requires_grad_())
            q = (h_q.detach().requires_grad_(not frozen_q), w_q.detach().requires_grad_(not frozen_q))
            kl(fused, p, q).sum().backward()

        return call

    calls: dict[tuple[str, str], Callable[[], Any]] = {}
    for fused, name in ((False, "linear:unfused"), (True, "linear:fused")):
        calls[(name, "forward")] = forward(fused)
        if not fused:
            # between the two forwards in each round, not first: a round's first call also pays for the memory the
            # previous round's backward freed
            calls[("linear:matmuls", "forward")] = forward(None)
        calls[(name, "forward+backward")] = both(fused, frozen_q=False)
        calls[(name, "fwd+bwd frozen q")] = both(fused, frozen_q=True)
    return calls


def measure_fused_point(point: FusedPoint, reps: int, group: Any, device: torch.device, info: dict[str, Any],
                        huge_pages: bool, run: str = "") -> list[Row]:
    """Every method and pass of ``point`` on this rank (all ranks call it together), as benchmark rows."""
    _, world = rank_and_size(group)
    layout = VocabLayout.split(point.vocab, group, "balanced")
    inputs = _inputs(point, layout, device)
    calls = _calls(inputs, layout)
    logits_bytes = point.tokens * layout.local_size * 4
    counted: dict[tuple[str, str], tuple[int, int]] = {}
    for key, fn in calls.items():
        _barrier(group)
        with shardkl.testing.count_collectives() as counter:
            fn()  # warm-up (and first-use builds)
        _sync(device)
        counted[key] = (counter.total, counter.bytes_sent)
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(reps):
        # interleaved rounds, as for the logits methods
        for key, fn in calls.items():
            _barrier(group)
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[key].append(_agree_max(time.perf_counter() - start, group))
    floor_s = statistics.median(samples[("linear:matmuls", "forward")])
    rows = []
    load = os.getloadavg()[0]
    for (name, passes), fn in calls.items():
        _barrier(group)
        peak = peak_extra_bytes(fn, device)
        if passes != "forward":
            # the gradients themselves (hidden states and weights of each side that requires grad) are outputs
            sides = ("p",) if passes == "fwd+bwd frozen q" else ("p", "q")
            grads = sum(inputs[f"{k}_{s}"].numel() * inputs[f"{k}_{s}"].element_size() for s in sides for k in "hw")
            peak = max(0, peak - grads)
        times = samples[(name, passes)]
        collectives, sent = counted[(name, passes)]
        rows.append(Row(
            method=name, passes=passes, world_size=world, dtype=point.dtype, tokens=point.tokens, vocab=point.vocab,
            device=device.type, median_s=statistics.median(times), p20_s=_percentile(times, 0.2),
            p80_s=_percentile(times, 0.8), min_s=min(times), max_s=max(times), reps=len(times), inner=1,
            floor_s=floor_s, peak_extra_bytes=peak, input_bytes=logits_bytes, collectives=collectives,
            bytes_sent_per_rank=sent, load_avg=load, huge_pages=huge_pages, hidden=point.hidden, floor="linear:matmuls",
            run=run, machine=info,
        ))
    return rows


def format_fused(rows: list[Row]) -> str:
    """The fused-linear rows: each method against the unfused path, and the fused path against its bound."""
    order = ("linear:matmuls", "linear:unfused", "linear:fused")
    fused_rows = sorted(
        (r for r in rows if r.method in order),
        key=lambda r: (r.world_size, r.dtype, r.tokens, r.hidden, r.vocab, order.index(r.method),
                       PASSES.index(r.passes)),
    )
    if not fused_rows:
        return ""
    head = (f"{'ws':>2} {'dtype':<8} {'tokens':>6} {'H':>5} {'vocab':>7}  {'method':<16}{'pass':<18}{'median ms':>10}"
            f"{'x unfused':>10}{'x bound':>9}{'extra MiB':>11}{'% logits':>10}{'coll':>5}")
    lines = [head, "-" * len(head)]
    for r in fused_rows:
        unfused = next((u for u in fused_rows if u.method == "linear:unfused" and u.passes == r.passes
                        and (u.world_size, u.dtype, u.tokens, u.vocab) == (r.world_size, r.dtype, r.tokens, r.vocab)),
                       None)
        versus = "-" if unfused is None or r.method == "linear:matmuls" else f"{r.median_s / unfused.median_s:.2f}"
        bound = "-"
        if r.method == "linear:fused" and unfused is not None:
            bound = f"{r.median_s / (RECOMPUTE_BOUND[r.passes] * unfused.median_s):.2f}"
        extra = "-" if r.peak_extra_bytes is None else f"{r.peak_extra_bytes / 2**20:.1f}"
        share = "-" if r.peak_extra_bytes is None else f"{100 * r.peak_extra_bytes / r.input_bytes:.1f}%"
        lines.append(f"{r.world_size:>2} {r.dtype:<8} {r.tokens:>6} {r.hidden:>5} {r.vocab:>7}  {r.method:<16}"
                     f"{r.passes:<18}{r.median_s * 1e3:>10.1f}{versus:>10}{bound:>9}{extra:>11}{share:>10}"
                     f"{r.collectives:>5}")
    lines += [
        "",
        "x unfused = median time / the unfused path's (the two matmuls, then exact_kl on the logits) for the same "
        "pass. x bound (fused only) = median time / (unfused time x the recomputation bound: 1 forward, 8/6 "
        "forward+backward, 6/4 with a frozen q side), since the fused backward recomputes each logit tile. % logits "
        "= peak extra memory of the call (beyond the gradients for the backward passes) in % of one side's fp32 "
        "logits, tokens x V_local x 4 bytes.",
    ]
    return "\n".join(lines)


def fused_point(text: str, dtype: str) -> FusedPoint:
    """``TOKENSxHIDDENxVOCAB`` as a :class:`FusedPoint`."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"expected TOKENSxHIDDENxVOCAB, got {text!r}")
    tokens, hidden, vocab = map(int, parts)
    return FusedPoint(tokens, hidden, vocab, dtype)


__all__ = ["FusedPoint", "PASSES", "RECOMPUTE_BOUND", "format_fused", "fused_point", "measure_fused_point"]
