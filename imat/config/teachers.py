"""`teachers:` — the pool: one entry per teacher, each with its own recipe on top of shared defaults."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field, model_validator

from imat.config.base import Section
from imat.config.models import ModelSpec
from imat.config.train import TrainConfig


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, recursing into nested dicts; neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class TeacherSpec(ModelSpec):
    """One teacher of the pool: a network (a model spec) and its own recipe."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """The teacher's name, also its folder in the pool (letters, digits, `_`, `.`, `-`)."""
    train: TrainConfig = TrainConfig()
    """This teacher's recipe: only what differs from teachers.defaults."""


class TeachersConfig(Section):
    """The teacher pool: one entry per teacher, each with its own recipe on top of shared defaults."""

    dir: str | None = None
    """The pool directory; unset: RUN_DIR/teachers."""
    defaults: TrainConfig = TrainConfig()
    """The recipe every teacher starts from."""
    pool: list[TeacherSpec] = []
    """The teachers, one entry each."""
    tta_flip: bool = False
    """`imat teachers eval`: average each image's scores with its horizontal flip's."""

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, raw: Any) -> Any:
        # Each teacher's `train:` only says what differs from `defaults:`.
        if not isinstance(raw, dict):
            return raw
        defaults = raw.get("defaults") or {}
        pool = raw.get("pool")
        if isinstance(defaults, dict) and isinstance(pool, list):
            raw = dict(raw)
            raw["pool"] = [
                {**entry, "train": deep_merge(defaults, entry.get("train") or {})}
                if isinstance(entry, dict) and isinstance(entry.get("train") or {}, dict)
                else entry
                for entry in pool
            ]
        return raw

    @model_validator(mode="after")
    def _unique_names(self) -> TeachersConfig:
        names = [t.name for t in self.pool]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teacher names must be unique, repeated: {', '.join(dupes)}")
        return self
