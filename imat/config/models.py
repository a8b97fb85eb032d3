"""How a timm network is described in a config (teachers and the student alike)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from imat.config.base import Section


class ModelSpec(Section):
    """A timm network and its input pipeline."""

    arch: str
    """Any timm model name, e.g. resnet18, mobilenetv3_small_100, convnext_atto."""
    input_size: int = Field(224, ge=8)
    """Training and evaluation input size in pixels (square)."""
    mean: tuple[float, float, float] | None = None
    """Normalisation mean; unset: timm's pretrained_cfg for the arch."""
    std: tuple[float, float, float] | None = None
    """Normalisation standard deviation; unset: timm's pretrained_cfg for the arch."""
    crop_pct: float = Field(0.875, gt=0, le=1)
    """Evaluation transform: resize to input_size / crop_pct, then centre-crop input_size."""
    pretrained: str | None = None
    """Initial weights: a local file (safetensors or state dict), `hub` to download timm's, unset: random."""
    drop_rate: float = Field(0.0, ge=0, lt=1)
    """Dropout before the classifier (timm drop_rate)."""
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    """Stochastic depth rate (timm drop_path_rate)."""
    model_kwargs: dict[str, Any] = {}
    """Extra keyword arguments for timm.create_model, e.g. {channels: [32, 64, 128, 256]}."""
