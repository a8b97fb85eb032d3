"""`audit:` — the label audit's out-of-sample probabilities: K-fold cross-fitted teachers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from imat.config.base import Section
from imat.config.teachers import TeachersConfig
from imat.config.train import TrainConfig


class AuditConfig(Section):
    """Each training image is scored by teachers that never saw it: the train split is cut into
    ``folds`` stratified folds and each fold's teachers train on the other K-1 (confident learning
    needs out-of-sample probabilities; teachers that memorised a wrong label stop flagging it).

    ``teachers`` is a pool section of its own (``defaults`` + ``pool``) so the audit may use cheap
    teachers and a short recipe; left empty, the run's ``teachers.pool`` recipes are used. Its ``dir``
    is where the fold pools go (default RUN_DIR/audit/folds)."""

    folds: int = Field(2, ge=2)
    """K: each training image is scored by teachers trained on the other K-1 folds."""
    seed: int = 0
    """Seed of the fold assignment."""
    teachers: TeachersConfig = TeachersConfig()
    """The audit's own pool (defaults + pool) of cheap teachers; empty: the teachers.pool recipes."""
    method: Literal["self_confidence", "normalized_margin", "confidence_weighted_entropy"] = "self_confidence"
    """How cleanlab scores each label's quality (get_label_quality_scores)."""
    filter_by: Literal[
        "prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"
    ] = "prune_by_noise_rate"
    """Which labels cleanlab calls issues (find_label_issues)."""

    @model_validator(mode="after")
    def _defaults_need_a_pool(self) -> AuditConfig:
        # defaults apply to this section's own pool; without one the run's teachers.pool recipes are used
        if self.teachers.defaults != TrainConfig() and not self.teachers.pool:
            raise ValueError(
                "audit.teachers.defaults is set but audit.teachers.pool is empty: list the audit's teachers "
                "(or leave audit.teachers out to cross-fit the teachers.pool recipes)"
            )
        return self
