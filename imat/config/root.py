"""The whole run in one typed object: every command reads the sections it needs."""

from __future__ import annotations

from pathlib import Path

from pydantic import model_validator

from imat.config.audit import AuditConfig
from imat.config.base import Section
from imat.config.data import DataConfig
from imat.config.distill import DistillConfig
from imat.config.pipeline import PipelineConfig
from imat.config.stages import ExportConfig, SubmitConfig, TuneConfig
from imat.config.teachers import TeachersConfig


class RunConfig(Section):
    """One run: every command reads the sections it needs."""

    run_dir: str = "runs/default"
    """Every output of the run goes under this folder."""
    data: DataConfig = DataConfig()
    """The competition's files and images."""
    teachers: TeachersConfig = TeachersConfig()
    """The teacher pool."""
    distill: DistillConfig = DistillConfig()
    """The student and the distillation."""
    tune: TuneConfig = TuneConfig()
    """The Ray Tune sweep of the distillation."""
    export: ExportConfig = ExportConfig()
    """ONNX export and its verification."""
    submit: SubmitConfig = SubmitConfig()
    """Inference and the submission file."""
    pipeline: PipelineConfig = PipelineConfig()
    """What `imat pipeline` runs beyond the required steps."""
    audit: AuditConfig = AuditConfig()
    """The label audit's cross-fitted teachers."""

    @model_validator(mode="after")
    def _clean_needs_uniform_loader(self) -> RunConfig:
        # downweighting samples flagged images less often; the cached-teacher loader samples uniformly
        if self.data.clean.enabled and self.data.clean.action == "downweight" and self.distill.cache.enabled:
            raise ValueError("data.clean.action downweight does not work with distill.cache.enabled")
        return self

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    @property
    def manifest_path(self) -> Path:
        """Where ``imat data`` / the pipeline's data step writes the run's manifest (``classes.json`` beside it)."""
        return self.run_path / "data" / "manifest.parquet"

    @property
    def audit_dir(self) -> Path:
        """Where ``imat data audit --config`` writes audit.csv, audit.html and audit.json."""
        return self.run_path / "audit"

    @property
    def clean_csv(self) -> Path | None:
        """The audit CSV ``data.clean`` takes its decisions from (``from: audit``: this run's audit)."""
        src = self.data.clean.from_
        if not self.data.clean.enabled or src is None:
            return None
        return self.audit_dir / "audit.csv" if src == "audit" else Path(src)

    @property
    def pool_dir(self) -> Path:
        return Path(self.teachers.dir) if self.teachers.dir else self.run_path / "teachers"
