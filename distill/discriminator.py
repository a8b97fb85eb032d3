"""One discriminator per matched block: a small MLP that tells teacher vectors from student vectors.

d -> d/2 -> d/4 -> 1 logit by default (the paper's widths), ReLU between layers but NOT after the last
one: the official code's final ReLU made the logit >= 0, so its discriminator could never say "student"
with p < 0.5. Trained with BCE-with-logits, teacher = 1, student = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Discriminator(nn.Module):
    def __init__(self, dim: int, widths: Sequence[int] | None = None) -> None:
        super().__init__()
        hidden = list(widths) if widths is not None else [max(1, dim // 2), max(1, dim // 4)]
        layers: list[nn.Module] = []
        prev = dim
        for w in hidden:
            layers += [nn.Linear(prev, w), nn.ReLU(inplace=True)]
            prev = w
        layers.append(nn.Linear(prev, 1))
        self.net = nn.Sequential(*layers)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B,) logits of "this vector came from a teacher"."""
        return self.net(x.float()).squeeze(-1)


def bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def discriminator_loss(d: Discriminator, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """BCE(D(teacher), 1) + BCE(D(student), 0), each a batch mean."""
    return bce(d(teacher), 1.0) + bce(d(student), 0.0)


@torch.no_grad()
def accuracy(d: Discriminator, teacher: torch.Tensor, student: torch.Tensor) -> tuple[float, float]:
    """Fraction of teacher vectors called teacher, and of student vectors called student."""
    return float((d(teacher) > 0).float().mean()), float((d(student) <= 0).float().mean())
