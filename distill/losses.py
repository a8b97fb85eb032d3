"""Similarity losses between a student vector and a teacher target, per block.

The teacher target of a block is given twice: ``teacher_raw`` (the raw vector, or the mean of several
teachers' raw vectors) for the L1/L2 losses, and ``teacher_probs`` (softmax at temperature T, or the
mean of several teachers' softmaxes: MEAL v2's ensemble target) for the soft losses. ``ce`` (the
default, as in both MEAL papers) and ``kl`` have the same gradient w.r.t. the student; they differ by
the teacher's entropy, a constant. The soft losses at temperature T are scaled by T^2 so their gradient
magnitude does not shrink as T grows (Hinton et al.).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIMILARITIES = ("ce", "kl", "l1", "l2", "l1_soft", "l2_soft")


def teacher_probs(vectors: list[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Mean over teachers of softmax(v / T): one teacher gives its own softmax."""
    probs = [F.softmax(v.float() / temperature, dim=-1) for v in vectors]
    return torch.stack(probs).mean(0) if len(probs) > 1 else probs[0]


def soft_cross_entropy(
    student: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """-sum_c p_c log softmax(s/T)_c, batch mean, times T^2."""
    logp = F.log_softmax(student.float() / temperature, dim=-1)
    return -(target_probs * logp).sum(-1).mean() * temperature**2


def kl_divergence(
    student: torch.Tensor, target_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p || softmax(s/T)), batch mean, times T^2."""
    logp = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(logp, target_probs, reduction="batchmean") * temperature**2


def similarity(
    kind: str,
    student: torch.Tensor,
    teacher_raw: torch.Tensor,
    target_probs: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """One block's similarity loss (a scalar); ``target_probs`` defaults to softmax(teacher_raw / T)."""
    if kind in ("ce", "kl", "l1_soft", "l2_soft") and target_probs is None:
        target_probs = F.softmax(teacher_raw.float() / temperature, dim=-1)
    if kind == "ce":
        return soft_cross_entropy(student, target_probs, temperature)
    if kind == "kl":
        return kl_divergence(student, target_probs, temperature)
    if kind == "l1":
        return F.l1_loss(student.float(), teacher_raw.float())
    if kind == "l2":
        return F.mse_loss(student.float(), teacher_raw.float())
    if kind in ("l1_soft", "l2_soft"):
        ps = F.softmax(student.float() / temperature, dim=-1)
        fn = F.l1_loss if kind == "l1_soft" else F.mse_loss
        return fn(ps, target_probs)
    raise ValueError(f"unknown similarity {kind!r}; expected one of {', '.join(SIMILARITIES)}")


def kd_loss(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hinton KD: alpha * T^2 * CE(p_T, softmax(s/T)) + (1 - alpha) * CE(y, s). Returns (total, soft, hard)."""
    soft = soft_cross_entropy(student_logits, target_probs, temperature)
    hard = F.cross_entropy(student_logits.float(), labels)
    return alpha * soft + (1 - alpha) * hard, soft, hard
