"""DTensor front door: gloo ranks on CPU, ceil-chunk uneven layouts, 1-D and 2-D meshes, float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import shardkl
from tests._distributed import run_ranks
from tests.reference import reference

NAMES = ("exact_kl", "entropy", "p_logprobs", "q_logprobs")


def _inputs(vocab: int, shape: tuple[int, ...] = (3, 4)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    a = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2
    b = a + 0.5 * torch.randn(*shape, vocab, generator=g, dtype=torch.float64)
    return a, b, torch.randint(0, vocab, shape, generator=g)


def _ceil_chunk(vocab: int, world: int, coordinate: int) -> slice:
    chunk = -(-vocab // world)
    start = min(coordinate * chunk, vocab)
    return slice(start, min(start + chunk, vocab))


def _check_1d(rank: int, world: int, vocab: int) -> None:
    mesh = DeviceMesh("cpu", torch.arange(world))
    a, b, tokens = _inputs(vocab)
    ref_in = (a.clone().requires_grad_(), b.clone().requires_grad_())
    ref = reference(*ref_in, tokens)
    sum(ref[n].sum() * (i + 1) for i, n in enumerate(NAMES)).backward()

    x = distribute_tensor(a, mesh, [Shard(-1)]).requires_grad_()
    y = distribute_tensor(b, mesh, [Shard(-1)]).requires_grad_()
    assert x.to_local().shape[-1] == _ceil_chunk(vocab, world, rank).stop - _ceil_chunk(vocab, world, rank).start
    got = shardkl.kl_stats(x, y, tokens)
    for name in NAMES:
        value = getattr(got, name)
        assert type(value) is torch.Tensor, "results are plain tensors"
        torch.testing.assert_close(value, ref[name].detach(), rtol=1e-12, atol=1e-12, msg=name)
    sum(getattr(got, n).sum() * (i + 1) for i, n in enumerate(NAMES)).backward()
    cols = _ceil_chunk(vocab, world, rank)
    for mine, full in ((x.grad, ref_in[0].grad), (y.grad, ref_in[1].grad)):
        assert tuple(mine.placements) == (Shard(2),)
        torch.testing.assert_close(mine.to_local(), full[..., cols], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(mine.full_tensor(), full, rtol=1e-10, atol=1e-12)

    # every public function takes DTensors; the group argument may name the mesh's own group
    torch.testing.assert_close(shardkl.entropy(x.detach()), ref["entropy"].detach())
    torch.testing.assert_close(shardkl.token_logprobs(x.detach(), tokens), ref["p_logprobs"].detach())
    both = shardkl.compare_stats(x.detach(), y.detach(), tokens)
    torch.testing.assert_close(both.kl_qp, reference(b, a)["exact_kl"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both.q_logprobs, ref["q_logprobs"].detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(both.top1_p, a.argmax(-1)) and torch.equal(both.top1_q, b.argmax(-1))
    torch.testing.assert_close(
        shardkl.exact_kl(x.detach(), y.detach(), group=mesh.get_group(0), reduction="sum"),
        ref["exact_kl"].detach().sum(),
    )
    logr = ref["q_logprobs"] - ref["p_logprobs"]
    torch.testing.assert_close(shardkl.sampled_kl(x.detach(), y.detach(), tokens, estimator="k2"),
                               (logr.square() / 2).detach())

    # valid_vocab_size on the ceil-chunk layout: the last columns are padding
    valid = vocab - 3
    masked = reference(a[..., :valid], b[..., :valid])
    torch.testing.assert_close(
        shardkl.exact_kl(x.detach(), y.detach(), valid_vocab_size=valid), masked["exact_kl"], rtol=1e-12, atol=1e-12
    )

    # placements other than Shard(-1) on one mesh dimension are refused before any collective
    replicated = distribute_tensor(a, mesh, [Replicate()])
    partial = DTensor.from_local(a, mesh, [Partial()], run_check=False)
    for bad, found in ((replicated, "Replicate"), (distribute_tensor(a, mesh, [Shard(0)]), "Shard\\(dim=0\\)"),
                       (partial, "Partial")):
        with pytest.raises(ValueError, match=rf"Shard\(2\).*{found}"):
            shardkl.exact_kl(bad, bad)
    with pytest.raises(TypeError, match="q_logits must be one too"):
        shardkl.exact_kl(x.detach(), b)
    with pytest.raises(ValueError, match="group must be None"):
        shardkl.exact_kl(x.detach(), y.detach(), group=dist.new_group(list(range(world))))


@pytest.mark.parametrize(("world", "vocab"), [(2, 1001), (3, 1001), (4, 5)])
def test_dtensor_values_and_gradients_uneven(world: int, vocab: int) -> None:
    # (4, 5): ceil-chunk 2, 2, 1, 0 — the last rank holds no column
    run_ranks(_check_1d, world, vocab)


def _check_2d(rank: int, world: int) -> None:
    mesh = DeviceMesh("cpu", torch.arange(4).reshape(2, 2), mesh_dim_names=("dp", "tp"))
    vocab = 11
    a, b, tokens = _inputs(vocab, (4, 3))
    ref = reference(a, b, tokens)
    dp, tp = mesh.get_local_rank(0), mesh.get_local_rank(1)
    for placements in ([Replicate(), Shard(-1)], [Shard(0), Shard(2)]):
        x = distribute_tensor(a, mesh, placements).requires_grad_()
        y = distribute_tensor(b, mesh, placements)
        rows = slice(None) if isinstance(placements[0], Replicate) else slice(2 * dp, 2 * dp + 2)
        got = shardkl.kl_stats(x, y, tokens[rows])
        torch.testing.assert_close(got.exact_kl, ref["exact_kl"][rows], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.p_logprobs, ref["p_logprobs"][rows], rtol=1e-12, atol=1e-12)
        got.exact_kl.sum().backward()
        assert x.grad is not None and x.grad.to_local().shape[-1] == _ceil_chunk(vocab, 2, tp).stop - 6 * tp
    # the vocabulary sharded on the first mesh dimension: the group of mesh dimension 0
    x = distribute_tensor(a, mesh, [Shard(-1), Replicate()])
    torch.testing.assert_close(shardkl.entropy(x), ref["entropy"], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="exactly one mesh dimension"):
        shardkl.entropy(distribute_tensor(a, mesh, [Shard(-1), Shard(-1)]))


def test_dtensor_on_one_dimension_of_a_2d_mesh() -> None:
    run_ranks(_check_2d, 4)


def _check_parallelize_module(rank: int, world: int) -> None:
    torch.manual_seed(0)
    hidden, vocab = 16, 101
    head = torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.float64)
    ref_head = torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.float64)
    full = torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.float64)
    full.load_state_dict(head.state_dict())
    mesh = DeviceMesh("cpu", torch.arange(world))
    plan = ColwiseParallel(use_local_output=False)  # outputs stay DTensors, Shard(-1)
    parallelize_module(head, mesh, plan)
    parallelize_module(ref_head, mesh, ColwiseParallel(use_local_output=False))
    h = torch.randn(2, 5, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_logits = ref_head(h).detach()
    loss = shardkl.exact_kl(head(h), ref_logits, reduction="token_mean")
    loss.backward()
    expected = reference(full(h), ref_logits.full_tensor())["exact_kl"].mean()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(head.weight.grad.full_tensor(), full.weight.grad, rtol=1e-9, atol=1e-14)


def test_parallelize_module_colwise_lm_head() -> None:
    run_ranks(_check_parallelize_module, 2)


def _check_hf_llama(rank: int, world: int) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=1001, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False, initializer_range=0.2,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    policy = transformers.LlamaForCausalLM(config).double()
    one = transformers.LlamaForCausalLM(config).double()
    one.load_state_dict(policy.state_dict())
    reference_model = transformers.LlamaForCausalLM(config).double().requires_grad_(False)
    mesh = DeviceMesh("cpu", torch.arange(world))
    for model in (policy, reference_model):
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
    ids = torch.randint(0, 1001, (2, 9), generator=torch.Generator().manual_seed(1))
    tokens, mask = ids[:, 4:], torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    logits = policy(ids).logits[:, 3:-1]
    assert isinstance(logits, DTensor) and tuple(logits.placements) == (Shard(2),)
    with torch.no_grad():
        ref_logits = reference_model(ids).logits[:, 3:-1]
    loss = shardkl.kl_penalty(logits, ref_logits, tokens, mask=mask, estimator="k3+")
    loss.backward()
    full_ref = ref_logits.full_tensor()
    expected = shardkl.kl_penalty(one(ids).logits[:, 3:-1], full_ref, tokens, mask=mask, estimator="k3+")
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-14)
    # grpo_loss takes the same DTensor logits (values only here; the gradients are checked above)
    advantages = torch.tensor([[0.5], [-1.0]], dtype=torch.float64)
    with torch.no_grad():
        out = shardkl.grpo_loss(policy(ids).logits[:, 3:-1], ref_logits, tokens, advantages, kl_coef=0.1, mask=mask)
        one_out = shardkl.grpo_loss(one(ids).logits[:, 3:-1], full_ref, tokens, advantages, kl_coef=0.1, mask=mask)
    torch.testing.assert_close(out.loss, one_out.loss, rtol=1e-10, atol=1e-14)
    one_params = dict(one.named_parameters())
    for name, param in policy.named_parameters():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        torch.testing.assert_close(grad, one_params[name].grad, rtol=1e-8, atol=1e-12, msg=name)


def test_parallelize_module_hugging_face_llama_lm_head() -> None:
    pytest.importorskip("transformers")
    run_ranks(_check_hf_llama, 2)


def _check_mesh_order(rank: int, world: int) -> None:
    # mesh coordinate 0 is global rank 1, but the dimension's group numbers ranks sorted; torch 2.13 itself is not
    # consistent here (distribute_tensor's local pieces disagree with compute_local_shape_and_global_offset)
    mesh = DeviceMesh("cpu", torch.tensor([1, 0]))
    a, b, _ = _inputs(9)
    x = distribute_tensor(a, mesh, [Shard(-1)])
    with pytest.raises(ValueError, match=r"orders its ranks \[0, 1\], but the mesh orders the vocabulary shards "
                                         r"\[1, 0\]"):
        shardkl.entropy(x)


def test_mesh_out_of_group_rank_order_is_refused() -> None:
    run_ranks(_check_mesh_order, 2)
