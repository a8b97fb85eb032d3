"""How a timm network is described in a config (teachers and the student alike)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from imat.config.base import Section


class ModelSpec(Section):
    arch: str  # any timm model name, e.g. resnet18, mobilenetv3_small_100, convnext_atto
    input_size: int = Field(224, ge=8)
    mean: tuple[float, float, float] | None = None  # default: timm's pretrained_cfg for the arch
    std: tuple[float, float, float] | None = None
    crop_pct: float = Field(0.875, gt=0, le=1)  # eval transform: resize to size/crop_pct, centre crop
    pretrained: str | None = None  # a local weights file (safetensors / state dict) or "hub" when online
    drop_rate: float = Field(0.0, ge=0, lt=1)
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    model_kwargs: dict[str, Any] = {}
