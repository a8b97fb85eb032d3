"""KD (Hinton et al. 2015): the student matches the pool's mean probabilities at temperature T, plus a
share of the hard labels. The soft targets come from the live teachers or from the offline cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from distill.losses import soft_cross_entropy, teacher_probs
from distill.methods.base import DistillMethod, MethodInputs, register_method
from distill.tasks import DistillTaskBase, hard_loss
from distill.teachers_runtime import FrozenTeacher, TeacherEnsemble
from imat.config.distill import DistillConfig
from imat.errors import ImatError


class SoftTargets:
    """Where the teachers' soft labels come from: the live frozen ensemble, or the offline cache."""

    def __init__(
        self,
        ensemble: TeacherEnsemble | None,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        cache: Any = None,
    ) -> None:
        if ensemble is None and cache is None:
            raise ValueError("soft targets need teachers or a cache")
        self.ensemble = ensemble
        self.cache = cache
        self.mean = tuple(student_mean)
        self.std = tuple(student_std)

    def logits_probs(
        self, batch: dict[str, Any], temperature: float
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(mean teacher logits or None when cached, mean teacher probabilities at T)."""
        if self.cache is not None and "soft_index" in batch:
            probs = self.cache.dense(batch, temperature)
            return None, probs.to(batch["image"].device)
        assert self.ensemble is not None
        chosen = self.ensemble.pick()
        outs = [
            self.ensemble.teachers[i].blocks(batch["image"], ["logits"], self.mean, self.std)[0]
            for i in chosen
        ]
        raw = torch.stack([o.float() for o in outs]).mean(0)
        return raw, teacher_probs(outs, temperature)

    def extras(self) -> dict[str, float]:
        if self.cache is not None:
            return self.cache.pick_counts()
        return self.ensemble.pick_counts() if self.ensemble is not None else {}


class KDTask(DistillTaskBase):
    """Hinton KD from the pool's mean probabilities: alpha * T^2 * soft CE + (1 - alpha) * hard CE."""

    def __init__(
        self,
        model: nn.Module,
        targets: SoftTargets,
        alpha: float = 0.9,
        temperature: float = 4.0,
        label_smoothing: float = 0.0,
        mixup: Any = None,
    ) -> None:
        super().__init__(model, label_smoothing, mixup)
        self.targets = targets
        self.alpha = alpha
        self.temperature = temperature

    def step(self, batch: dict[str, Any], ctx: Any) -> dict[str, torch.Tensor]:
        batch = self.mixed(batch)
        with self._autocast(ctx):
            _, probs = self.targets.logits_probs(batch, self.temperature)
            logits = self.model(batch["image"])
        soft_l = soft_cross_entropy(logits, probs, self.temperature)
        hard = hard_loss(logits, batch["label"], self.label_smoothing)
        total = self.alpha * soft_l + (1 - self.alpha) * hard
        return {"loss": total, "kd_soft": soft_l.detach(), "ce": hard.detach()}

    def frozen_teachers(self) -> list[FrozenTeacher]:
        return self.targets.ensemble.teachers if self.targets.ensemble is not None else []

    def epoch_extras(self) -> dict[str, float]:
        return self.targets.extras()

    def state_dict(self) -> dict[str, Any]:
        e = self.targets.ensemble
        return {"ensemble": e.state_dict()} if e is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.targets.ensemble is not None and "ensemble" in state:
            self.targets.ensemble.load_state_dict(state["ensemble"])


@register_method
class KD(DistillMethod):
    name = "kd"
    uses_cache = True

    @classmethod
    def check(cls, dcfg: DistillConfig) -> None:
        if dcfg.selection == "weighted":
            raise ImatError("distill.selection: kd averages all teachers (mean); weighted is for method=meal")

    @classmethod
    def build_task(cls, dcfg: DistillConfig, inputs: MethodInputs) -> DistillTaskBase:
        mean, std = inputs.student_data["mean"], inputs.student_data["std"]
        return KDTask(
            inputs.student,
            SoftTargets(inputs.ensemble, mean, std, inputs.cache),
            dcfg.kd_alpha,
            dcfg.temperature,
            dcfg.train.aug.label_smoothing,
            inputs.mixup,
        )
