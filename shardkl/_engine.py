"""The engine: one forward driver, one backward driver and one autograd Function for every divergence.

A call is **sources × op**. The sources (:mod:`shardkl._sources`) give each side's tiles — this rank's logits, or
matmuls of hidden states with blocks of the output layer — and take the tiles' gradients back. The op
(:mod:`shardkl._ops`: KL statistics, generalised JSD, top-k buckets) is a short program against the
:class:`Driver`:

- :meth:`Driver.reduce`: run a per-tile function (a kernel entry of ``Options.impl``, :mod:`shardkl._dispatch`)
  over every tile and combine the vocabulary blocks of a row with the op's merge → a few floats per token;
- :meth:`Driver.gather`: **the one all-gather** of a forward call — those floats, the op's own check metadata and
  every rank's call metadata — after which every rank runs the same checks (:mod:`shardkl._validation`) on the same
  numbers, so all raise or none does;
- :meth:`Driver.all_reduce`: a further round where the op needs one (the JSD's second round);
- :meth:`Driver.backward`: recompute each tile, let the op's kernel entry write its logit gradient, and send it to
  the inputs (the logits' gradient, or ``grad_hidden``/``grad_weight``/``grad_bias`` by two matmuls). No collective,
  except the all-reduce of ``grad_hidden`` that a :class:`shardkl.LinearLogits` with ``hidden_grad="full"`` asks
  for.

Nothing of size ``[N, V_local]`` is kept between the two passes: only references to the inputs and the op's few
per-token results.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from shardkl import _dispatch, _validation
from shardkl._inputs import Call
from shardkl._sources import Side, Sink, Sources, Tile, compute_dtype
from shardkl.distributed import all_gather_flat, all_reduce_sum
from shardkl.kernels import Kernels
from shardkl.layout import VocabLayout
from shardkl.linear import LinearLogits
from shardkl.options import Options

# vocabulary blocks of a row merged at once in Driver.reduce (the rest of a call's blocks wait for the next merge)
MERGE_GROUP = 8

# the autograd inputs of one side: logits, or hidden, weight, bias
SideTensors = tuple["Tensor | None", "Tensor | None", "Tensor | None", "Tensor | None"]


@dataclass(frozen=True)
class EngineSpec:
    """Everything about one call that is not a tensor (and that every rank must agree on, checked in the gather).

    Attributes:
        layout: this rank's slice (padding included) and the group.
        layout_given: the layout came from the caller or a DTensor, rather than the default equal-split guess.
        temperature: softmax temperature.
        options: how the call runs.
        names: the public names of the two inputs, for the messages of the checks.
        hidden_grad: per side, ``"full"`` where a :class:`shardkl.LinearLogits`' hidden-state gradient is to be
            summed over the group in backward.
        no_process_group: ``WORLD_SIZE`` of a multi-rank environment without a process group (a warning), else 0.
    """

    layout: VocabLayout
    layout_given: bool
    temperature: float
    options: Options
    names: tuple[str, str] = ("p_logits", "q_logits")
    hidden_grad: tuple[str | None, str | None] = (None, None)
    no_process_group: int = 0


def _options_code(options: Options) -> int:
    """One number that differs when the ranks' options differ (the timeout may differ per rank)."""
    return zlib.crc32(repr((options.impl, options.validate, options.nan_policy)).encode())


class Gathered(NamedTuple):
    """What the one all-gather of a forward call brought back, after the checks.

    Attributes:
        body: ``[world, k, rows]`` float64, every rank's per-token floats in rank order.
        extra: every rank's op-specific metadata (``[]`` per rank without), read on the host.
        valid: the number of real vocabulary ids.
        world: the number of ranks.
    """

    body: Tensor
    extra: list[list[float]]
    valid: int
    world: int


