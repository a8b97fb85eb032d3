"""Rebuild a trained network from a ``best.safetensors`` checkpoint and its ``imat`` metadata.

The checkpoint is self-describing (imat.weights): arch, class count, input size, normalisation and the
class map travel inside it, so exporting needs no config and no training code."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imat.errors import ImatError
from imat.manifest import ClassMap
from imat.weights import load_weights

REQUIRED_META = ("arch", "num_classes", "input_size", "mean", "std")
# Wrappers that add a prefix to every key: DDP, torch.compile, and an EMA copy saved as a module.
_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class Preprocess:
    """What the eval transform needs: the same numbers at export, verification and prediction."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any], source: str) -> Preprocess:
        try:
            size = meta["input_size"]
            # timm style (3, H, W) or a plain int
            size = int(size[-1]) if isinstance(size, list | tuple) else int(size)
            mean = tuple(float(v) for v in meta["mean"])
            std = tuple(float(v) for v in meta["std"])
            crop = float(meta.get("crop_pct") or 0.875)
        except (KeyError, TypeError, ValueError) as exc:
            raise ImatError(
                f"{source}: bad preprocessing metadata ({exc.__class__.__name__}: {exc})"
            ) from None
        if len(mean) != 3 or len(std) != 3:
            raise ImatError(f"{source}: mean and std must have 3 values, got {list(mean)} and {list(std)}")
        return cls(size, mean, std, crop)  # type: ignore[arg-type]


def _strip_prefixes(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix when it makes the keys match the bare model's."""
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix) :]: v for k, v in state.items()}
            if set(stripped) & wanted and not set(state) & wanted:
                state = stripped
    return state


def class_map_from_meta(meta: dict[str, Any], num_classes: int, source: str) -> ClassMap:
    """The checkpoint's ClassMap; an identity map (0..K-1) when the checkpoint carries none."""
    classes = meta.get("classes")
    if not classes:
        return ClassMap([str(i) for i in range(num_classes)], [], "int")
    try:
        cmap = ClassMap(
            list(classes["source_labels"]), list(classes.get("names", [])), classes.get("label_type", "str")
        )
    except (KeyError, TypeError) as exc:
        raise ImatError(f"{source}: bad class map in metadata ({exc})") from None
    if cmap.num_classes != num_classes:
        raise ImatError(
            f"{source}: class map has {cmap.num_classes} classes but the model has num_classes={num_classes}"
        )
    return cmap


def load_checkpoint(
    path: str | os.PathLike[str],
) -> tuple[nn.Module, dict[str, Any], Preprocess, ClassMap]:
    """(model in eval mode on CPU, raw meta, preprocessing, class map) from a safetensors checkpoint.

    Every problem (not safetensors, no metadata, unknown arch, keys or shapes from another model) is a
    one-line ImatError naming the file."""
    import timm

    p = Path(path)
    state, meta = load_weights(p)
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ImatError(
            f"{p}: checkpoint metadata lacks {', '.join(missing)} (not an imat best.safetensors?)"
        )
    arch = str(meta["arch"])
    try:
        num_classes = int(meta["num_classes"])
    except (TypeError, ValueError):
        raise ImatError(f"{p}: num_classes={meta['num_classes']!r} is not an integer") from None
    if not timm.is_model(arch):
        raise ImatError(f"{p}: unknown model arch {arch!r} (not a timm model name)")
    kwargs = dict(meta.get("model_kwargs") or {})
    for key in ("pretrained", "num_classes"):
        kwargs.pop(key, None)
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ImatError(f"{p}: cannot build {arch} with model_kwargs {kwargs}: {exc}") from None
    wanted = set(model.state_dict())
    state = _strip_prefixes(state, wanted)
    extra = sorted(set(state) - wanted)
    lacking = sorted(wanted - set(state))
    if extra or lacking:
        shown = (lacking or extra)[:3]
        raise ImatError(
            f"{p}: checkpoint does not match {arch} with {num_classes} classes "
            f"({len(lacking)} missing, {len(extra)} unexpected keys, e.g. {', '.join(shown)})"
        )
    own = model.state_dict()
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ImatError(
                f"{p}: {key} has shape {tuple(tensor.shape)} but {arch} with {num_classes} classes "
                f"expects {tuple(own[key].shape)} (checkpoint from another model?)"
            )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, meta, Preprocess.from_meta(meta, str(p)), class_map_from_meta(meta, num_classes, str(p))
