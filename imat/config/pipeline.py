"""`pipeline:` — what `imat pipeline` runs beyond the required steps."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from imat.config.base import Section


class PipelineConfig(Section):
    """What `imat pipeline` (and `imat demo`) runs beyond the required steps."""

    progress: bool = True
    """Progress bars in every step (`imat pipeline --no-progress` sets false)."""
    baseline: bool = False
    """Also train the student alone (method ce), for the comparison table and the submission choice."""
    download_workers: int = Field(32, ge=1)
    """Concurrent downloads in the data step."""
    download_max_side: int | None = Field(None, ge=8)
    """Shrink downloaded images so their longer side is at most this; unset: keep their size."""
    audit_top: int = Field(48, ge=0)
    """Most suspicious training labels shown in the audit gallery; 0 skips the audit step."""
    speed_images: int = Field(256, ge=8)
    """Images timed per model for the results table's images/s."""
    # best = the lowest validation error on submit.select_by among the run's students (ties: the
    # distilled one); distilled/baseline force one
    submit_model: Literal["distilled", "baseline", "best"] = "best"
    """Which trained student is exported and submitted: the best on validation, or the distilled or baseline one."""
