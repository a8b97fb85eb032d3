"""Settings derived from a run's config that both the training step and the teacher cache read: where
the teacher pool is and how teachers are picked per batch. Kept apart from :mod:`distill.train` so
:mod:`distill.cache_build` needs nothing from it (train uses the cache, never the reverse)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from distill.teachers_runtime import FrozenTeacher, accuracy_weights
from imat.config import RunConfig
from imat.config.distill import DistillConfig
from imat.errors import ImatError


def pool_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.distill.pool) if cfg.distill.pool else cfg.pool_dir


def default_selection(dcfg: DistillConfig, teachers: Sequence[FrozenTeacher]) -> str:
    """``distill.selection``, or the method's default (MEAL v1 draws one teacher per step, the others
    average all teachers: ``default_selection`` of each file in :mod:`distill.methods`)."""
    from distill.methods import get_method

    if dcfg.selection is not None:
        return dcfg.selection
    return get_method(dcfg.method).default_selection(dcfg, teachers)


def selection_probabilities(dcfg: DistillConfig, teachers: Sequence[FrozenTeacher]) -> list[float] | None:
    """Weighted selection's drawing probabilities from each teacher's validation top-1 in pool.json."""
    if default_selection(dcfg, teachers) != "weighted":
        return None
    missing = [t.name for t in teachers if t.val_top1 is None]
    if missing:
        raise ImatError(
            f"distill.selection: weighted needs each teacher's validation top-1 in pool.json; "
            f"{', '.join(missing)} has none (run `imat teachers eval`)"
        )
    return accuracy_weights([float(t.val_top1) for t in teachers], dcfg.selection_temperature)  # type: ignore[arg-type]
