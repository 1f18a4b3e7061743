"""LinearLogits: exact KL, entropy and log-probs from hidden states and output-layer rows, never the logits.

References materialise the logits ``hidden @ weight.T + bias`` in float64. Under a group, the gradients of
``hidden`` are each rank's partial sums with ``hidden_grad="partial"`` (the test sums them over the ranks, as the
layer that replicated ``hidden`` would) and the full gradient with ``hidden_grad="full"`` (shardkl's all-reduce).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import shardkl
from shardkl import _sources
from shardkl.estimators import from_log_ratio
from shardkl.testing import count_collectives
from tests._distributed import local_layout, run_ranks, split_sizes
from tests.reference import reference

VOCAB, H_P, H_Q = 1003, 12, 20
NAMES = ("exact_kl", "entropy", "p_logprobs", "q_logprobs")


def _model(seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "h_p": torch.randn(2, 5, H_P, generator=g, dtype=torch.float64),
        "w_p": torch.randn(VOCAB, H_P, generator=g, dtype=torch.float64) * 0.4,
        "b_p": torch.randn(VOCAB, generator=g, dtype=torch.float64) * 0.2,
        "h_q": torch.randn(2, 5, H_Q, generator=g, dtype=torch.float64),
        "w_q": torch.randn(VOCAB, H_Q, generator=g, dtype=torch.float64) * 0.3,
    }
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tensors["tokens"] = torch.randint(0, VOCAB, (2, 5), generator=g)
    return tensors


def _loss(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    k3 = from_log_ratio(stats["q_logprobs"] - stats["p_logprobs"], "k3")
    weights = (1.0, 0.3, 0.5, 0.2)
    return sum(w * stats[n].double().sum() for w, n in zip(weights, NAMES, strict=True)) + k3.double().sum()


def _reference(m: dict[str, torch.Tensor], temperature: float, valid: int = VOCAB):
    leaves = {k: m[k].double().clone().requires_grad_() for k in ("h_p", "w_p", "b_p", "h_q", "w_q")}
    a = (leaves["h_p"] @ leaves["w_p"].T + leaves["b_p"])[..., :valid]
    b = (leaves["h_q"] @ leaves["w_q"].T)[..., :valid]
    ref = reference(a, b, m["tokens"], temperature)
    _loss(ref).backward()
    return {k: v.detach() for k, v in ref.items()}, {k: v.grad for k, v in leaves.items()}


def _check_ranks(rank: int, world: int, dtype: torch.dtype, temperature: float, hidden_grad: str = "partial") -> None:
    sizes = split_sizes(VOCAB, world)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    m = _model(dtype=dtype)
    ref, ref_grads = _reference(m, temperature)
    leaves = {k: m[k].clone().requires_grad_() for k in ("h_p", "h_q")}
    leaves |= {k: m[k][start:stop].clone().requires_grad_() for k in ("w_p", "b_p", "w_q")}
    p = shardkl.LinearLogits(leaves["h_p"], leaves["w_p"], leaves["b_p"], hidden_grad=hidden_grad)
    q = shardkl.LinearLogits(leaves["h_q"], leaves["w_q"], hidden_grad=hidden_grad)
    with count_collectives() as forward:
        stats = shardkl.kl_stats(p, q, m["tokens"], layout=local_layout(sizes, rank), temperature=temperature)
    got = stats._asdict()
    tol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 2e-2)
    for name in NAMES:
        assert got[name].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got[name].double(), ref[name], rtol=tol, atol=tol, msg=name)
    with count_collectives() as backward:
        _loss(got).backward()
    # "full": one all-reduce of each side's hidden-state gradient, the only collectives of the backward
    in_backward = 2 if hidden_grad == "full" and world > 1 else 0
    assert forward.total == (1 if world > 1 else 0) and backward.total == in_backward, (forward.calls, backward.calls)
    for name, leaf in leaves.items():
        grad = leaf.grad
        assert grad is not None and grad.dtype == dtype, name
        if name.startswith("h_") and world > 1 and hidden_grad == "partial":
            # this rank's partial sum over its vocabulary rows: the replicating layer sums them
            grad = grad.double()
            dist.all_reduce(grad)
        expected = ref_grads[name] if name.startswith("h_") else ref_grads[name][start:stop]
        scale = expected.abs().amax().item() if expected.numel() else 1.0
        torch.testing.assert_close(grad.double(), expected, rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize(("world", "hidden_grad"), [(1, "partial"), (2, "partial"), (2, "full"), (3, "full")])
def test_values_and_gradients_of_hidden_weight_bias_on_uneven_ranks(world: int, hidden_grad: str) -> None:
    # world 3 splits the vocabulary [0, 501, 502]: rank 0 holds an empty shard
    if world == 1:
        _check_ranks(0, 1, torch.float64, 0.8, hidden_grad)
    else:
        run_ranks(_check_ranks, world, torch.float64, 0.8, hidden_grad)


def _unsaid_hidden_grad(rank: int, world: int) -> None:
    m = _model()
    sizes = split_sizes(VOCAB, world)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    hidden = m["h_p"].clone().requires_grad_()
    with pytest.raises(ValueError, match=r"hidden_grad='partial'.*hidden_grad='full'"):
        shardkl.exact_kl(
            shardkl.LinearLogits(hidden, m["w_p"][start:stop]), m["h_q"] @ m["w_q"][start:stop].T,
            layout=local_layout(sizes, rank),
        )
    # no gradient wanted (a frozen teacher, an audit under no_grad): nothing to say
    shardkl.exact_kl(shardkl.LinearLogits(m["h_p"], m["w_p"][start:stop]), m["h_q"] @ m["w_q"][start:stop].T,
                     layout=local_layout(sizes, rank))
    with torch.no_grad():
        shardkl.exact_kl(shardkl.LinearLogits(hidden, m["w_p"][start:stop]), m["h_q"] @ m["w_q"][start:stop].T,
                         layout=local_layout(sizes, rank))
    with pytest.raises(ValueError, match="hidden_grad must be one of"):
        shardkl.exact_kl(shardkl.LinearLogits(hidden, m["w_p"][start:stop], hidden_grad="mean"),  # type: ignore[arg-type]
                         m["h_q"] @ m["w_q"][start:stop].T, layout=local_layout(sizes, rank))


def test_a_trainable_hidden_state_under_a_group_must_say_which_gradient_it_wants() -> None:
    # raised before any collective, on every rank; one process needs no choice
    run_ranks(_unsaid_hidden_grad, 2)
    m = _model()
    shardkl.exact_kl(shardkl.LinearLogits(m["h_p"].clone().requires_grad_(), m["w_p"]), m["h_q"] @ m["w_q"].T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_and_single_precision_match_float64(dtype: torch.dtype) -> None:
    _check_ranks(0, 1, dtype, 1.0)


def test_mixed_sources_frozen_teacher_and_the_unfused_path_agree() -> None:
    m = _model(1)
    h = m["h_p"].clone().requires_grad_()
    w = m["w_p"].clone().requires_grad_()
    teacher_logits = m["h_q"] @ m["w_q"].T  # a frozen teacher given as logits
    fused = shardkl.kl_stats(shardkl.LinearLogits(h, w), teacher_logits, m["tokens"])
    (fused.exact_kl.sum() + fused.k1.sum()).backward()
    h2, w2 = m["h_p"].clone().requires_grad_(), m["w_p"].clone().requires_grad_()
    unfused = shardkl.kl_stats(h2 @ w2.T, teacher_logits, m["tokens"])
    (unfused.exact_kl.sum() + unfused.k1.sum()).backward()
    for name in ("exact_kl", "entropy", "p_logprobs", "q_logprobs", "k1", "k2", "k3"):
        torch.testing.assert_close(getattr(fused, name), getattr(unfused, name), msg=name)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    # the teacher side as LinearLogits of frozen tensors: the same numbers, nothing for it to differentiate
    frozen = shardkl.LinearLogits(m["h_q"], m["w_q"])
    torch.testing.assert_close(shardkl.exact_kl(shardkl.LinearLogits(h, w), frozen), fused.exact_kl)
    # single-input functions and the loss helpers take it too
    source = shardkl.LinearLogits(m["h_p"], m["w_p"], m["b_p"])
    logits = m["h_p"] @ m["w_p"].T + m["b_p"]
    torch.testing.assert_close(shardkl.entropy(source), shardkl.entropy(logits))
    torch.testing.assert_close(shardkl.token_logprobs(source, m["tokens"]), shardkl.token_logprobs(logits, m["tokens"]))
    for estimator in ("exact", "k3+"):
        torch.testing.assert_close(
            shardkl.kl_penalty(source, frozen, m["tokens"], estimator=estimator),
            shardkl.kl_penalty(logits, teacher_logits, m["tokens"], estimator=estimator),
        )
    torch.testing.assert_close(
        shardkl.sampled_kl(source, frozen, m["tokens"], estimator="k2", reduction="token_mean"),
        shardkl.sampled_kl(logits, teacher_logits, m["tokens"], estimator="k2", reduction="token_mean"),
    )
    # sampling from hidden states draws what sampling from the logits draws
    torch.testing.assert_close(shardkl.sample_tokens(source, seed=3), shardkl.sample_tokens(logits, seed=3))
    # token selection on the leading dimensions, like slicing the logits
    torch.testing.assert_close(shardkl.entropy(source[:, 1:-1]), shardkl.entropy(logits[:, 1:-1]))


def test_padded_vocabulary_gets_zero_gradient_and_is_left_out() -> None:
    m = _model(2)
    valid = 990
    ref, ref_grads = _reference(m, 1.0, valid)
    leaves = {k: m[k].clone().requires_grad_() for k in ("h_p", "w_p", "b_p", "h_q", "w_q")}
    m["w_p"][valid:] = 50.0  # garbage padding rows must not count
    p = shardkl.LinearLogits(leaves["h_p"], leaves["w_p"], leaves["b_p"])
    q = shardkl.LinearLogits(leaves["h_q"], leaves["w_q"])
    got = shardkl.kl_stats(p, q, m["tokens"] % valid, valid_vocab_size=valid)._asdict()
    ref = reference(
        (m["h_p"] @ m["w_p"].T + m["b_p"])[..., :valid], (m["h_q"] @ m["w_q"].T)[..., :valid], m["tokens"] % valid
    )
    for name in NAMES:
        torch.testing.assert_close(got[name], ref[name], msg=name)
    _loss(got).backward()
    assert (leaves["w_p"].grad[valid:] == 0).all() and (leaves["b_p"].grad[valid:] == 0).all()
    assert (leaves["w_q"].grad[valid:] == 0).all()


def test_no_tensor_of_the_logits_size_is_ever_allocated() -> None:
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    rows, hidden, vocab = 4096, 8, 1003
    h = torch.randn(rows, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    h_ref, w_ref = torch.randn(rows, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    logits_bytes = rows * vocab * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        stats = shardkl.kl_stats(shardkl.LinearLogits(h, w), shardkl.LinearLogits(h_ref, w_ref), tokens)
        (stats.exact_kl.sum() + stats.k3.sum() + stats.entropy.sum()).backward()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]
    assert sizes, "the profiler recorded no allocation"
    # the largest allocation is a tile or a gradient, far below one side's logits
    assert max(sizes) < logits_bytes / 4, (max(sizes), logits_bytes)
    assert _sources.TILE_ELEMENTS * 4 < logits_bytes / 4


def test_bad_linear_logits_are_named() -> None:
    m = _model()
    h, w = m["h_p"], m["w_p"]
    cases = [
        (lambda: shardkl.exact_kl(shardkl.LinearLogits(h, m["w_q"]), shardkl.LinearLogits(h, w)), ValueError,
         "hidden size mismatch"),
        (lambda: shardkl.entropy(shardkl.LinearLogits(h, w, torch.zeros(7, dtype=h.dtype))), ValueError,
         "bias must have one entry per weight row"),
        (lambda: shardkl.exact_kl(shardkl.LinearLogits(h, w), shardkl.LinearLogits(m["h_q"][:, :3], m["w_q"])),
         ValueError, "same shape \\(of their logits"),
        (lambda: shardkl.entropy(shardkl.LinearLogits(h, w.to("meta"))), ValueError, "on one device"),
        (lambda: shardkl.entropy(shardkl.LinearLogits(h, w[0])), ValueError, "weight must be \\[V_local, H\\]"),
        (lambda: shardkl.entropy(shardkl.LinearLogits(h.long(), w)), TypeError, "hidden must have a floating"),
        (lambda: shardkl.reduce_tokens(shardkl.LinearLogits(h, w)), TypeError, "values must be a torch.Tensor"),
        (lambda: shardkl.k3(shardkl.LinearLogits(h, w), h), TypeError, "p_logprobs must be a torch.Tensor"),
        (lambda: shardkl.LinearLogits(h, w)[..., :3], IndexError, "token dimensions"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def _check_dtensor(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    m = _model(4)
    ref, ref_grads = _reference(m, 1.0)
    h_local = m["h_p"].clone().requires_grad_()
    hidden = DTensor.from_local(h_local, mesh, [Replicate()])
    weight = distribute_tensor(m["w_p"], mesh, [Shard(0)]).requires_grad_()
    bias = distribute_tensor(m["b_p"], mesh, [Shard(0)]).requires_grad_()
    teacher = shardkl.LinearLogits(
        DTensor.from_local(m["h_q"], mesh, [Replicate()]), distribute_tensor(m["w_q"], mesh, [Shard(0)])
    )
    stats = shardkl.kl_stats(shardkl.LinearLogits(hidden, weight, bias), teacher, m["tokens"])
    for name in NAMES:
        torch.testing.assert_close(getattr(stats, name), ref[name], msg=name)
    _loss(stats._asdict()).backward()
    # weight and bias gradients are DTensors sharded like the parameters; hidden's is summed over the ranks
    assert isinstance(weight.grad, DTensor) and tuple(weight.grad.placements) == (Shard(0),)
    torch.testing.assert_close(weight.grad.full_tensor(), ref_grads["w_p"])
    torch.testing.assert_close(bias.grad.full_tensor(), ref_grads["b_p"])
    torch.testing.assert_close(h_local.grad, ref_grads["h_p"])
    with pytest.raises(TypeError, match="hidden must be one too"):
        shardkl.entropy(shardkl.LinearLogits(m["h_p"], weight))


def test_dtensor_weight_sharded_on_the_vocabulary() -> None:
    run_ranks(_check_dtensor, 2)


def _check_column_parallel_head(rank: int, world: int) -> None:
    from shardkl.parallel import ColumnParallelLMHead

    g = torch.Generator().manual_seed(5)
    full = torch.nn.Linear(H_P, VOCAB, bias=False).double()
    with torch.no_grad():
        full.weight.copy_(torch.randn(VOCAB, H_P, generator=g, dtype=torch.float64))
    ref_logits = torch.randn(3, VOCAB, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (3,), generator=g)
    group = dist.group.WORLD if world > 1 else None
    head = ColumnParallelLMHead.from_linear(full, group=group)  # padded to a multiple of 8 * world
    one_head = ColumnParallelLMHead.from_linear(full, group=None)
    trunk_out = torch.randn(3, H_P, generator=g, dtype=torch.float64)
    hidden, one_hidden = trunk_out.clone().requires_grad_(), trunk_out.clone().requires_grad_()
    layout = head.layout

    def padded(layout: shardkl.VocabLayout) -> torch.Tensor:
        # the reference's slice of its logits, with the padding columns the head's layout also holds
        local = ref_logits[:, layout.start : layout.start + layout.kept_size]
        return torch.cat([local, local.new_zeros(3, layout.local_size - layout.kept_size)], -1)

    local_ref = padded(layout)
    with count_collectives() as forward:
        loss = shardkl.kl_penalty(head.linear_logits(hidden), local_ref, tokens, estimator="k2", layout=layout)
    with count_collectives() as backward:
        loss.backward()
    one = shardkl.kl_penalty(one_head.linear_logits(one_hidden), padded(one_head.layout), tokens, estimator="k2",
                             layout=one_head.layout)
    one.backward()
    torch.testing.assert_close(loss, one)
    # the head's copy-to-region sums the hidden gradient: every rank holds the full one
    torch.testing.assert_close(hidden.grad, one_hidden.grad)
    rows = slice(layout.start, layout.start + layout.kept_size)
    torch.testing.assert_close(head.weight.grad[: layout.kept_size], one_head.weight.grad[rows])
    assert (head.weight.grad[layout.kept_size :] == 0).all()
    # one collective in forward (shardkl's), one in backward (the head's copy-to-region, not shardkl's op)
    assert forward.total == (1 if world > 1 else 0) and backward.total == (1 if world > 1 else 0)


@pytest.mark.parametrize("world", [1, 2])
def test_column_parallel_head_linear_logits(world: int) -> None:
    if world == 1:
        _check_column_parallel_head(0, 1)
    else:
        run_ranks(_check_column_parallel_head, world)
