"""CE: the student alone on the (possibly noisy) labels, the baseline every method must beat."""

from __future__ import annotations

from typing import Any

import torch

from distill.methods.base import DistillMethod, MethodInputs, register_method
from distill.tasks import DistillTaskBase, hard_loss
from imat.config.distill import DistillConfig


class CETask(DistillTaskBase):
    """Cross-entropy on the labels (label smoothing and mixup from ``distill.train.aug``)."""

    def step(self, batch: dict[str, Any], ctx: Any) -> dict[str, torch.Tensor]:
        batch = self.mixed(batch)
        with self._autocast(ctx):
            logits = self.model(batch["image"])
        loss = hard_loss(logits, batch["label"], self.label_smoothing)
        return {"loss": loss, "ce": loss.detach()}


@register_method
class CE(DistillMethod):
    name = "ce"
    needs_teachers = False

    @classmethod
    def build_task(cls, dcfg: DistillConfig, inputs: MethodInputs) -> DistillTaskBase:
        return CETask(inputs.student, dcfg.train.aug.label_smoothing, inputs.mixup)
