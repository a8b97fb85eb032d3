"""Batch-level Mixup / CutMix (timm), safe for the odd-sized batches that skipped images produce."""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from imat.config.train import AugConfig


class OddSafeMixup(Mixup):
    """timm's Mixup, which asserts an even batch; here an odd batch mixes all but its last sample and
    gives that one its (label-smoothed) one-hot target. Returns (images, soft targets B x K)."""

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(x)
        if n % 2 == 0:
            return super().__call__(x, target)
        if n == 1:
            return x, mixup_target(target, self.num_classes, 1.0, self.label_smoothing)
        head_x, head_t = super().__call__(x[:-1], target[:-1])
        tail_t = mixup_target(target[-1:], self.num_classes, 1.0, self.label_smoothing)
        return torch.cat([head_x, x[-1:]]), torch.cat([head_t, tail_t.to(head_t.dtype)])


def build_mixup(aug: AugConfig, num_classes: int) -> Mixup | None:
    """A Mixup/CutMix callable from the recipe, or None when both alphas are 0 (then plain labels and
    ``label_smoothing`` belong in the loss)."""
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return None
    return OddSafeMixup(
        mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix,
        prob=aug.mix_prob,
        label_smoothing=aug.label_smoothing,
        num_classes=int(num_classes),
    )


def build_label_mass_mixup(aug: AugConfig, num_classes: int) -> OddSafeMixup | None:
    """Mixup/CutMix for batches that may hold unlabelled rows (label -1, e.g. distillation's extra images).

    It mixes over ``num_classes + 1`` classes, the last one standing for "no label", without smoothing:
    column ``num_classes`` of its targets is the share of each mixed image that came from an unlabelled
    image, the other columns the label mass. :func:`mix_with_unlabelled` applies it; the loss applies the
    smoothing (linear in the mix, so the result equals timm's for fully labelled batches)."""
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return None
    return OddSafeMixup(
        mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix,
        prob=aug.mix_prob,
        label_smoothing=0.0,
        num_classes=int(num_classes) + 1,
    )


def mix_with_unlabelled(
    mixup: OddSafeMixup, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, label mass B x K): rows sum to the labelled share of each mixed image (1 when both
    images had labels, 0 when neither had)."""
    k = mixup.num_classes - 1
    code = torch.where(labels >= 0, labels, torch.full_like(labels, k))
    mixed, targets = mixup(images, code)
    return mixed, targets[:, :k]
