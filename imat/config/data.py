"""`data:` — where the competition's files and images are, and how they are read."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from imat.config.base import Section


class LabelNoise(Section):
    """Corrupt a fraction of training labels, for noisy-label experiments (seeded, reproducible)."""

    fraction: float = Field(0.0, ge=0.0, le=1.0)
    kind: Literal["symmetric", "pair"] = "symmetric"
    seed: int = 0


class DataConfig(Section):
    train: str | None = None  # any input format of DESIGN.md
    val: str | None = None
    test: str | None = None
    images: str | None = None  # where the images are, or where `imat data download` puts them
    solution: str | None = None  # solution CSV with the test labels, for `imat score`
    format: Literal[
        "auto", "furniture2018", "fashion2018", "product2019", "coco", "imagenet", "imagefolder", "csv"
    ] = "auto"
    decoder: Literal["cv2", "pil"] = "cv2"
    num_workers: int = Field(2, ge=0)
    label_noise: LabelNoise = LabelNoise()
