"""What every distillation task shares: the hard-label loss, the student, the frozen teachers' placement
and consistent mixing. Each method's task lives in its own file under :mod:`distill.methods`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.teachers_runtime import FrozenTeacher
from imat.engine.task import Task


def hard_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy on the labelled rows: class indices with -1 for "no label" (extra images), or a label
    mass matrix from :func:`imat.data.mixing.mix_with_unlabelled` whose rows sum to each image's labelled
    share (a half-unlabelled mixed image counts half). Zero when nothing in the batch has a label."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if labels.dim() == 2:
        mass = labels.float().sum(-1, keepdim=True)
        if float(mass.sum()) <= 0:
            return logp.new_zeros(())
        target = (1 - smoothing) * labels.float() + smoothing / labels.shape[-1] * mass
        return -(target * logp).sum() / mass.sum()
    if not bool((labels >= 0).any()):
        return logp.new_zeros(())
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing, ignore_index=-1)


@contextlib.contextmanager
def frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Temporarily stop gradients into ``modules``' parameters (the student step must not train D)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


class DistillTaskBase(Task):
    """What every distillation task shares: the student, the frozen teachers' placement, defaults, and
    consistent teaching: ``mixup`` (see :func:`imat.data.mixing.build_label_mass_mixup`) mixes the batch
    once in :meth:`mixed`, before any network sees it, so every teacher scores exactly the image the
    student trains on (Beyer et al., CVPR 2022)."""

    manual_optimization = False

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, mixup: Any = None) -> None:
        super().__init__(model)
        self.label_smoothing = label_smoothing
        self.mixup = mixup

    def mixed(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with mixed images and a label-mass matrix, or unchanged without mixup."""
        if self.mixup is None:
            return batch
        from imat.data.mixing import mix_with_unlabelled

        images, labels = mix_with_unlabelled(self.mixup, batch["image"], batch["label"])
        return {**batch, "image": images, "label": labels}

    def frozen_teachers(self) -> list[FrozenTeacher]:
        """Teachers to move with the task (never checkpointed, never put in train mode by the engine)."""
        return []

    def to(self, device: torch.device, memory_format: torch.memory_format | None = None) -> Task:
        super().to(device, memory_format)
        for t in self.frozen_teachers():
            t.to(device)
            if memory_format is not None:
                t.model.to(memory_format=memory_format)
        return self

    @staticmethod
    def _autocast(ctx: Any) -> contextlib.AbstractContextManager:
        fn = getattr(ctx, "autocast", None)
        return fn() if fn is not None else contextlib.nullcontext()
