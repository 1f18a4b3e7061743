"""Float64 full-vocabulary references of the distillation divergences, written the textbook way (differentiable)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _xlogy_sum(w_log: torch.Tensor, m_log: torch.Tensor) -> torch.Tensor:
    """``Σ w (log w − log m)`` over the last dimension with ``0 log 0 = 0``."""
    w = w_log.exp()
    return torch.where(w > 0, w * (w_log - m_log), torch.zeros_like(w)).sum(-1)


def jsd_reference(p_logits: torch.Tensor, q_logits: torch.Tensor, beta: float, temperature: float = 1.0):
    """``β KL(P‖M) + (1−β) KL(Q‖M)`` with ``M = βP + (1−β)Q`` summed in probability space; β = 0 and 1 are KL(P‖Q)
    and KL(Q‖P) (TRL's convention)."""
    log_p = F.log_softmax(p_logits.double() / temperature, -1)
    log_q = F.log_softmax(q_logits.double() / temperature, -1)
    if beta == 0:
        return _xlogy_sum(log_p, log_q)
    if beta == 1:
        return _xlogy_sum(log_q, log_p)
    log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
    return beta * _xlogy_sum(log_p, log_m) + (1 - beta) * _xlogy_sum(log_q, log_m)


def trl_generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature=1.0):
    """TRL's GKD ``generalized_jsd_loss(student, teacher, beta)`` with no reduction, summed over the vocabulary.

    A float64 re-statement of its formula: the mixture in log space, ``log M = logsumexp(log S + log(1−β),
    log T + log β)``, then ``β KL(T‖M) + (1−β) KL(S‖M)`` through ``F.kl_div`` (whose first argument is the log of the
    second distribution of the KL); β = 0 is ``kl_div(log S, log T)`` = KL(T‖S), β = 1 is KL(S‖T).
    """
    log_s = F.log_softmax(student_logits.double() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.double() / temperature, dim=-1)
    if beta == 0:
        per_element = F.kl_div(log_s, log_t, reduction="none", log_target=True)
    elif beta == 1:
        per_element = F.kl_div(log_t, log_s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=log_s.dtype)
        log_m = torch.logsumexp(torch.stack([log_s + torch.log(1 - b), log_t + torch.log(b)]), dim=0)
        per_element = b * F.kl_div(log_m, log_t, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            log_m, log_s, reduction="none", log_target=True
        )
    return per_element.sum(-1)


def bucket_reference(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    direction: str,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL over K + 1 buckets from the full student softmax: ``Σ_b T_b log(T_b/S_b)`` (forward) or
    ``Σ_b S_b log(S_b/T_b)`` (reverse), the tail's student mass a log-sum-exp over the other ids, the teacher's
    ``1 − Σ exp(t)``.

    With K = V there is no tail, and the teacher's log-probs (which sum to 1 only up to their rounding) are
    normalised: the KL between the two full distributions, as shardkl takes a tail within rounding to be empty.
    """
    log_s_all = F.log_softmax(student_logits.double() / temperature, -1)
    if teacher_ids.shape[-1] == student_logits.shape[-1]:
        t_full = teacher_logprobs.double() - torch.logsumexp(teacher_logprobs.double(), -1, keepdim=True)
        log_s_ids = log_s_all.gather(-1, teacher_ids)
        return _xlogy_sum(t_full, log_s_ids) if direction == "forward" else _xlogy_sum(log_s_ids, t_full)
    log_s_ids = log_s_all.gather(-1, teacher_ids)
    in_topk = torch.zeros_like(log_s_all, dtype=torch.bool).scatter(-1, teacher_ids, True)
    log_s_tail = torch.logsumexp(log_s_all.masked_fill(in_topk, float("-inf")), -1, keepdim=True)
    t = teacher_logprobs.double()
    t_tail = (1 - t.exp().sum(-1, keepdim=True)).clamp(min=0)
    log_s = torch.cat([log_s_ids, log_s_tail], -1)
    log_t = torch.cat([t, torch.log(t_tail)], -1)
    return _xlogy_sum(log_t, log_s) if direction == "forward" else _xlogy_sum(log_s, log_t)


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, logprobs)`` of the teacher's k most likely ids, the log-probs under its full distribution."""
    logprobs, ids = F.log_softmax(teacher_logits.double(), -1).topk(k, dim=-1)
    return ids, logprobs


def far_apart_and_padded(a: torch.Tensor, b: torch.Tensor, pad: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of ``[4, V]`` logits whose rows stress the JSD, with a padded tail of ``pad`` ``-inf`` columns in both:
    row 0 P and Q far apart (``|log P - log Q| ~ 200``: ``expm1`` of the short form would overflow), row 1 disjoint
    ``-inf`` columns, row 2 a shared ``-inf`` run."""
    a, b = a.clone(), b.clone()
    a[0, :20] += 200.0
    b[0, 20:] += 200.0
    a[1, 3] = float("-inf")
    b[1, 7] = float("-inf")
    a[2, 5:9] = float("-inf")
    b[2, 5:9] = float("-inf")
    tail = torch.full((a.shape[0], pad), float("-inf"), dtype=a.dtype)
    return torch.cat([a, tail], -1), torch.cat([b, tail], -1)
