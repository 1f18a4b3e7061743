"""The two models of an audit: checked before any work, loaded per rank, with this rank's rows of the output layer.

Checks (:func:`inspect_pair`, on every rank before any process group, no weights loaded): both directories hold a
readable config, tokenizer and weight files; the two tokenizers are the same; each output layer has at least the
tokenizer's ids (rows beyond them are padding, dropped); the logits are the output layer's alone (no soft-capping or
scaling); the context fits both models.

Loading (:func:`load_side`) has two modes, the same numbers up to float32 rounding:

- **replicated**: every rank holds the whole model and keeps a view of its rows ``[start, stop)`` of the output
  layer, a balanced split of the real ids over the tensor-parallel group (no padding row is ever read);
- **tensor_parallel**: transformers loads the model with its own ``tp_plan`` over the tensor-parallel group, so the
  trunk's weights and work are split too; the output layer becomes a DTensor sharded ``Shard(0)`` over its
  (possibly padded) rows, whose local rows shardkl takes as they are, with ``valid_vocab_size`` dropping the padding.
  transformers builds its mesh over all ranks, so this mode needs one tensor-parallel group (no data parallelism).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from shardkl.apps.audit.corpus import AuditInputError
from shardkl.integrations.hf import linear_head_problem, linear_logits
from shardkl.layout import VocabLayout

LoadMode = Literal["replicated", "tensor_parallel"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def quiet_transformers() -> None:
    """transformers' own warnings and progress bars off (a launcher's stderr is its own lines and the bar)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module=r"transformers\..*")