class Driver:
    """The tiles, kernels and collectives of one call, for an op's forward or backward program.

    Args:
        tensors: the eight autograd inputs, ``(logits, hidden, weight, bias)`` of each side (the second side's all
            ``None`` for one input).
        spec: the call's layout, temperature and options.
        kernels: the kernels to use (the backward reuses the forward's); resolved from ``spec.options`` if omitted.
    """

    def __init__(self, tensors: Sequence[Tensor | None], spec: EngineSpec, kernels: Kernels | None = None) -> None:
        self.spec = spec
        self.a = Side(*tensors[0:4])
        self.two = any(t is not None for t in tensors[4:8])
        self.b = Side(*tensors[4:8]) if self.two else None
        self.dtype = compute_dtype(*tensors[0:3], *tensors[4:7])
        self.sources = Sources(self.a, self.b, self.dtype)
        self.rows, self.lead_shape, self.device = self.sources.rows, self.sources.lead_shape, self.sources.device
        self.temperature, self.layout = spec.temperature, spec.layout
        self.kernels = _dispatch.resolve(spec.options.impl, self.device, self.dtype) if kernels is None else kernels

    def reduce(
        self, tile_fn: Callable[[Tile], Tensor], *, merge: Callable[[Tensor], Tensor], identity: Sequence[float]
    ) -> Tensor:
        """``[k, rows]``: ``tile_fn(tile) -> [k, tile rows]`` over every tile, the vocabulary blocks of each row
        combined by ``merge([blocks, k, rows]) -> [k, rows]`` (associative; not called for a single block);
        ``identity`` (the result for no columns at all, ``k`` values) for an empty shard.

        The blocks are folded as they come, :data:`MERGE_GROUP` at a time, so what is kept is at most that many
        ``[k, rows]`` arrays whatever the vocabulary (a linear side has ``V_local / C`` blocks)."""
        if self.sources.num_blocks == 0:
            values = torch.tensor(identity, dtype=torch.float64, device=self.device)
            return values.unsqueeze(-1).expand(len(identity), self.rows).to(self.dtype).clone()
        pending: list[Tensor] = []
        for _, _, tiles in self.sources.column_blocks():
            block: Tensor | None = None
            for tile in tiles:
                out = tile_fn(tile)
                if block is None:
                    block = torch.empty(out.shape[0], self.rows, dtype=out.dtype, device=out.device)
                block[:, tile.rows] = out
            assert block is not None
            pending.append(block)
            if len(pending) == MERGE_GROUP:
                pending = [merge(_stacked(pending))]
        return pending[0] if len(pending) == 1 else merge(_stacked(pending))

    def call_info(self, p_dtype: torch.dtype, q_dtype: torch.dtype | None) -> _validation.CallInfo:
        spec = self.spec
        return _validation.CallInfo(
            layout=spec.layout,
            layout_given=spec.layout_given,
            kept=self.sources.vocab,
            rows=self.rows,
            lead_shape=self.lead_shape,
            p_dtype=p_dtype,
            q_dtype=q_dtype,
            temperature=spec.temperature,
            nan_policy=spec.options.nan_policy,
            options_code=_options_code(spec.options),
            no_process_group=spec.no_process_group,
        )

    def gather(
        self,
        body: Tensor,
        *,
        lse_rows: Sequence[int],
        what: str,
        tokens: Tensor | None = None,
        mask: Tensor | None = None,
        extra_meta: Tensor | None = None,
        offsets_used: bool = False,
    ) -> Gathered:
        """The one collective of a forward call, and the checks every rank runs on what it brought back.

        Args:
            body: ``[k, rows]`` this rank's per-token floats.
            lse_rows: the rows of ``body`` holding this rank's log-sum-exp of each input over its slice (they carry
                the NaN, ``+inf`` and probabilities checks).
            what: what travels, for the timeout's message.
            tokens: ``[rows]`` global token ids the op reads, or ``None``.
            mask: the per-token mask (its values are checked), or ``None``.
            extra_meta: the op's own check metadata (a fixed-length float64 vector), or ``None``.
            offsets_used: the op reads global ids other than tokens, so the default equal split must hold.
        """
        k, rows = body.shape
        q_dtype = None if self.b is None else self.b.source.dtype
        meta = _validation.local_meta(self.call_info(self.a.source.dtype, q_dtype), body[list(lse_rows)], tokens, mask)
        extra = [] if extra_meta is None else [extra_meta]
        local = torch.cat([body.to(torch.float64).reshape(-1), *extra, meta])
        # The one collective of the call: per-token floats, the op's check metadata and the call's metadata.
        gathered = all_gather_flat(
            local, self.layout.group, what=what, timeout_s=self.spec.options.resolved_timeout_s
        )
        world = gathered.shape[0]
        per_token = gathered[:, : k * rows].view(world, k, rows)
        num_meta, num_extra = _validation.NUM_META, 0 if extra_meta is None else extra_meta.numel()
        reads = [gathered[:, k * rows :].reshape(-1)]
        if world > 1:
            # probabilities over the whole vocabulary: counted on the device, read with the metadata in one sync
            merged_lse = torch.logsumexp(per_token[:, list(lse_rows)], dim=0)
            columns = gathered[:, -num_meta + _validation.KEPT].sum()
            reads.append(_validation.probability_rows(merged_lse, columns, self.temperature).reshape(-1))
        host = torch.cat(reads).tolist()
        width = num_extra + num_meta
        rows_meta = [host[r * width + num_extra : (r + 1) * width] for r in range(world)]
        extra_rows = [host[r * width : r * width + num_extra] for r in range(world)]
        # every rank checks the same gathered numbers, so all of them raise (or none does)
        valid = _validation.check_gathered(
            rows_meta, validate=self.spec.options.validate, shape=self.lead_shape, names=self.spec.names,
            offsets_used=offsets_used,
        )
        _validation.warn_if_probabilities(
            rows_meta, host[world * width :], self.spec.names[: len(lse_rows)], self._in_unit_interval
        )
        return Gathered(per_token, extra_rows, valid, world)

    def _in_unit_interval(self, side: int) -> bool:
        """Whether every finite value of side ``side``'s local logits lies in ``[0, 1]`` (never for hidden states)."""
        source = self.a if side == 0 else self.b
        x = None if source is None else source.logits
        if x is None or x.numel() == 0:
            return False
        finite = torch.isfinite(x)
        return bool(torch.where(finite, x, 0.0).amin() >= 0) and bool(torch.where(finite, x, 0.0).amax() <= 1)

    def all_reduce(self, x: Tensor, *, what: str) -> Tensor:
        """``x`` summed over the ranks of the group, in float64."""
        return all_reduce_sum(
            x.to(torch.float64), self.layout.group, what=what, timeout_s=self.spec.options.resolved_timeout_s
        )

    def backward(
        self, tile_fn: Callable[[Tile, Tensor | None, Tensor | None], None] | None, needs: Sequence[bool]
    ) -> tuple[Tensor | None, ...]:
        """The gradients of the eight side inputs (``None`` where not needed).

        Args:
            tile_fn: ``(tile, grad_a, grad_b)`` writes the tile's gradient with respect to each side's raw logits
                into the given contiguous outputs (``None`` where that side needs none); ``None`` when no gradient
                flows (the needed inputs then get zeros).
            needs: ``ctx.needs_input_grad`` of the eight side inputs.
        """
        sink_a = Sink(self.a, tuple(needs[0:4]), self.dtype)
        sink_b = None if self.b is None else Sink(self.b, tuple(needs[4:8]), self.dtype)
        sinks = [sink_a] if sink_b is None else [sink_a, sink_b]
        if tile_fn is not None and any(s.any for s in sinks):
            for cols, blocks, tiles in self.sources.column_blocks():
                for sink in sinks:
                    sink.start_block(cols)
                for tile in tiles:
                    out_a = sink_a.target(tile, tile.a)
                    out_b = None if sink_b is None or tile.b is None else sink_b.target(tile, tile.b)
                    tile_fn(tile, out_a, out_b)
                    sink_a.add(out_a, tile, blocks[0])
                    if sink_b is not None:
                        sink_b.add(out_b, tile, blocks[1])
                for sink in sinks:
                    sink.end_block(cols)
        results = list(sink_a.result()) + (list(sink_b.result()) if sink_b is not None else [None] * 4)
        for side in (0, 1):
            grad_hidden = results[4 * side + 1]
            if grad_hidden is not None and self.spec.hidden_grad[side] == "full":
                # hidden_grad="full": this rank's partial sum over its vocabulary rows, summed over the group
                results[4 * side + 1] = all_reduce_sum(
                    grad_hidden, self.layout.group, what="the hidden states' gradient",
                    timeout_s=self.spec.options.resolved_timeout_s,
                )
        return tuple(results)


