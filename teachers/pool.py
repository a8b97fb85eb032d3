"""The teacher pool on disk: one folder per teacher and ``pool.json``, the index everything else reads.

Layout (docs/ARCHITECTURE.md, File formats)::

    POOL/pool.json                 every teacher: arch, input pipeline, class count, val top-1/top-3, weights
    POOL/<name>/config.yaml        resolved config the teacher was trained with
    POOL/<name>/summary.csv        per-epoch summary of the engine
    POOL/<name>/best.safetensors   shared weights (imat metadata: arch, num_classes, input_size, ...)
    POOL/<name>/last.ckpt          resume checkpoint

``pool.json`` is rewritten atomically after each teacher, so a pool stays usable while more teachers
are trained into it, and the distillation step needs nothing but the pool folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from imat.errors import ImatError
from imat.io import write_json

POOL_FILE = "pool.json"
POOL_VERSION = 1


@dataclass
class TeacherEntry:
    """One teacher of ``pool.json``. ``weights`` is relative to the pool folder (the pool can move)."""

    name: str
    arch: str
    num_classes: int
    input_size: int
    mean: list[float]
    std: list[float]
    crop_pct: float
    weights: str
    val_top1: float | None = None
    val_top3: float | None = None
    params: int | None = None
    epochs: int | None = None  # epochs done
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pool_dir: Path | None = field(default=None, compare=False, repr=False)

    @property
    def weights_path(self) -> Path:
        """Absolute (or pool-relative when the pool folder is unknown) path of the weights file."""
        w = Path(self.weights)
        if w.is_absolute() or self.pool_dir is None:
            return w
        return Path(self.pool_dir) / w

    @property
    def folder(self) -> Path:
        return self.weights_path.parent

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("pool_dir")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], pool_dir: str | os.PathLike[str] | None = None) -> TeacherEntry:
        known = {f for f in cls.__dataclass_fields__ if f != "pool_dir"}
        required = ["name", "arch", "num_classes", "input_size", "mean", "std", "crop_pct", "weights"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"teacher {d.get('name', '?')!r} lacks {', '.join(missing)}")
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["mean"] = [float(x) for x in kwargs["mean"]]
        kwargs["std"] = [float(x) for x in kwargs["std"]]
        return cls(**kwargs, pool_dir=Path(pool_dir) if pool_dir is not None else None)


def pool_file(pool_dir: str | os.PathLike[str]) -> Path:
    return Path(pool_dir) / POOL_FILE


def read_pool_json(pool_dir: str | os.PathLike[str], *, missing_ok: bool = False) -> dict[str, Any]:
    """The raw content of ``pool.json`` (``{"version", "teachers": [...], ...}``); bad files raise one line."""
    p = pool_file(pool_dir)
    if not p.exists():
        if missing_ok:
            return {"version": POOL_VERSION, "teachers": []}
        if not Path(pool_dir).is_dir():
            raise ImatError(f"teacher pool not found: {pool_dir} (train one with `imat teachers train`)")
        raise ImatError(f"{p} not found: not a teacher pool (train one with `imat teachers train`)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImatError(f"{p}: not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("teachers"), list):
        raise ImatError(f"{p}: expected an object with a 'teachers' list")
    return data


def write_pool_json(pool_dir: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    return write_json(pool_file(pool_dir), data)


def update_pool_entry(
    pool_dir: str | os.PathLike[str], entry: TeacherEntry, extra: dict[str, Any] | None = None
) -> Path:
    """Insert or replace ``entry`` (by name) in ``pool.json``, atomically; other teachers are kept.

    ``extra`` top-level keys (e.g. the manifest and images root the pool was trained on) are merged in.
    A changed entry drops the ``selected`` record of the last ``imat teachers eval`` (it is stale)."""
    data = read_pool_json(pool_dir, missing_ok=True)
    new = entry.to_dict()
    old = [t for t in data["teachers"] if isinstance(t, dict) and t.get("name") == entry.name]
    if old != [new]:  # a new or retrained teacher makes the last evaluation's selection stale
        data.pop("selected", None)
    teachers = [t for t in data["teachers"] if isinstance(t, dict) and t.get("name") != entry.name]
    teachers.append(new)
    data["version"] = POOL_VERSION
    data["teachers"] = teachers
    if extra:
        data.update(extra)
    return write_pool_json(pool_dir, data)


def remove_pool_entry(pool_dir: str | os.PathLike[str], name: str) -> Path:
    data = read_pool_json(pool_dir)
    data["teachers"] = [t for t in data["teachers"] if t.get("name") != name]
    return write_pool_json(pool_dir, data)


def load_pool(pool_dir: str | os.PathLike[str], names: list[str] | None = None) -> list[TeacherEntry]:
    """The teachers of ``pool_dir/pool.json`` (all, or ``names`` in that order).

    An unknown name, an empty pool, a malformed entry or a missing weights file is a one-line error,
    so a distillation run fails before it starts rather than mid-way."""
    p = pool_file(pool_dir)
    data = read_pool_json(pool_dir)
    entries: list[TeacherEntry] = []
    for i, raw in enumerate(data["teachers"]):
        if not isinstance(raw, dict):
            raise ImatError(f"{p}: teachers[{i}] is not an object")
        try:
            entries.append(TeacherEntry.from_dict(raw, pool_dir))
        except (TypeError, ValueError) as exc:
            raise ImatError(f"{p}: teachers[{i}]: {exc}") from None
    if not entries:
        raise ImatError(f"{p}: the pool has no teachers")
    if names is not None:
        by_name = {e.name: e for e in entries}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ImatError(f"{p}: no teacher named {', '.join(unknown)} (the pool has {', '.join(by_name)})")
        entries = [by_name[n] for n in names]
    for e in entries:
        if not e.weights_path.is_file():
            raise ImatError(f"{p}: teacher {e.name}: weights file not found: {e.weights_path}")
    return entries


def load_teacher(entry: TeacherEntry, device: str | Any = "cpu") -> nn.Module:
    """The teacher network with its weights, in eval mode and frozen (requires_grad False).

    The weights' own metadata must agree with the entry (arch, class count), and every key and shape
    must match: a weights file from another model is a one-line ImatError, never a silent partial load."""
    from imat.config.models import ModelSpec
    from imat.weights import read_meta
    from teachers.build import check_state_dict, create_model, read_state_dict

    path = entry.weights_path
    meta = read_meta(path) if path.suffix == ".safetensors" else {}
    for key in ("arch", "num_classes"):
        if key in meta and meta[key] != getattr(entry, key):
            raise ImatError(
                f"{path}: weights are for {key} {meta[key]!r} but pool.json says {getattr(entry, key)!r}"
            )
    spec = ModelSpec(arch=entry.arch, model_kwargs=dict(entry.model_kwargs or meta.get("model_kwargs") or {}))
    model = create_model(spec, entry.num_classes, load_weights=False)
    state = read_state_dict(path)
    check_state_dict(model, state, f"{path} (teacher {entry.name})", allow_head_mismatch=False)
    model.load_state_dict(state, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model.to(device)
