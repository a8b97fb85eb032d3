"""`pipeline:` — what `imat pipeline` runs beyond the required steps."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from imat.config.base import Section


class PipelineConfig(Section):
    progress: bool = True  # progress bars in every step (`imat pipeline --no-progress` sets false)
    baseline: bool = False  # also train the student alone (method ce) for the comparison table
    download_workers: int = Field(32, ge=1)
    download_max_side: int | None = Field(None, ge=8)
    audit_top: int = Field(48, ge=0)  # most suspicious training labels in the audit gallery; 0 skips it
    speed_images: int = Field(256, ge=8)  # images timed per model for the results table's images/s
    # which trained student is exported and submitted: best = the lowest validation error on
    # submit.select_by among the run's students (ties: the distilled one); distilled/baseline force one
    submit_model: Literal["distilled", "baseline", "best"] = "best"
