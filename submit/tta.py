"""Test-time augmentation at predict time: a horizontal flip and several scales, probabilities averaged.

A scale ``s`` resizes the image's shorter side to ``floor(input_size / crop_pct * s)`` and centre-crops
``input_size``: ``s = 1.0`` is the model's own eval transform, ``s > 1`` looks closer at the centre.
With ``flip`` every scale is also run mirrored. Every view is one forward pass, so a model with
``views`` views costs ``views`` times its single-view compute per image."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imat.errors import ImatError


@dataclass(frozen=True)
class TTA:
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)

    @property
    def views(self) -> int:
        """Forward passes per image."""
        return len(self.scales) * (2 if self.flip else 1)

    @property
    def label(self) -> str:
        """``none``, ``flip``, ``scales 1,1.15`` or ``flip+scales 1,1.15``."""
        parts = ["flip"] if self.flip else []
        if tuple(self.scales) != (1.0,):
            parts.append("scales " + ",".join(f"{s:g}" for s in self.scales))
        return "+".join(parts) or "none"

    def to_dict(self) -> dict[str, Any]:
        return {"flip": self.flip, "scales": list(self.scales), "views": self.views}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TTA:
        d = d or {}
        return make_tta(bool(d.get("flip", False)), d.get("scales"))


def parse_scales(text: str | Sequence[float] | None, source: str = "--tta-scales") -> tuple[float, ...]:
    """``"1.0,1.15"`` (or a list) -> ``(1.0, 1.15)``: positive, no repeats, in the order given."""
    if text is None or text == "":
        return (1.0,)
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        scales = tuple(float(s) for s in items if str(s).strip())
    except ValueError:
        raise ImatError(f"{source}: expected numbers like 1.0,1.15, got {text!r}") from None
    if not scales or any(not np.isfinite(s) or s <= 0 for s in scales):
        raise ImatError(f"{source}: scales must be positive numbers, got {text!r}")
    if len(set(scales)) != len(scales):
        raise ImatError(f"{source}: a scale is repeated in {text!r}")
    return scales


def make_tta(flip: bool = False, scales: str | Sequence[float] | None = None) -> TTA:
    return TTA(bool(flip), parse_scales(scales))


class MultiView:
    """An eval transform that returns every scale's view stacked: ``(views, 3, S, S)`` (picklable, so
    it runs in DataLoader workers and Ray tasks)."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray) -> Any:
        import torch

        return torch.stack([t(image=image)["image"] for t in self.transforms])


def view_transform(desc: dict[str, Any], scales: Sequence[float], normalize: bool = True) -> Any:
    """The eval transform of a model description (``input_size``, ``mean``, ``std``, ``crop_pct``): the
    plain one for scale 1.0 alone, else a :class:`MultiView` of one transform per scale.
    ``normalize=False``: uint8 views, normalised later (Ray's actors)."""
    from imat.data import build_eval_transform

    size, crop = int(desc["input_size"]), float(desc.get("crop_pct", 0.875))
    out = []
    for s in scales:
        if crop / s > 1:
            raise ImatError(
                f"TTA scale {s:g} is below the model's crop_pct {crop:g}: the view would need padding "
                f"(use scales >= {crop:g})"
            )
        out.append(build_eval_transform(size, desc["mean"], desc["std"], crop / s, normalize=normalize))
    if tuple(scales) == (1.0,):
        return out[0]
    return MultiView(out)


def average_views(
    run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, flip: bool, probs_out: bool
) -> np.ndarray:
    """Mean probability over the views of a batch: ``x`` is ``(B, 3, S, S)`` (one scale) or
    ``(B, V, 3, S, S)`` (one view per scale); ``run`` maps a batch to scores (logits unless
    ``probs_out``); ``flip`` adds each view mirrored."""
    from submit.predict import softmax

    views = [x] if x.ndim == 4 else [x[:, v] for v in range(x.shape[1])]
    total: np.ndarray | None = None
    count = 0
    for view in views:
        for mirrored in (False, True) if flip else (False,):
            batch = np.ascontiguousarray(view[..., ::-1] if mirrored else view)
            scores = run(batch)
            p = scores if probs_out else softmax(scores)
            total = p.astype(np.float64) if total is None else total + p
            count += 1
    assert total is not None
    return (total / count).astype(np.float32)
