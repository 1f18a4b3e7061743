"""Bad inputs get clear errors before any collective; numerical edge cases give no NaN and no negative KL."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist

import shardkl
from tests._distributed import run_ranks
from tests.kernels.cases import dtype_extremes
from tests.reference import reference


def _pair(shape=(3, 40), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(*shape, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def test_nan_raises_by_default_and_propagates_on_request() -> None:
    a, b = _pair()
    b[1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"q_logits holds NaN in 1 token row\(s\) of rank 0.*index 1.*propagate"):
        shardkl.exact_kl(a, b)
    kl = shardkl.exact_kl(a, b, options=shardkl.Options(nan_policy="propagate"))
    assert math.isnan(kl[1].item()) and torch.isfinite(kl[[0, 2]]).all()
    a[2, 0] = float("nan")
    # single-input functions name their argument `logits`
    with pytest.raises(ValueError, match="^logits holds NaN"):
        shardkl.entropy(a)
    with pytest.raises(ValueError, match="^logits holds NaN"):
        shardkl.token_logprobs(a, torch.zeros(3, dtype=torch.long))


def test_plus_inf_logits_raise_clearly() -> None:
    a, b = _pair()
    a[0, 3] = float("inf")
    with pytest.raises(ValueError, match=r"p_logits holds \+inf.*finite or -inf"):
        shardkl.exact_kl(a, b)
    assert math.isnan(shardkl.exact_kl(a, b, options=shardkl.Options(nan_policy="propagate"))[0].item())


def test_row_entirely_minus_inf() -> None:
    a, b = _pair()
    tokens = torch.tensor([1, 2, 3])
    a_empty = a.clone()
    a_empty[1] = float("-inf")
    x, y = a_empty.clone().requires_grad_(), b.clone().requires_grad_()
    stats = shardkl.kl_stats(x, y, tokens)
    # P has no mass in row 1: nothing contributes, and log P(x) is -inf
    assert stats.exact_kl[1] == 0 and stats.entropy[1] == 0 and stats.p_logprobs[1] == float("-inf")
    torch.testing.assert_close(stats.exact_kl[[0, 2]], reference(a, b)["exact_kl"][[0, 2]].float())
    (stats.exact_kl.sum() + stats.entropy.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    # Q has no mass in row 1 while P has: infinite KL, no NaN anywhere
    b_empty = b.clone()
    b_empty[1] = float("-inf")
    stats = shardkl.kl_stats(a, b_empty, tokens)
    assert stats.exact_kl[1] == float("inf") and stats.q_logprobs[1] == float("-inf")
    assert not any(torch.isnan(v).any() for v in stats if v is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_huge_logits_stay_accurate(dtype) -> None:
    big = 1e4
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(4, 64, generator=g, dtype=torch.float64) * 2 - 1) * big
    b = a.flip(-1)
    a[0], b[0] = big, big  # constant rows at the extreme: uniform distributions, KL 0
    b[1] = -big
    a, b = a.to(dtype), b.to(dtype)
    tokens = torch.arange(4)
    stats = shardkl.kl_stats(a, b, tokens)
    ref = reference(a, b, tokens)
    # the rounding of logits of size 1e4 in the compute dtype (fp32 unless the input is fp64)
    atol = 8 * big * (torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps)
    for name in ("exact_kl", "entropy", "p_logprobs", "q_logprobs"):
        got = getattr(stats, name)
        assert not torch.isnan(got).any(), name
        torch.testing.assert_close(got.double(), ref[name], rtol=1e-5, atol=atol, msg=name)
    assert (stats.exact_kl >= 0).all() and stats.exact_kl[0] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_extremes_give_no_nan_and_no_negative_kl(dtype) -> None:
    a, b, tokens = dtype_extremes(dtype)
    a, b = a.requires_grad_(), b.requires_grad_()
    stats = shardkl.kl_stats(a, b, tokens)
    for name, value in stats._asdict().items():
        assert not torch.isnan(value).any(), name
    assert (stats.exact_kl >= 0).all()
    assert stats.exact_kl[1] == 0 and stats.exact_kl[3] == 0
    assert stats.exact_kl[0] > 1  # P and Q (almost) disjoint
    torch.testing.assert_close(stats.entropy[1].double(), torch.tensor(math.log(50), dtype=torch.float64))
    (stats.exact_kl[1:].sum() + stats.entropy.sum() + stats.k3.sum()).backward()
    assert torch.isfinite(a.grad.float()).all() and torch.isfinite(b.grad.float()).all()


def test_same_tensor_expanded_and_strided_inputs_work() -> None:
    a, b = _pair((5, 30))
    assert torch.equal(shardkl.exact_kl(a, a), torch.zeros(5))  # both arguments alias one tensor
    row = a[0]
    expanded = row.expand(4, 30)  # stride 0: overlapping memory
    torch.testing.assert_close(shardkl.exact_kl(expanded, b[:4]), reference(expanded, b[:4])["exact_kl"].float())
    at, bt = a.t().contiguous().t(), b.t().contiguous().t()  # vocabulary dimension with stride != 1
    assert at.stride(-1) != 1
    torch.testing.assert_close(shardkl.exact_kl(at, bt), reference(a, b)["exact_kl"].float())
    x = at.clone().requires_grad_()
    shardkl.exact_kl(x, bt, reduction="sum").backward()
    assert x.grad.shape == a.shape and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        (lambda a: shardkl.exact_kl(a, a.to("meta")), ValueError, "one device"),
        (lambda a: shardkl.Options(nan_policy="ignore"), ValueError, "nan_policy must be one of"),
        (lambda a: shardkl.Options(validate="yes"), TypeError, "validate must be a bool"),
        (lambda a: shardkl.Options(timeout_s=0), ValueError, "timeout must be a finite number of seconds > 0"),
        (lambda a: shardkl.exact_kl(a, a, options={"impl": "eager"}), TypeError, "options must be a shardkl.Options"),
        (lambda a: shardkl.VocabLayout(0, 40, vocab_size=39), ValueError, "vocab_size must be >= 40"),
        (lambda a: shardkl.exact_kl(a, a, layout=shardkl.VocabLayout(0, 41)), ValueError, "holds ids \\[0, 41\\)"),
        (lambda a: shardkl.exact_kl(a, a, temperature=float("nan")), ValueError, "temperature"),
        (lambda a: shardkl.exact_kl(a, a, temperature="1"), TypeError, "temperature must be a positive number"),
        (lambda a: shardkl.exact_kl(a.numpy(), a), TypeError, "p_logits must be a torch.Tensor"),
        (lambda a: shardkl.exact_kl(a, None), TypeError, "q_logits must be a torch.Tensor"),
        (lambda a: shardkl.exact_kl(a[0, 0], a[0, 0]), ValueError, "at least 1-D"),
        (lambda a: shardkl.exact_kl(a, a, layout=shardkl.VocabLayout(0, 40, vocab_size=41)), ValueError,
         "hold 40 ids, but the layout declares vocab_size=41"),
        (lambda a: shardkl.token_logprobs(a, torch.tensor([0, 1, -1])), ValueError, r"\[0, 40\).*min -1"),
        (lambda a: shardkl.token_logprobs(a, torch.tensor([0.0, 1.0, 2.0])), TypeError, "integer dtype"),
        (lambda a: shardkl.sampled_kl(a, a, torch.zeros(3, dtype=torch.long), estimator="k5"), ValueError,
         "estimator"),
        (lambda a: shardkl.exact_kl(a, a, mask=torch.tensor([1, 0, 3])), ValueError, "only 0 and 1"),
        (lambda a: shardkl.exact_kl(a, a, reduction="batchmean"), ValueError, "reduction must be one of"),
        (lambda a: shardkl.exact_kl(a, a, group=object()), ValueError, "torch.distributed is not initialized"),
    ],
)
def test_bad_inputs_name_the_argument(call, error, text) -> None:
    a, _ = _pair()
    with pytest.raises(error, match=text):
        call(a)


def test_declared_vocab_size_that_matches_passes() -> None:
    a, b = _pair()
    layout = shardkl.VocabLayout.full(40)
    torch.testing.assert_close(shardkl.exact_kl(a, b, layout=layout), shardkl.exact_kl(a, b))


def test_messages_name_the_argument_as_the_caller_wrote_it() -> None:
    a = torch.zeros(2, 5)
    b = a.clone()
    b[1, 2] = float("nan")
    with pytest.raises(ValueError, match="^logits holds NaN"):
        shardkl.entropy(b)
    # jsd at beta = 1 is KL(Q||P): the engine runs with the inputs exchanged, the message still says q_logits
    with pytest.raises(ValueError, match="^q_logits holds NaN"):
        shardkl.jsd(a, b, beta=1.0)
    with pytest.raises(ValueError, match="^q_logits holds NaN"):
        shardkl.jsd(a, b, beta=0.0)


@pytest.fixture
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of shardkl's warn-once warnings may be given again in this test."""
    from shardkl import _validation

    monkeypatch.setattr(_validation, "_warned_probabilities", False)
    monkeypatch.setattr(_validation, "_warned_no_process_group", False)


