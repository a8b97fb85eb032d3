"""What every reader shares: the per-split result, JSON loading with one-line errors, label text.

A reader turns one competition file or folder into a :class:`SplitData`: manifest rows whose ``label``
is still -1 (the class map is built later from train + val) and whose ``source_label`` is the
competition's own label as text.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from imat.errors import ImatError
from imat.manifest import COLUMNS

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"})

FORMATS = ("furniture2018", "fashion2018", "product2019", "coco", "imagenet", "imagefolder", "csv")


@dataclass
class SplitData:
    """One split as read from its source.

    ``base`` is the folder that the relative ``path`` values are relative to: the folder itself for
    folder formats, ``None`` for URL/JSON formats (relative to ``data.images``). ``names`` maps source
    labels to human-readable class names where the format carries them (COCO categories, ImageNet
    synset words). ``multi_label`` is True when some image carries more than one label (Fashion 2018)."""

    df: pd.DataFrame
    fmt: str
    source: Path
    base: Path | None = None
    names: dict[str, str] = field(default_factory=dict)
    multi_label: bool = False


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def label_text(value: Any) -> str:
    """A competition label as manifest text: ints stay ints (``37``, never ``37.0``), None is ""."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def make_frame(
    image_ids: Sequence[str],
    split: str,
    paths: Sequence[str],
    source_labels: Sequence[str],
    urls: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Manifest rows (label -1 until the class map is known)."""
    n = len(image_ids)
    return pd.DataFrame(
        {
            "image_id": list(image_ids),
            "split": [split] * n,
            "path": list(paths),
            "label": [-1] * n,
            "source_label": list(source_labels),
            "url": list(urls) if urls is not None else [""] * n,
        },
        columns=COLUMNS,
    ).astype({"label": "int64"})


def load_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    try:
        with open(path, encoding="utf-8-sig") as fh:  # -sig: tolerate a byte-order mark
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ImatError(
            f"file {path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except UnicodeDecodeError:
        raise ImatError(f"file {path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise ImatError(f"file {path}: cannot read ({exc.strerror or exc})") from None


def records(doc: Any, key: str, path: Path, required: bool = True) -> list[dict[str, Any]]:
    """``doc[key]`` as a list of JSON objects, or a one-line error naming the file and key."""
    if not isinstance(doc, dict):
        raise ImatError(f"file {path}: expected a JSON object at the top level, got {type(doc).__name__}")
    if key not in doc:
        if required:
            raise ImatError(f"file {path}: missing key {key!r}")
        return []
    items = doc[key]
    if not isinstance(items, list):
        raise ImatError(f"file {path}: {key!r} must be a list, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ImatError(f"file {path}: {key}[{i}] must be an object, got {type(item).__name__}")
    return items


def pick(record: dict[str, Any], keys: Iterable[str], path: Path, where: str) -> Any:
    """The first of ``keys`` present in ``record``; missing from all is an error naming them."""
    keys = tuple(keys)
    for key in keys:
        if key in record:
            return record[key]
    spelled = " or ".join(repr(k) for k in keys)
    raise ImatError(f"file {path}: {where} has no {spelled}")


def first_url(value: Any) -> str:
    """Furniture lists its URLs (always one in practice), Fashion gives a string: keep the first."""
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return "" if value is None else str(value)


def check_unique(ids: Sequence[str], path: Path, key: str) -> None:
    seen: set[str] = set()
    for value in ids:
        if value in seen:
            raise ImatError(f"file {path}: {key} {value!r} appears more than once")
        seen.add(value)


def require_labels(data: SplitData, what: str = "label") -> None:
    """Train and val need a label on every row; the first unlabelled image is named."""
    empty = data.df["source_label"] == ""
    if empty.any():
        first = data.df.loc[empty, "image_id"].iloc[0]
        raise ImatError(f"file {data.source}: image {first!r} has no {what} (needed for a labelled split)")


_WNID = re.compile(r"^n\d{8}$")


def is_wnid(name: str) -> bool:
    return bool(_WNID.match(name))
