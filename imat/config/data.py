"""`data:` — where the competition's files and images are, and how they are read."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from imat.config.base import Section


class LabelNoise(Section):
    """Corrupt a fraction of training labels, for noisy-label experiments (seeded, reproducible)."""

    fraction: float = Field(0.0, ge=0.0, le=1.0)
    kind: Literal["symmetric", "pair"] = "symmetric"
    seed: int = 0


class CleanConfig(Section):
    """Repair the training labels from a label audit before any teacher or student sees them.

    ``from`` is an audit CSV (``imat data audit``'s ``audit.csv``) or ``audit``: this run's own
    cross-fitted audit, RUN_DIR/audit/audit.csv, which ``imat pipeline`` then produces before the
    teachers. ``top``: the N lowest-quality labels, or ``auto``: those cleanlab flags as label issues."""

    # "from" is a Python keyword: the field is from_ in code, from in YAML and in the resolved config
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    from_: str | None = Field(None, alias="from")
    action: Literal["drop", "relabel", "downweight"] = "drop"
    top: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    weight: float = Field(0.1, gt=0.0, lt=1.0)  # downweight: a flagged image is sampled this much as often

    @property
    def enabled(self) -> bool:
        return bool(self.from_) and self.top != 0


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
    clean: CleanConfig = CleanConfig()
