"""Exponential moving average of a model's weights (parameters and float buffers).

A small own class instead of timm's ModelEmaV3 so that its whole state (weights and update count) is a
plain state dict that goes into ``last.ckpt`` and resumes bit-for-bit. The decay warms up as
``min(decay, (1 + n) / (10 + n))`` (n = updates so far): with a fixed 0.999 a short run's EMA would
still be mostly the random initialisation.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = warmup
        self.updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend ``model``'s current weights in; integer buffers (BN counters) are copied."""
        d = self.current_decay()
        ema_floats, model_floats = [], []
        for ema_v, model_v in zip(
            self.module.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if ema_v.dtype.is_floating_point:
                ema_floats.append(ema_v)
                model_floats.append(model_v.detach())
            else:
                ema_v.copy_(model_v)
        if ema_floats:
            torch._foreach_lerp_(ema_floats, model_floats, 1.0 - d)
        self.updates += 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def ema_state(self) -> dict[str, Any]:
        """Weights + update count, for the checkpoint."""
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_ema_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
