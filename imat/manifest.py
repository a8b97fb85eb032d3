"""The manifest: one row per image, the hand-off between reading a competition and everything after.

Columns (docs/ARCHITECTURE.md, File formats): ``image_id`` (str), ``split`` (train/val/test), ``path`` (str, relative to the
images root or absolute), ``label`` (0-based int, -1 when unknown), ``source_label`` (the competition's
own id as a string, "" when unknown), ``url`` (str, "" when none). The class map travels with it as
``classes.json``: index i <-> the competition's label ``source_labels[i]``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from imat.errors import ImatError, require_file
from imat.io import write_json, write_parquet

if TYPE_CHECKING:
    from imat.config import RunConfig

log = logging.getLogger(__name__)

COLUMNS = ["image_id", "split", "path", "label", "source_label", "url"]
SPLITS = ("train", "val", "test")


def _is_int_like(value: str) -> bool:
    try:
        return str(int(value)) == value
    except ValueError:
        return False


@dataclass
class ClassMap:
    """0-based class indices <-> the competition's own label ids, losslessly in both directions.

    Integer-like ids sort numerically (Furniture 1..128 -> 0..127, Product 0..2018 -> itself); other
    ids sort as strings (ImageNet wnids -> the standard class order)."""

    source_labels: list[str]
    names: list[str] = field(default_factory=list)
    label_type: str = "str"  # "int" when every source label is an integer: written back as integers

    def __post_init__(self) -> None:
        self.source_labels = [str(s) for s in self.source_labels]
        self._index = {s: i for i, s in enumerate(self.source_labels)}
        if len(self._index) != len(self.source_labels):
            raise ImatError("class map: repeated source labels")

    @classmethod
    def from_labels(cls, labels: Iterable[Any], names: dict[str, str] | None = None) -> ClassMap:
        unique = {str(x) for x in labels if x is not None and str(x) != ""}
        ints = bool(unique) and all(_is_int_like(s) for s in unique)
        ordered = sorted(unique, key=int) if ints else sorted(unique)
        shown = [names.get(s, s) for s in ordered] if names else []
        return cls(ordered, shown, "int" if ints else "str")

    @property
    def num_classes(self) -> int:
        return len(self.source_labels)

    def to_index(self, source_label: Any) -> int:
        try:
            return self._index[str(source_label)]
        except KeyError:
            raise ImatError(f"label {source_label!r} is not in the class map") from None

    def to_source(self, index: int) -> int | str:
        s = self.source_labels[int(index)]
        return int(s) if self.label_type == "int" else s

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "label_type": self.label_type,
            "source_labels": self.source_labels,
            "names": self.names,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClassMap:
        p = require_file(path, "class map")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            return cls(
                list(data["source_labels"]), list(data.get("names", [])), data.get("label_type", "str")
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ImatError(f"{p}: not a class map ({exc.__class__.__name__}: {exc})") from None


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "label" else "object") for c in COLUMNS})


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Columns in the canonical order and types; missing optional columns filled."""
    df = df.copy()
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = -1 if col == "label" else ""
    df = df[COLUMNS]
    df["label"] = df["label"].fillna(-1).astype("int64")
    for col in ("image_id", "split", "path", "source_label", "url"):
        df[col] = df[col].fillna("").astype(str)
    return df.reset_index(drop=True)


def save_manifest(df: pd.DataFrame, classes: ClassMap, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``manifest.parquet`` and ``classes.json`` into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    write_parquet(out / "manifest.parquet", normalise(df))
    classes.save(out / "classes.json")
    return out / "manifest.parquet"


def load_manifest(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, ClassMap]:
    """Read a manifest Parquet and the ``classes.json`` beside it."""
    p = require_file(path, "manifest")
    try:
        df = pd.read_parquet(p)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise ImatError(f"{p}: not a readable Parquet manifest ({exc.__class__.__name__})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ImatError(f"{p}: manifest lacks columns {', '.join(missing)}")
    return normalise(df), ClassMap.load(p.parent / "classes.json")


def prepare_manifest(cfg: RunConfig, rebuild: bool = False) -> tuple[pd.DataFrame, ClassMap, Path]:
    """The run's manifest: ``RUN_DIR/data/manifest.parquet`` when it exists (every step of a run sees
    the same rows and class map), else built from ``cfg.data`` and saved there (by rank 0 only; the
    build is deterministic, so other ranks use their own identical copy)."""
    path = cfg.manifest_path
    if path.is_file() and not rebuild:
        df, classes = load_manifest(path)
        log.info("using the run's manifest %s", path)
        return df, classes, path
    from imat.engine.runtime import is_main_rank
    from imat.formats import build_manifest

    df, classes = build_manifest(cfg.data)
    if is_main_rank():
        save_manifest(df, classes, path.parent)
    return df, classes, path
