"""The whole run in one typed object: every command reads the sections it needs."""

from __future__ import annotations

from pathlib import Path

from imat.config.base import Section
from imat.config.data import DataConfig
from imat.config.distill import DistillConfig
from imat.config.pipeline import PipelineConfig
from imat.config.stages import ExportConfig, SubmitConfig, TuneConfig
from imat.config.teachers import TeachersConfig


class RunConfig(Section):
    run_dir: str = "runs/default"
    data: DataConfig = DataConfig()
    teachers: TeachersConfig = TeachersConfig()
    distill: DistillConfig = DistillConfig()
    tune: TuneConfig = TuneConfig()
    export: ExportConfig = ExportConfig()
    submit: SubmitConfig = SubmitConfig()
    pipeline: PipelineConfig = PipelineConfig()

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    @property
    def manifest_path(self) -> Path:
        """Where ``imat data`` / the pipeline's data step writes the run's manifest (``classes.json`` beside it)."""
        return self.run_path / "data" / "manifest.parquet"

    @property
    def pool_dir(self) -> Path:
        return Path(self.teachers.dir) if self.teachers.dir else self.run_path / "teachers"
