"""Tiny model pairs, a tokenizer built offline and small corpora for the audit tests (no download).

:func:`make_pair` writes two 2-layer Llamas that share one word-level tokenizer trained on the corpus: P, and Q = P
with every weight perturbed (so the KL is neither 0 nor huge); both output layers are padded with 4 rows beyond the
tokenizer's ids. :func:`reference` computes every per-token value in one process, in float64, from the models' own
full logits: what the audit must reproduce without ever building them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

WORDS = (
    "the a one two red blue green small large old new fast slow model token text word vocabulary shard rank group "
    "window corpus audit mass mode entropy divergence sample estimator exact value log prob quantile mean bias and "
    "or of to in on with from over under is are was were has have can will not every each some many few"
).split()
PAD_ROWS = 4


def corpus_lines(documents: int = 24, seed: int = 0) -> list[str]:
    """``documents`` lines of random words (3 to 40 words each), reproducible."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 41)))) for _ in range(documents)]


def write_corpus(path: Path, lines: list[str], kind: str = "text", key: str = "text") -> Path:
    """Write ``lines`` as a text file, JSONL (``{key: line, "id": i}``) or parquet (a ``key`` column)."""
    if kind == "text":
        path.write_text("\n".join(lines) + "\n")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({key: line, "id": i}) + "\n" for i, line in enumerate(lines)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(lines))), key: lines}), path)
    return path


def make_tokenizer(lines: list[str], extra_words: tuple[str, ...] = ()) -> Any:
    """A word-level tokenizer over the words of ``lines`` (plus ``extra_words``), with ``<unk>`` and a ``<s>``
    that starts every document."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for line in lines for w in line.split()} | set(extra_words))
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>")


def make_model(vocab_rows: int, seed: int, *, perturb_from: Any = None, scale: float = 0.5,
               kv_heads: int = 2) -> Any:
    """A 2-layer Llama with ``vocab_rows`` output rows; with ``perturb_from``, that model's weights plus
    ``scale`` times their standard deviation of Gaussian noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if perturb_from is not None:
        model.load_state_dict(perturb_from.state_dict())
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(noise * scale * parameter.std().clamp_min(1e-3))
    return model


def save(model: Any, tokenizer: Any, path: Path) -> Path:
    """``save_pretrained`` both into ``path``."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_pair(root: Path, lines: list[str], *, scale: float = 0.5) -> tuple[Path, Path]:
    """P and Q (= P perturbed) under ``root/p`` and ``root/q``, one tokenizer, output layers padded by 4 rows."""
    tokenizer = make_tokenizer(lines)
    rows = len(tokenizer) + PAD_ROWS
    p = make_model(rows, 0)
    q = make_model(rows, 1, perturb_from=p, scale=scale)
    return save(p, tokenizer, root / "p"), save(q, tokenizer, root / "q")


def windows_of(ids: list[int], context: int) -> list[tuple[int, list[int]]]:
    """``(start, tokens)`` of a document's windows: ``context`` tokens every ``context - 1``."""
    out, start = [], 0
    while start + 1 < len(ids):
        out.append((start, ids[start : start + context]))
        start += context - 1
    return out


@torch.no_grad()
def reference(p_dir: Path, q_dir: Path, lines: list[str], context: int) -> dict[str, np.ndarray]:
    """Every per-token value from the models' own full logits in float64, one window at a time.

    Returns:
        The audit's columns (``doc``, ``pos``, ``token``, ``kl_pq``, ..., ``top1_q``) sorted by ``(doc, pos)``, and
        ``p_next``/``q_next`` (the probabilities of the actual next token).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(p_dir)
    vocab = len(tokenizer)
    p = AutoModelForCausalLM.from_pretrained(p_dir, dtype=torch.float32).eval()
    q = AutoModelForCausalLM.from_pretrained(q_dir, dtype=torch.float32).eval()
    rows: dict[str, list[Any]] = {k: [] for k in ("doc", "pos", "token", "kl_pq", "kl_qp", "logp_p", "logp_q",
                                                  "entropy_p", "entropy_q", "top1_p", "top1_q")}
    for doc, line in enumerate(lines):
        ids = tokenizer(line)["input_ids"]
        for start, window in windows_of(ids, context):
            x = torch.tensor([window])
            # the padding rows are not real ids: the audit drops them, so does the reference
            a = p(x).logits[0, :-1, :vocab].double().log_softmax(-1)
            b = q(x).logits[0, :-1, :vocab].double().log_softmax(-1)
            nxt = x[0, 1:]
            rows["doc"] += [doc] * len(nxt)
            rows["pos"] += list(range(start, start + len(nxt)))
            rows["token"] += nxt.tolist()
            rows["kl_pq"] += (a.exp() * (a - b)).sum(-1).tolist()
            rows["kl_qp"] += (b.exp() * (b - a)).sum(-1).tolist()
            rows["logp_p"] += a.gather(-1, nxt[:, None])[:, 0].tolist()
            rows["logp_q"] += b.gather(-1, nxt[:, None])[:, 0].tolist()
            rows["entropy_p"] += (-(a.exp() * a).sum(-1)).tolist()
            rows["entropy_q"] += (-(b.exp() * b).sum(-1)).tolist()
            rows["top1_p"] += a.argmax(-1).tolist()
            rows["top1_q"] += b.argmax(-1).tolist()
    return {k: np.asarray(v) for k, v in rows.items()}