@pytest.mark.usefixtures("_fresh_warnings")
def test_several_ranks_without_a_process_group_warn_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # torchrun set WORLD_SIZE but init_process_group was forgotten: group is None (dist.group.WORLD too)
    monkeypatch.setenv("WORLD_SIZE", "2")
    a, b = _pair()
    with pytest.warns(UserWarning, match="WORLD_SIZE=2 says this process is one of 2 ranks.*init_process_group"):
        shardkl.exact_kl(a, b, group=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        shardkl.exact_kl(a, b)
        # and the range error of a token from another rank's slice says the same
        with pytest.raises(ValueError, match=r"tokens must be ids in \[0, 40\).*WORLD_SIZE=2.*each rank computed"):
            shardkl.kl_stats(a, b, torch.tensor([3, 45, 7]))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match=r"got min 3 and max 45$"):
        shardkl.kl_stats(a, b, torch.tensor([3, 45, 7]))


def _probabilities(vocab: int = 1000, rows: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2, -1)


@pytest.mark.usefixtures("_fresh_warnings")
@pytest.mark.parametrize(
    ("call", "name"),
    [
        # P as probabilities, its first row a masked one (all -inf: the old check read only that row)
        (lambda p, logits: shardkl.exact_kl(torch.cat([torch.full((1, 1000), -math.inf), p[1:]]), logits),
         "p_logits"),
        # Q as probabilities (KL 0.498 for 0.126 before), and at a temperature
        (lambda p, logits: shardkl.exact_kl(logits, p), "q_logits"),
        (lambda p, logits: shardkl.jsd(logits, p, temperature=0.7), "q_logits"),
        (lambda p, logits: shardkl.entropy(p.bfloat16()), "logits"),
        (lambda p, logits: shardkl.topk_kl(p, torch.zeros(6, 1, dtype=torch.long), torch.full((6, 1), -1.0)),
         "student_logits"),
    ],
)
def test_probabilities_passed_as_logits_warn_for_either_input_whatever_the_first_row(call, name) -> None:
    p = _probabilities()
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=f"{name}.*look like probabilities|{name} looks like probabilities"):
        call(p, logits)


