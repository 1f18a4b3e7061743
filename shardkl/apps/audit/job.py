"""The audit on one rank: :func:`run_rank`, the per-worker function of every launcher (python, torchrun, Ray Train).

World = data-parallel groups x ``tp`` ranks; global rank ``r`` is rank ``r % tp`` of tensor-parallel group
``r // tp``. The vocabulary is split over a tensor-parallel group (each rank holds its rows of both output layers;
the trunks are replicated, or split by transformers, see :mod:`shardkl.apps.audit.models`); the corpus's shards
are split over the groups. The shards left to do are dealt round-robin to the groups, so a resumed job stays balanced.

The groups never talk to each other: each computes its shards, and its tensor-parallel rank 0 writes each shard's
parquet file. The world meets twice, in a barrier after every rank has listed the shards on disk (so all agree on
what is left) and in a barrier after the last shard (so rank 0 reads complete results). Rank 0 then computes the
summary from every shard file (:func:`finish_audit`): the same numbers whether the job ran once or was stopped and
resumed, on one process or on many.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import shardkl
from shardkl.apps.audit import store
from shardkl.apps.audit.compute import ScoredBatch, score_batch
from shardkl.apps.audit.models import ModelSide, load_mode, load_side, quiet_transformers, tp_layout
from shardkl.apps.audit.plan import AuditPlan
from shardkl.apps.audit.progress import AuditProgress
from shardkl.apps.audit.stats import format_report, summarise
from shardkl.distributed import ProcessGroup, rank_and_size
from shardkl.layout import VocabLayout

ShardHook = Callable[[int, int], None]
"""``on_shard(rank, shard)``: called on every rank after each shard it computed is written (tests stop a worker)."""

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.txt"


@dataclass(frozen=True)
class AuditResult:
    """What rank 0 returns: the summary (``summary.json``) and the report (``report.txt``)."""

    summary: dict[str, Any]
    report: str


def _barrier(group: ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.barrier(group)


def make_tp_group(group: ProcessGroup | None, tp: int) -> tuple[ProcessGroup | None, int]:
    """This rank's tensor-parallel group and the index of its data-parallel group.

    Every rank creates every tensor-parallel group, in the same order (``new_group`` is a collective of the whole
    world). Data-parallel groups need no process group of their own: they share only the disk.

    Args:
        group: the world's process group (``None``: one process).
        tp: ranks per tensor-parallel group (divides the world size).

    Returns:
        ``(tensor-parallel group or None for tp == 1, index of this rank's data-parallel group)``.
    """
    rank, world = rank_and_size(group)
    if tp == 1:
        return None, rank
    if tp == world:
        return group, 0
    mine = None
    for index in range(world // tp):
        # A collective of the world: every rank creates every tensor-parallel group, in the same order.
        created = dist.new_group(list(range(index * tp, (index + 1) * tp)))
        if index == rank // tp:
            mine = created
    return mine, rank // tp


def _load_pair(plan: AuditPlan, tp_group: ProcessGroup | None, groups: int, device: torch.device) -> tuple[
    ModelSide, ModelSide, VocabLayout, str
]:
    config = plan.config
    mode = load_mode(plan.p_info, plan.q_info, trunk=config.trunk, tp=config.tp, groups=groups)
    layout: VocabLayout | None = None
    if mode == "replicated":
        # this rank's rows: a balanced split of the real ids (padding rows are never read)
        layout = VocabLayout.split(plan.vocab_size, tp_group, "balanced")
    sides = []
    for name, info, dtype in (("p_model", plan.p_info, config.p_dtype), ("q_model", plan.q_info, config.q_dtype)):
        sides.append(load_side(name, info, dtype=dtype, mode=mode, layout=layout, device=device,
                               trust_remote_code=config.trust_remote_code))
    if layout is None:
        layout = tp_layout(sides[0], plan.vocab_size)
    return sides[0], sides[1], layout, mode


def _shard_columns(plan: AuditPlan, parts: list[tuple[np.ndarray, ScoredBatch]]) -> dict[str, np.ndarray]:
    """One shard's rows, sorted by ``(doc, pos)``."""
    columns: dict[str, list[np.ndarray]] = {}
    for index, scored in parts:
        window = index[scored.row.numpy()]
        values = {
            "doc": plan.windows.doc[window],
            "pos": plan.windows.start[window] + scored.offset.numpy(),
        }
        for name in store.COLUMNS[2:]:
            values[name] = getattr(scored, name).numpy()
        for name in store.ESTIMATOR_COLUMNS:
            tensor = getattr(scored, name)
            if tensor is not None:
                values[name] = tensor.numpy()
        for name, value in values.items():
            columns.setdefault(name, []).append(value)
    flat = {name: np.concatenate(value) for name, value in columns.items()}
    order = np.lexsort((flat["pos"], flat["doc"]))
    return {name: value[order] for name, value in flat.items()}


def run_rank(
    plan: AuditPlan,
    *,
    group: ProcessGroup | None = None,
    device: torch.device | None = None,
    write_identity: bool = True,
    launcher: str = "python",
    threads: int | None = None,
    on_shard: ShardHook | None = None,
    say: Callable[[str], None] | None = None,
) -> AuditResult | None:
    """Run the audit on this rank; rank 0 returns the result, the others ``None``.

    Args:
        plan: from :func:`shardkl.apps.audit.plan.plan_audit` (the same on every rank).
        group: the world's process group (``None``: one process).
        device: where the models run (default CPU).
        write_identity: rank 0 writes ``OUT/audit.json`` first (the Ray driver has written it already).
        launcher: ``"python"``, ``"torchrun"`` or ``"ray"``, for the summary.
        threads: torch's threads per rank, for the summary.
        on_shard: see :data:`ShardHook`.
        say: where rank 0's progress lines go (e.g. a :class:`shardkl.apps.progress.StageLog`'s ``say``).

    Returns:
        :class:`AuditResult` on rank 0, ``None`` elsewhere.

    Raises:
        AuditInputError: a model's weights do not load (on every rank alike).
    """
    config = plan.config
    device = device or torch.device("cpu")
    rank, world = rank_and_size(group)
    tp = config.tp
    groups = world // tp
    tell = say if (say is not None and rank == 0) else (lambda message: None)
    quiet_transformers()
    tp_group, index = make_tp_group(group, tp)
    if rank == 0:
        if write_identity:
            store.write_identity(config.out, plan.identity)
        store.remove_temporaries(config.out)
    found = store.shards_on_disk(config.out)
    # Every rank has listed the shards on disk before any rank writes one: all agree on what is left to do.
    _barrier(group)
    todo = [s for s in range(plan.shards) if s not in found]
    mine = todo[index::groups]
    tell(f"loading P and Q ({config.p_dtype}, {config.q_dtype}) on {world} rank(s)")
    p, q, layout, mode = _load_pair(plan, tp_group, groups, device)
    skipped = f", {len(found)} already on disk" if found else ""
    tell(f"{plan.tokens:,} tokens in {len(plan.windows):,} windows of up to {config.context} tokens, "
         f"{plan.shards} shard(s){skipped}; {groups} group(s) of {tp} rank(s), "
         f"{'trunk split by transformers' if mode == 'tensor_parallel' else 'trunk replicated'}")
    progress = None
    if rank == 0 and todo:
        progress = AuditProgress(config.out, {s: plan.shard_tokens(s) for s in todo}, interval_s=config.progress_s)
    started = time.perf_counter()
    try:
        for shard in mine:
            parts: list[tuple[np.ndarray, ScoredBatch]] = []
            for number, (window_index, ids, lengths) in enumerate(plan.shard_batches(shard)):
                scored = score_batch(p, q, ids, lengths, layout=layout, estimators=config.estimators,
                                     seed=config.seed, stream=f"audit/shard{shard}/batch{number}",
                                     materialise=config.materialise)
                parts.append((window_index, scored))
                if progress is not None:
                    progress.advance(shard, int(scored.token.numel()))
                    progress.poll()
            # tensor-parallel rank 0 writes: every rank of the group holds the same values
            if rank % tp == 0:
                store.write_shard(config.out, shard, _shard_columns(plan, parts),
                                  metadata={"shard": shard, "group": index, "context": config.context})
            if progress is not None:
                progress.shard_done(shard)
            if on_shard is not None:
                on_shard(rank, shard)
        # Wait for every group's last shard: rank 0 then reads complete results.
        _barrier(group)
    finally:
        if progress is not None:
            progress.close()
    seconds = time.perf_counter() - started
    if rank != 0:
        return None
    computed = sum(plan.shard_tokens(s) for s in todo)
    run = {
        "launcher": launcher,
        "world_size": world,
        "tp": tp,
        "groups": groups,
        "trunk": mode,
        "materialise": config.materialise,
        "device": str(device),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "shards_found_on_disk": len(found),
        "tokens_this_run": computed,
        "seconds": seconds,
        "tokens_per_s": computed / seconds if computed and seconds > 0 else None,
    }
    return finish_audit(plan, run)


def versions() -> dict[str, str]:
    """The versions an audit ran with.

    Returns:
        ``{"shardkl": ..., "torch": ..., "transformers": ..., "numpy": ..., "python": ..., "pyarrow": ...}``.
    """
    import transformers

    out = {"shardkl": shardkl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "numpy": np.__version__, "python": platform.python_version()}
    try:
        import pyarrow

        out["pyarrow"] = pyarrow.__version__
    except ImportError:  # pragma: no cover - the audit extra has it
        pass
    return out


def finish_audit(plan: AuditPlan, run: dict[str, Any]) -> AuditResult:
    """Rank 0, once every shard is on disk: the summary from all shard files, ``summary.json``, ``report.txt``
    and the plots.

    Args:
        plan: the audit's plan.
        run: how this run went (``summary.json``'s ``run``).

    Returns:
        :class:`AuditResult`.

    Raises:
        RuntimeError: a shard file is missing (the job did not finish).
    """
    config = plan.config
    missing = sorted(set(range(plan.shards)) - store.shards_on_disk(config.out))
    if missing:
        raise RuntimeError(f"{len(missing)} shard file(s) missing under {config.out}, first {missing[0]}")
    names = list(store.COLUMNS) + (list(store.ESTIMATOR_COLUMNS) if config.estimators else [])
    columns = store.read_columns(config.out, range(plan.shards), names)
    stats = summarise(columns)
    summary: dict[str, Any] = {
        "tokens": stats.pop("tokens"),
        "documents": stats.pop("documents"),
        "p_model": config.p_model,
        "q_model": config.q_model,
        "p_dtype": config.p_dtype,
        "q_dtype": config.q_dtype,
        "data": config.data,
        "data_format": plan.data_format,
        "text_key": config.text_key if plan.data_format != "text" else None,
        "documents_in_data": plan.documents_in_data,
        "context": config.context,
        "windows": len(plan.windows),
        "shards": plan.shards,
        "vocab_size": plan.vocab_size,
        "estimators_per_position": config.estimators,
        "seed": config.seed,
        "versions": versions(),
        **stats,
        "run": run,
    }
    report = format_report(summary)
    out = Path(config.out)
    store.write_json_atomic(out / SUMMARY_FILE, summary)
    (out / REPORT_FILE).write_text(report)
    if config.plots:
        from shardkl.apps.audit.plots import write_plots

        write_plots(out, columns, context=config.context, summary=summary)
    return AuditResult(summary, report)


__all__ = ["AuditResult", "REPORT_FILE", "SUMMARY_FILE", "ShardHook", "finish_audit", "make_tp_group", "run_rank"]