def _stacked(parts: list[Tensor]) -> Tensor:
    """``[blocks, k, rows]`` of blocks' results (float64 once an earlier merge made one of them so)."""
    dtypes = {x.dtype for x in parts}
    return torch.stack(parts if len(dtypes) == 1 else [x.to(torch.float64) for x in parts])


class Op(Protocol):
    """One divergence as a program against the :class:`Driver` (see :mod:`shardkl._ops`)."""

    def forward(self, driver: Driver) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
        """``(outputs, saved)``: the per-token outputs, and the per-token tensors the backward needs."""
        ...

    def backward(
        self, driver: Driver, saved: tuple[Tensor, ...], grads: tuple[Tensor | None, ...], needs: Sequence[bool]
    ) -> tuple[Tensor | None, ...]:
        """The gradients of the eight side inputs from the incoming gradients of the outputs."""
        ...


class EngineFunction(torch.autograd.Function):
    """Every op's forward and backward: ``apply(op, spec, *side_tensors) -> op's outputs``."""

    @staticmethod
    def forward(ctx: Any, op: Op, spec: EngineSpec, *tensors: Tensor | None) -> tuple[Tensor, ...]:  # type: ignore[override]
        driver = Driver(tensors, spec)
        outputs, saved = op.forward(driver)
        ctx.save_for_backward(*tensors, *saved)
        ctx.op, ctx.spec, ctx.kernels = op, spec, driver.kernels
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        driver = Driver(saved[:8], ctx.spec, ctx.kernels)
        return (None, None, *ctx.op.backward(driver, tuple(saved[8:]), grads, ctx.needs_input_grad[2:]))


