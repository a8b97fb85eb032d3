"""Gradient reversal (DANN): identity forward, gradient multiplied by -lambda backward.

Put in front of a discriminator, one backward pass trains the discriminator to separate teacher from
student while the student receives the reversed gradient, i.e. it learns to look like the teacher.
A static autograd Function (MEAL's legacy non-static one fails on PyTorch >= 1.5).
"""

from __future__ import annotations

import torch


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.lambd * grad, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """``x`` forward; ``-lambd * grad`` backward."""
    return GradReverse.apply(x, lambd)
