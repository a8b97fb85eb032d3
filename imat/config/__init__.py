"""Typed, validated configs: one YAML file describes a run; ``k=v`` overrides any key by dotted path."""

from imat.config.audit import AuditConfig
from imat.config.data import CleanConfig, DataConfig, LabelNoise
from imat.config.distill import AdversarialConfig, BlockSpec, CacheConfig, DistillConfig
from imat.config.loader import apply_override, load_config, read_yaml, save_resolved, to_dict, validate
from imat.config.models import ModelSpec
from imat.config.pipeline import PipelineConfig
from imat.config.root import RunConfig
from imat.config.stages import ExportConfig, SubmitConfig, TuneConfig
from imat.config.teachers import TeachersConfig, TeacherSpec, deep_merge
from imat.config.train import AugConfig, TrainConfig

__all__ = [
    "AdversarialConfig",
    "AuditConfig",
    "AugConfig",
    "BlockSpec",
    "CacheConfig",
    "CleanConfig",
    "DataConfig",
    "DistillConfig",
    "ExportConfig",
    "LabelNoise",
    "ModelSpec",
    "PipelineConfig",
    "RunConfig",
    "SubmitConfig",
    "TeacherSpec",
    "TeachersConfig",
    "TrainConfig",
    "TuneConfig",
    "apply_override",
    "deep_merge",
    "load_config",
    "read_yaml",
    "save_resolved",
    "to_dict",
    "validate",
]