@contextlib.contextmanager
def _quiet_output() -> Iterator[None]:
    """Swallow what a library prints to stdout/stderr while loading (kept only to name a failure)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = text if len(text) <= 240 else text[:237] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class ModelInfo:
    """What the checks read from one model directory.

    Attributes:
        path: the directory.
        config: its transformers config.
        rows: rows of its output layer (``vocab_size`` of its text config).
        tp_plan: whether transformers can load it tensor-parallel for a group of the size asked for.
    """

    path: str
    config: Any
    rows: int
    tp_plan: bool


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _check_weights(name: str, path: Path) -> None:
    """A weight file exists and each safetensors header reads (a truncated or corrupt file fails here)."""
    files = sorted({f for pattern in _WEIGHTS for f in path.glob(pattern)})
    if not files:
        raise AuditInputError(f"{name}: no weights in {path} (expected model.safetensors or pytorch_model.bin)")
    from safetensors import safe_open

    for file in files:
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), "pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
            raise AuditInputError(f"{name}: cannot read the weights {file}: {_first_line(exc)}") from None


def _tp_capable(config: Any, tp: int) -> bool:
    """transformers has a tensor-parallel plan for the architecture and its heads and widths split over ``tp``."""
    text = _text_config(config)
    if tp <= 1 or not getattr(text, "base_model_tp_plan", None):
        return False
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    widths = [heads, kv_heads, getattr(text, "intermediate_size", None)]
    return all(isinstance(w, int) and w % tp == 0 for w in widths)


def inspect_model(name: str, path: str, *, trust_remote_code: bool, context: int, tp: int) -> tuple[ModelInfo, Any]:
    """Read and check one model directory: config, tokenizer, weight files (no weights are loaded).

    Args:
        name: ``"p_model"`` or ``"q_model"``, for the messages.
        path: the directory.
        trust_remote_code: passed to transformers.
        context: the window length, checked against ``max_position_embeddings``.
        tp: ranks per tensor-parallel group.

    Returns:
        ``(ModelInfo, tokenizer)``.

    Raises:
        AuditInputError: one line naming the directory and the problem.
    """
    from transformers import AutoConfig, AutoTokenizer

    directory = Path(path)
    if not directory.exists():
        raise AuditInputError(f"{name}: no such directory: {path}")
    if not directory.is_dir():
        raise AuditInputError(f"{name}: {path} is not a directory (expected a Hugging Face model folder)")
    try:
        with _quiet_output():
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, JSONDecodeError, KeyError, ...
        raise AuditInputError(f"{name}: {path} is not a readable Hugging Face model ({_first_line(exc)})") from None
    text = _text_config(config)
    problem = linear_head_problem(text)
    if problem is not None:
        raise AuditInputError(f"{name}: {path}: {problem}")
    rows = getattr(text, "vocab_size", None)
    if not isinstance(rows, int) or rows < 1:
        raise AuditInputError(f"{name}: {path}: its config has no vocab_size (got {rows!r})")
    positions = getattr(text, "max_position_embeddings", None)
    if isinstance(positions, int) and context > positions:
        raise AuditInputError(
            f"{name}: context {context} exceeds the model's max_position_embeddings {positions}; pass --context "
            f"{positions} or less"
        )
    _check_weights(name, directory)
    try:
        with _quiet_output():
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise AuditInputError(f"{name}: cannot load the tokenizer in {path} ({_first_line(exc)})") from None
    return ModelInfo(path, config, rows, _tp_capable(config, tp)), tokenizer


def _tokenizer_difference(p: Any, q: Any) -> str | None:
    """How Q's tokenizer differs from P's, or ``None`` if they map text to the same ids."""
    if len(p) != len(q):
        return f"P's tokenizer has {len(p)} ids, Q's has {len(q)}"
    p_vocab, q_vocab = p.get_vocab(), q.get_vocab()
    if p_vocab != q_vocab:
        for token, index in sorted(p_vocab.items(), key=lambda item: item[1]):
            if q_vocab.get(token) != index:
                return f"token {token!r} is id {index} in P's tokenizer and {q_vocab.get(token)!r} in Q's"
        extra = sorted(set(q_vocab) - set(p_vocab))
        return f"Q's tokenizer has tokens P's lacks (e.g. {extra[0]!r})"
    backends = [getattr(t, "backend_tokenizer", None) for t in (p, q)]
    if all(b is not None for b in backends):
        for part in ("normalizer", "pre_tokenizer"):
            mine, theirs = (repr(getattr(b, part, None).__getstate__()) if getattr(b, part, None) is not None
                            else "none" for b in backends)
            if mine != theirs:
                return f"the tokenizers' {part.replace('_', '-')}s differ"
    return None


def inspect_pair(
    p_model: str, q_model: str, *, trust_remote_code: bool, context: int, tp: int
) -> tuple[ModelInfo, ModelInfo, Any, int]:
    """Check both models (see the module docstring) before any work.

    Args:
        p_model: P's directory.
        q_model: Q's directory.
        trust_remote_code: passed to transformers.
        context: the window length.
        tp: ranks per tensor-parallel group.

    Returns:
        ``(p_info, q_info, tokenizer, vocab_size)``: P's tokenizer and its number of ids (the real vocabulary; output
        rows beyond it are padding).

    Raises:
        AuditInputError: one line naming the model and the problem, with the expected and actual values.
    """
    p_info, p_tokenizer = inspect_model("p_model", p_model, trust_remote_code=trust_remote_code, context=context,
                                        tp=tp)
    q_info, q_tokenizer = inspect_model("q_model", q_model, trust_remote_code=trust_remote_code, context=context,
                                        tp=tp)
    difference = _tokenizer_difference(p_tokenizer, q_tokenizer)
    if difference is not None:
        raise AuditInputError(f"q_model: different vocabularies: {difference}; an audit needs one tokenizer")
    vocab = len(p_tokenizer)
    for name, info in (("p_model", p_info), ("q_model", q_info)):
        if info.rows < vocab:
            raise AuditInputError(
                f"{name}: different vocabularies: the output layer of {info.path} has {info.rows} rows, the "
                f"tokenizer {vocab} ids"
            )
    return p_info, q_info, p_tokenizer, vocab


def load_mode(p_info: ModelInfo, q_info: ModelInfo, *, trunk: str, tp: int, groups: int) -> LoadMode:
    """How the models are loaded (see the module docstring).

    Args:
        p_info, q_info: from :func:`inspect_model`.
        trunk: the ``trunk`` key (``"auto"`` or ``"replicated"``).
        tp: ranks per tensor-parallel group.
        groups: number of data-parallel groups.

    Returns:
        ``"tensor_parallel"`` when ``trunk`` is ``"auto"``, ``tp > 1``, one tensor-parallel group spans every rank,
        and both models have a transformers plan and the same number of output rows; else ``"replicated"``.
    """
    if trunk != "auto" or tp <= 1 or groups != 1:
        return "replicated"
    if p_info.tp_plan and q_info.tp_plan and p_info.rows == q_info.rows:
        return "tensor_parallel"
    return "replicated"


@dataclass(frozen=True)
class ModelSide:
    """One loaded model and this rank's rows of its output layer.

    Attributes:
        model: the ``*ForCausalLM`` module, in eval mode.
        weight: ``[V_local, H]`` this rank's rows of the output layer (a view, never a copy).
        bias: ``[V_local]`` or ``None``.
    """

    model: Any
    weight: Tensor
    bias: Tensor | None


def _local(x: Any) -> Any:
    return x.to_local() if hasattr(x, "to_local") else x


def load_side(
    name: str,
    info: ModelInfo,
    *,
    dtype: str,
    mode: LoadMode,
    layout: VocabLayout | None,
    device: torch.device,
    trust_remote_code: bool,
) -> ModelSide:
    """Load one model for this rank.

    Args:
        name: ``"p_model"`` or ``"q_model"``, for the messages.
        info: from :func:`inspect_model`.
        dtype: ``"float32"`` or ``"bfloat16"``.
        mode: see the module docstring.
        layout: with ``"replicated"``, this rank's slice of the real ids (its rows of the output layer); ``None``
            with ``"tensor_parallel"`` (the rows are the DTensor's).
        device: where the model runs.
        trust_remote_code: passed to transformers.

    Returns:
        :class:`ModelSide`.

    Raises:
        AuditInputError: the weights do not load (one line).
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if mode == "tensor_parallel":
        kwargs.update(_tp_kwargs())
    model: Any
    try:
        with _quiet_output():
            model = AutoModelForCausalLM.from_pretrained(info.path, **kwargs)
    except Exception as exc:
        raise AuditInputError(f"{name}: cannot load the model in {info.path} ({_first_line(exc)})") from None
    model.eval()
    if mode == "replicated":
        model.to(device)
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise AuditInputError(f"{name}: {type(model).__name__} has no linear output layer")
    weight, bias = _local(head.weight), _local(getattr(head, "bias", None))
    rows = int(head.weight.shape[0])
    if rows != info.rows:
        raise AuditInputError(f"{name}: the output layer has {rows} rows but the config says vocab_size={info.rows}")
    if mode == "replicated":
        assert layout is not None
        weight = weight[layout.start : layout.stop]
        bias = None if bias is None else bias[layout.start : layout.stop]
    return ModelSide(model, weight.detach(), None if bias is None else bias.detach())


def _tp_kwargs() -> dict[str, Any]:
    """transformers' tensor-parallel loading: ``distributed_config`` where it exists, else ``tp_plan="auto"``."""
    try:
        from transformers.distributed import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_plan="auto")}
    except ImportError:
        return {"tp_plan": "auto"}


def tp_layout(side: ModelSide, vocab_size: int) -> VocabLayout:
    """This rank's slice of an output layer that transformers loaded tensor-parallel.

    Args:
        side: a model loaded with ``mode="tensor_parallel"``.
        vocab_size: the real vocabulary (rows beyond it are padding).

    Returns:
        ``torch.chunk``'s split of the layer's rows over its mesh's process group, padding dropped by
        ``valid_vocab_size``.
    """
    weight = side.model.get_output_embeddings().weight
    group = weight.device_mesh.get_group()
    return VocabLayout.chunked(int(weight.shape[0]), group, valid_vocab_size=vocab_size)


def hidden_states(side: ModelSide, ids: Tensor) -> Tensor:
    """The trunk's output for a batch.

    Args:
        side: the model.
        ids: ``[B, T]`` token ids.

    Returns:
        ``[B, T, H]`` last hidden states (after the final norm), a plain tensor on this rank.
    """
    return _local(linear_logits(side.model, ids).hidden)


__all__ = [
    "DTYPES",
    "LoadMode",
    "ModelInfo",
    "ModelSide",
    "hidden_states",
    "inspect_model",
    "inspect_pair",
    "load_mode",
    "load_side",
    "quiet_transformers",
    "tp_layout",
]
