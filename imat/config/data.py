"""`data:` — where the competition's files and images are, and how they are read."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from imat.config.base import Section
from imat.data.decode import DEFAULT_MAX_PIXELS


class LabelNoise(Section):
    """Corrupt a fraction of training labels, for noisy-label experiments (seeded, reproducible)."""

    fraction: float = Field(0.0, ge=0.0, le=1.0)
    """Share of training labels to corrupt (0 leaves them as they are)."""
    kind: Literal["symmetric", "pair"] = "symmetric"
    """symmetric: a wrong class drawn uniformly; pair: each class flips to one fixed other class."""
    seed: int = 0
    """Seed of the corruption: the same seed flips the same labels."""


class CleanConfig(Section):
    """Repair the training labels from a label audit before any teacher or student sees them.

    ``from`` is an audit CSV (``imat data audit``'s ``audit.csv``) or ``audit``: this run's own
    cross-fitted audit, RUN_DIR/audit/audit.csv, which ``imat pipeline`` then produces before the
    teachers. ``top``: the N lowest-quality labels, or ``auto``: those cleanlab flags as label issues."""

    # "from" is a Python keyword: the field is from_ in code, from in YAML and in the resolved config
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    from_: str | None = Field(None, alias="from")
    """An audit CSV, or `audit` for this run's own audit; unset: no cleaning."""
    action: Literal["drop", "relabel", "downweight"] = "drop"
    """What happens to a flagged label: dropped, relabelled to the suggested class, or sampled less often."""
    top: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    """Which labels are flagged: the N lowest label qualities, or `auto` for cleanlab's label issues."""
    weight: float = Field(0.1, gt=0.0, lt=1.0)
    """downweight: a flagged image is sampled this much as often as the others."""

    @property
    def enabled(self) -> bool:
        return bool(self.from_) and self.top != 0


class DataConfig(Section):
    """Where the competition's files and images are, and how they are read."""

    train: str | None = None
    """The training split: a competition file, a CSV, an ImageFolder or ImageNet folder (any supported format)."""
    val: str | None = None
    """The validation split, in any supported format; unset: no validation."""
    test: str | None = None
    """The test split to predict and submit, in any supported format."""
    images: str | None = None
    """Where the images are, or where `imat data download` puts them."""
    solution: str | None = None
    """A solution CSV with the test labels, for `imat score`."""
    format: Literal[
        "auto", "furniture2018", "fashion2018", "product2019", "coco", "imagenet", "imagefolder", "csv"
    ] = "auto"
    """The input format; auto detects it from the files' keys and layout."""
    decoder: Literal["cv2", "pil"] = "cv2"
    """The JPEG/PNG decoder (cv2 measured faster; docs/BENCHMARKS.md, Data loader)."""
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, le=2 * DEFAULT_MAX_PIXELS)
    """Larger images (by their header) are skipped and counted, never decoded (PIL refuses over 2x)."""
    draft: bool = True
    """Decode big JPEGs at 1/2, 1/4 or 1/8 scale (DCT scaling), keeping the detail the crops use."""
    decode: Literal["cpu", "gpu"] = "cpu"
    """gpu: the training device decodes, crops, flips and normalises JPEG batches (light/none presets)."""
    num_workers: int = Field(2, ge=0)
    """DataLoader worker processes per rank (0: decode in the training process)."""
    label_noise: LabelNoise = LabelNoise()
    """Corrupt training labels on purpose, for noisy-label experiments."""
    clean: CleanConfig = CleanConfig()
    """Repair training labels from a label audit, for teachers and student alike."""
