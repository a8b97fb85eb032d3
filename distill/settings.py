"""Settings derived from a run's config that both the training step and the teacher cache read: where
the teacher pool is and how teachers are picked per batch. Kept apart from :mod:`distill.train` so
:mod:`distill.cache` needs nothing from it (train uses the cache, never the reverse)."""

from __future__ import annotations

from pathlib import Path

from imat.config import RunConfig
from imat.config.distill import DistillConfig


def pool_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.distill.pool) if cfg.distill.pool else cfg.pool_dir


def default_selection(dcfg: DistillConfig) -> str:
    if dcfg.selection is not None:
        return dcfg.selection
    return "random" if dcfg.method == "meal" else "mean"
