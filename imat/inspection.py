"""``imat data inspect``: what is in a data set and which image files are unusable.

Counts images per split and per class, and checks every image file: missing, empty (0 bytes),
too large (its header declares more than ``max_pixels`` pixels: it is not decoded, and training skips
it too), corrupt (neither OpenCV nor PIL fully decodes it; truncated JPEGs fail both) and
placeholder-sized (a side under ``min_side`` px: dead links of URL-only competitions often come back as
1x1 or tiny "not available" images). Problems are reported, never fatal: the point is to see them
before training.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from imat.data.decode import DEFAULT_MAX_PIXELS, ImageTooLargeError, check_pixels, read_header
from imat.errors import ImatError
from imat.formats.build import build_manifest, read_source, rebase_paths, resolve_path
from imat.io import write_csv, write_json
from imat.manifest import ClassMap, load_manifest

OK = "ok"
PROBLEM_COLUMNS = ["image_id", "split", "path", "problem", "detail"]


@dataclass
class InspectReport:
    source: str
    kind: str  # format name, "manifest" or "config"
    df: pd.DataFrame  # manifest rows (source_label set; label may be -1)
    names: dict[str, str] = field(default_factory=dict)
    images_root: str | None = None
    checked: int = 0  # distinct files checked; 0 when the check was skipped
    problems: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=PROBLEM_COLUMNS))
    note: str = ""
    max_pixels: int | None = None  # the config's data.max_pixels, when the input is a config

    def split_counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.df["split"].value_counts(sort=False).items()}

    def class_table(self) -> pd.DataFrame:
        """One row per source label: images per split and in total, most frequent first."""
        labelled = self.df[self.df["source_label"] != ""]
        if labelled.empty:
            return pd.DataFrame(columns=["label", "name", "total"])
        table = pd.crosstab(labelled["source_label"], labelled["split"])
        table["total"] = table.sum(axis=1)
        table = table.reset_index().rename(columns={"source_label": "label"})
        table["name"] = table["label"].map(lambda s: self.names.get(s, ""))
        # ties in the order of the class map (numeric for integer labels)
        order = {s: i for i, s in enumerate(ClassMap.from_labels(table["label"]).source_labels)}
        table["_order"] = table["label"].map(order)
        table = table.sort_values(["total", "_order"], ascending=[False, True], kind="stable")
        splits = [s for s in ("train", "val", "test") if s in table.columns]
        named = ["name"] if (table["name"] != "").any() else []
        return table[["label", *named, *splits, "total"]].reset_index(drop=True)

    def to_dict(self) -> dict[str, Any]:
        problems = self.problems
        return {
            "source": self.source,
            "kind": self.kind,
            "images_root": self.images_root,
            "images": len(self.df),
            "splits": self.split_counts(),
            "num_classes": int(self.class_table().shape[0]),
            "classes": self.class_table().to_dict(orient="records"),
            "checked": self.checked,
            "note": self.note,
            "problem_counts": {str(k): int(v) for k, v in problems["problem"].value_counts().items()},
            "problems": problems.to_dict(orient="records"),
        }


def guess_split(path: Path) -> str:
    """A single competition file's split from its name (display only: nothing is required of it)."""
    name = path.name.lower()
    if "test" in name:
        return "test"
    if "val" in name:
        return "val"
    return "train"


# Kaggle's file names for the splits of a URL-list competition (Furniture/Fashion 2018: validation.json).
SPLIT_FILES = (
    ("train", "train.json"),
    ("val", "val.json"),
    ("val", "validation.json"),
    ("test", "test.json"),
)


def competition_files(folder: Path) -> dict[str, Path]:
    """The split files at the top of a competition folder (``train.json``, ``val.json`` or
    ``validation.json``, ``test.json``), by split; empty for any other folder."""
    found: dict[str, Path] = {}
    for split, name in SPLIT_FILES:
        if split not in found and (folder / name).is_file():
            found[split] = folder / name
    return found


def _inspect_sources(source: Path, files: dict[str, Path], images: Path | None) -> InspectReport:
    """One report over split files (or one image folder), paths rebased onto ``images`` when given."""
    frames, names, kinds = [], {}, []
    for split, path in files.items():
        data = read_source(path, split, images=images, labels_required=False)
        df = data.df.copy()
        df["path"] = rebase_paths(data, images)
        frames.append(df)
        names.update(data.names)
        kinds.append(data.fmt)
    df = pd.concat(frames, ignore_index=True)
    return InspectReport(
        str(source), "+".join(dict.fromkeys(kinds)), df, names, None if images is None else str(images)
    )


def load_for_inspection(
    path: str | os.PathLike[str], images: str | os.PathLike[str] | None = None
) -> InspectReport:
    """Rows and class names of a config (its data section), a manifest, a competition file, a competition
    folder (its split files together) or an image folder."""
    p = Path(path)
    if not p.exists():
        raise ImatError(f"input not found: {p}")
    if images is not None and not Path(images).is_dir():
        raise ImatError(f"images folder not found: {images}")
    if p.is_file() and p.suffix.lower() in (".yaml", ".yml"):
        from imat.config import load_config

        cfg = load_config(p)
        df, classes = build_manifest(cfg.data)
        root = str(images) if images is not None else cfg.data.images
        names = dict(zip(classes.source_labels, classes.names, strict=False))
        return InspectReport(str(p), "config", df, names, root, max_pixels=cfg.data.max_pixels)
    if p.is_file() and p.suffix.lower() == ".parquet":
        df, classes = load_manifest(p)
        names = dict(zip(classes.source_labels, classes.names, strict=False))
        return InspectReport(str(p), "manifest", df, names, None if images is None else str(images))
    images_dir = None if images is None else Path(images)
    files = competition_files(p) if p.is_dir() else {}
    if files:  # a competition folder: its split files together, images in FOLDER/images by default
        if images_dir is None and (p / "images").is_dir():
            images_dir = p / "images"
        return _inspect_sources(p, files, images_dir)
    return _inspect_sources(p, {guess_split(p): p}, images_dir)


