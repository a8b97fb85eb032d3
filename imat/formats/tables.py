"""Generic inputs: an ImageFolder tree (``imagefolder``) and a CSV of ``path,label`` (``csv``).

ImageFolder: ``root/<class>/<image>`` (images may sit in sub-folders of the class folder). The class
is the folder name, ``path`` is relative to ``root`` and so is ``image_id`` (``cat/001.jpg``). Images
directly in ``root`` have no class: allowed for a test split (a flat folder of test images), an error
for train/val.

CSV: a header is required, with ``path`` and (for train/val) ``label``; optional ``image_id`` (default:
the path) and ``url``. Every value is read as text, so labels ``007`` and ``7`` stay distinct and
integer labels keep their spelling. ``path`` is relative to ``data.images`` when that is set, otherwise
to the CSV's own folder; absolute paths are kept.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pandas as pd

from imat.errors import ImatError
from imat.formats.common import SplitData, check_unique, is_image_file, make_frame


def list_images(root: Path) -> list[str]:
    """Every image file under ``root`` (following links), as sorted posix paths relative to it."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if is_image_file(name) and not name.startswith("."):
                found.append(name if rel == "." else Path(rel, name).as_posix())
    return sorted(found)


def read_imagefolder(root: Path, split: str, labels_required: bool = True) -> SplitData:
    rels = list_images(root)
    if not rels:
        raise ImatError(f"folder {root}: no images found (expected {root}/<class>/<image>)")
    classes = [r.split("/", 1)[0] if "/" in r else "" for r in rels]
    if labels_required and "" in classes:
        first = rels[classes.index("")]
        raise ImatError(
            f"folder {root}: image {first!r} is not in a class folder (expected {root}/<class>/<image>)"
        )
    df = make_frame(rels, split, rels, classes)
    return SplitData(df=df, fmt="imagefolder", source=root, base=root)


def read_header(path: Path) -> list[str]:
    """The CSV's first row (stripped), or an error for an empty or binary file."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            row = next(csv.reader(fh), None)
    except UnicodeDecodeError:
        raise ImatError(f"file {path}: not a UTF-8 text file") from None
    except (OSError, csv.Error) as exc:
        raise ImatError(f"file {path}: cannot read as CSV ({exc})") from None
    if not row:
        raise ImatError(f"file {path}: empty CSV (expected a header with columns path,label)")
    return [c.strip().lstrip("\ufeff") for c in row]


def read_table(path: Path, split: str, labels_required: bool = True, images: Path | None = None) -> SplitData:
    header = read_header(path)
    needed = ["path", "label"] if labels_required else ["path"]
    missing = [c for c in needed if c not in header]
    if missing:
        shown = ",".join(header[:6])
        raise ImatError(
            f"file {path}: CSV header lacks column {' and '.join(repr(m) for m in missing)} "
            f"(expected a header row path,label; got {shown!r})"
        )
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, ValueError) as exc:
        raise ImatError(f"file {path}: malformed CSV: {str(exc).strip()}") from None
    table.columns = [str(c).strip().lstrip("\ufeff") for c in table.columns]
    if table.empty:
        raise ImatError(f"file {path}: no rows after the header")
    paths = table["path"].str.strip()
    blank = paths == ""
    if blank.any():
        raise ImatError(f"file {path}: line {int(blank.to_numpy().argmax()) + 2}: empty 'path'")
    ids = table["image_id"].str.strip() if "image_id" in table.columns else paths
    check_unique(list(ids), path, "image_id" if "image_id" in table.columns else "path")
    labels = table["label"].str.strip() if "label" in table.columns else pd.Series([""] * len(table))
    urls = table["url"].str.strip() if "url" in table.columns else None
    df = make_frame(list(ids), split, list(paths), list(labels), list(urls) if urls is not None else None)
    return SplitData(df=df, fmt="csv", source=path, base=images if images is not None else path.parent)
