"""Float64 full-vocabulary references, written the textbook way with torch.nn.functional."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference(
    p_logits: torch.Tensor, q_logits: torch.Tensor, tokens: torch.Tensor | None = None, temperature: float = 1.0
) -> dict[str, torch.Tensor]:
    """Per-token exact KL(P‖Q), entropy of P and log-probs at tokens, in float64 on the full vocabulary."""
    logp = F.log_softmax(p_logits.double() / temperature, dim=-1)
    logq = F.log_softmax(q_logits.double() / temperature, dim=-1)
    # kl_div is p * (log p - log q), which is 0 * -inf = NaN where p = 0; those terms are 0
    pointwise = F.kl_div(logq, logp, log_target=True, reduction="none")
    out = {
        "exact_kl": torch.where(logp == float("-inf"), 0.0, pointwise).sum(-1),
        "entropy": -(logp.exp() * torch.where(logp.exp() > 0, logp, 0)).sum(-1),
    }
    if tokens is not None:
        out["p_logprobs"] = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        out["q_logprobs"] = logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return out