def side_tensors(x: Tensor | LinearLogits | None) -> SideTensors:
    """``(logits, hidden, weight, bias)`` of one side, the autograd inputs of :class:`EngineFunction`."""
    if x is None:
        return None, None, None, None
    if isinstance(x, LinearLogits):
        return None, x.hidden, x.weight, x.bias
    return x, None, None, None


def run(call: Call, op: Op, *, differentiable: bool = True) -> tuple[Tensor, ...]:
    """Run ``op`` on a resolved call: its outputs, differentiable with respect to every side input (or, with
    ``differentiable=False``, plain values computed without autograd)."""
    hidden_grad = tuple(x.hidden_grad if isinstance(x, LinearLogits) else None for x in (call.p, call.q))
    spec = EngineSpec(
        call.layout, call.layout_given, call.temperature, call.options, call.names, hidden_grad,  # type: ignore[arg-type]
        call.no_process_group,
    )
    tensors = (*side_tensors(call.p), *side_tensors(call.q))
    if not differentiable:
        with torch.no_grad():
            return op.forward(Driver(tensors, spec))[0]
    outputs: tuple[Tensor, ...] = EngineFunction.apply(op, spec, *tensors)
    return outputs


__all__ = ["Driver", "EngineFunction", "EngineSpec", "Gathered", "Op", "run", "side_tensors"]