def check_image(
    path: str, min_side: int = 10, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[str, str]:
    """``(problem, detail)`` for one file; problem is ``ok`` for a usable image. An image of more than
    ``max_pixels`` (by its header) is ``too large`` and never decoded."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return "missing", "no such file"
    if not os.path.isfile(path):
        return "missing", "not a file"
    if size == 0:
        return "empty", "0 bytes"
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        return "corrupt", f"unreadable: {exc.strerror or exc}"
    try:
        check_pixels(read_header(data.tobytes()), max_pixels)
    except ImageTooLargeError as exc:
        return "too large", str(exc)
    shape = _decode_shape(data)
    if isinstance(shape, str):
        return "corrupt", shape
    height, width = shape
    if min(height, width) < min_side:
        return "tiny", f"{width}x{height} px"
    return OK, ""


def _decode_shape(data: np.ndarray) -> tuple[int, int] | str:
    """(height, width) after a full decode with OpenCV, else PIL (GIF, odd TIFFs); else the reason."""
    import cv2

    try:
        img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error:
        img = None
    if img is not None:
        return int(img.shape[0]), int(img.shape[1])
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            im.load()
            return int(im.size[1]), int(im.size[0])
    except Exception as exc:  # PIL raises many types for bad data
        return f"cannot decode ({exc.__class__.__name__})"


def check_images(
    paths: Sequence[str],
    min_side: int = 10,
    workers: int | None = None,
    progress: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[tuple[str, str]]:
    """Check files in threads (decoding releases the GIL); results in the order of ``paths``."""
    workers = workers or min(16, 4 * (os.cpu_count() or 1))
    results: list[tuple[str, str]] = []
    chunk = 256
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress) as bar,
    ):
        for start in range(0, len(paths), chunk * workers):
            window = paths[start : start + chunk * workers]
            for result in pool.map(lambda p: check_image(p, min_side, max_pixels), window):
                results.append(result)
                bar.update(1)
    return results


def inspect_input(
    path: str | os.PathLike[str],
    images: str | os.PathLike[str] | None = None,
    check: bool = True,
    min_side: int = 10,
    workers: int | None = None,
    progress: bool = True,
    max_pixels: int | None = None,
) -> InspectReport:
    """Counts for ``path`` and, when ``check``, every image file's state. ``max_pixels`` (default: a
    config's ``data.max_pixels``, else the decoders' default) flags larger images as ``too large``."""
    report = load_for_inspection(path, images)
    if not check or report.df.empty:
        return report
    try:
        files = resolve_path(report.df, report.images_root)
    except ImatError:
        report.note = (
            "image files not checked: their paths are relative to an images folder (give --images DIR)"
        )
        return report
    unique = list(dict.fromkeys(files))
    limit = max_pixels or report.max_pixels or DEFAULT_MAX_PIXELS
    results = dict(zip(unique, check_images(unique, min_side, workers, progress, limit), strict=True))
    report.checked = len(unique)
    outcome = files.map(results)
    bad = (outcome.map(lambda r: r[0]) != OK).to_numpy()
    problems = report.df.loc[bad, ["image_id", "split"]].copy()
    problems["path"] = files[bad].to_numpy()
    problems["problem"] = [r[0] for r in outcome[bad]]
    problems["detail"] = [r[1] for r in outcome[bad]]
    report.problems = problems.reset_index(drop=True)[PROBLEM_COLUMNS]
    return report


def format_report(report: InspectReport, head: int = 10) -> str:
    """A compact text summary: splits, classes (head and tail when many), problems."""
    lines = [f"{report.source} ({report.kind}): {len(report.df)} images"]
    for split, count in report.split_counts().items():
        labelled = int(((report.df["split"] == split) & (report.df["source_label"] != "")).sum())
        lines.append(f"  {split:<5} {count:>9} images, {labelled} labelled")
    table = report.class_table()
    lines.append(f"classes: {len(table)}")
    if len(table):
        shown = table if len(table) <= 2 * head else pd.concat([table.head(head), table.tail(head)])
        text = shown.to_string(index=False).splitlines()
        if len(table) > 2 * head:
            text.insert(head + 1, f"  ... {len(table) - 2 * head} more classes ...")
        lines.extend("  " + t for t in text)
    if report.note:
        lines.append(report.note)
    elif report.checked:
        counts = report.problems["problem"].value_counts()
        bad = ", ".join(f"{int(v)} {k}" for k, v in counts.items()) or "none"
        lines.append(f"image files checked: {report.checked}; problems: {bad}")
        for _, row in report.problems.head(head).iterrows():
            lines.append(f"  {row['problem']:<9} {row['path']}  {row['detail']}")
        if len(report.problems) > head:
            lines.append(f"  ... {len(report.problems) - head} more (see --out)")
    return "\n".join(lines)


def write_report(report: InspectReport, out: str | os.PathLike[str]) -> Path:
    """``.csv``: the problem files; anything else: the whole report as JSON. Atomic either way."""
    dest = Path(out)
    if dest.suffix.lower() == ".csv":
        return write_csv(dest, report.problems)
    return write_json(dest, report.to_dict())
