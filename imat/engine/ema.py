"""Exponential moving average of a model's weights: timm's ``ModelEmaV3`` (parameters and float
buffers, foreach lerp, bf16 stochastic rounding), with its decay warm-up on and an update count kept
here so that the whole EMA state (weights and count) is a plain state dict in ``last.ckpt`` and resumes
exactly. Warm-up: ``decay_n = min(decay, 1 - (1 + n) ** -2/3)`` for the n-th update after the first
(which copies the model), so a short run's EMA is not mostly the random initialisation.
"""

from __future__ import annotations

from typing import Any

from timm.utils import ModelEmaV3
from torch import nn


class ModelEma(ModelEmaV3):
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__(model, decay=float(decay), use_warmup=warmup)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        return self.get_decay(self.updates + 1)

    def update(self, model: nn.Module, step: int | None = None) -> None:  # type: ignore[override]
        """Blend ``model``'s current weights in (integer buffers such as BN counters are copied)."""
        self.updates += 1
        super().update(model, step=self.updates if step is None else step)

    def ema_state(self) -> dict[str, Any]:
        """Weights + update count, for the checkpoint."""
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_ema_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