@pytest.mark.usefixtures("_fresh_warnings")
def test_logits_that_are_not_probabilities_never_warn() -> None:
    g = torch.Generator().manual_seed(2)
    cases = [
        torch.randn(8, 1000, generator=g),
        torch.zeros(8, 1000),  # a zero-initialised head: log-sum-exp log V exactly, below the band
        torch.log_softmax(torch.randn(8, 1000, generator=g), -1),  # log-probabilities are fine
        torch.randn(8, 1000, generator=g) * 1e-3,
        torch.rand(8, 1000, generator=g),  # in [0, 1] but not summing to 1
        torch.randn(8, 64, generator=g) * 0.2,  # a tiny vocabulary of a tiny model: some rows fall into the band
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x in cases:
            shardkl.exact_kl(x, x.flip(0))
            shardkl.entropy(x, temperature=0.5)


def _probabilities_on_ranks(rank: int, world: int) -> None:
    from shardkl import _validation

    layout = shardkl.VocabLayout.split(1000, dist.group.WORLD)
    cols = slice(layout.start, layout.stop)
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1))
    p = _probabilities()
    # probabilities of the whole vocabulary, sharded: no slice looks like probabilities, the merged rows do
    _validation._warned_probabilities = False
    with pytest.warns(UserWarning, match="q_logits look like probabilities over the whole vocabulary"):
        shardkl.exact_kl(logits[:, cols], p[:, cols], layout=layout)
    # a softmax taken over each rank's slice
    _validation._warned_probabilities = False
    with pytest.warns(UserWarning, match=r"p_logits looks like probabilities over the vocabulary slice of rank\(s\)"):
        shardkl.exact_kl(torch.softmax(logits[:, cols], -1), logits[:, cols], layout=layout)
    # logits: nothing
    _validation._warned_probabilities = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shardkl.exact_kl(logits[:, cols], logits.flip(0)[:, cols], layout=layout)


def test_probabilities_are_caught_over_the_whole_vocabulary_and_over_each_ranks_slice() -> None:
    run_ranks(_probabilities_on_ranks, 2)
