"""Where images come from: a folder, a manifest Parquet, or a competition file plus its images folder.

Export (calibration and verification), prediction and distillation's extra images share this, so "the
validation images" mean the same rows everywhere. The result is always a frame with ``image_id``, ``path`` (absolute), ``label``
(-1 when unknown) and ``source_label``."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from imat.errors import ImatError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FRAME_COLUMNS = ["image_id", "path", "label", "source_label"]


def scan_folder(folder: str | os.PathLike[str]) -> pd.DataFrame:
    """Every image file under ``folder`` (recursively, sorted); image_id = the file name.

    The id keeps its extension because Product 2019 ids are file names (``<hash>.jpg``); the submission
    writer also matches ids without extension (Furniture ids ``1`` for ``1.jpg``)."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    ids = [p.relative_to(root).as_posix() for p in files]
    return pd.DataFrame(
        {"image_id": ids, "path": [str(p.resolve()) for p in files], "label": -1, "source_label": ""}
    )


def _absolute(paths: pd.Series, root: Path | None) -> list[str]:
    out = []
    for raw in paths.astype(str):
        p = Path(raw)
        if not p.is_absolute() and root is not None:
            p = root / p
        out.append(str(p))
    return out


def _finish(df: pd.DataFrame, root: Path | None, source: str) -> pd.DataFrame:
    for col in ("image_id", "path"):
        if col not in df.columns:
            raise ImatError(f"{source}: no {col!r} column")
    out = pd.DataFrame(
        {
            "image_id": df["image_id"].astype(str).to_numpy(),
            "path": _absolute(df["path"], root),
            "label": (df["label"] if "label" in df.columns else pd.Series(-1, index=df.index))
            .fillna(-1)
            .astype("int64")
            .to_numpy(),
            "source_label": (
                df["source_label"] if "source_label" in df.columns else pd.Series("", index=df.index)
            )
            .fillna("")
            .astype(str)
            .to_numpy(),
        }
    )
    return out.reset_index(drop=True)


def read_images(
    source: str | os.PathLike[str],
    images: str | os.PathLike[str] | None = None,
    split: str | None = None,
) -> pd.DataFrame:
    """The image list of ``source``.

    - a folder: every image in it (``images`` ignored);
    - a ``.parquet`` manifest: its rows (only ``split`` when given and the manifest has a split column),
      relative paths resolved against ``images`` (default: the manifest's folder);
    - anything else: a competition file read by ``imat.formats.read_split(source, split or "test")``,
      relative paths resolved against ``images`` (required)."""
    src = Path(source)
    if src.is_dir():
        df = scan_folder(src)
        if df.empty:
            raise ImatError(f"{src}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return df
    if not src.exists():
        raise ImatError(f"input not found: {src}")
    root = Path(images) if images is not None else None
    if root is not None and not root.is_dir():
        raise ImatError(f"images folder not found: {root}")
    if src.suffix.lower() == ".parquet":
        try:
            df = pd.read_parquet(src)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise ImatError(f"{src}: not a readable Parquet file ({exc.__class__.__name__})") from None
        if split is not None and "split" in df.columns:
            df = df[df["split"].astype(str) == split]
            if df.empty:
                raise ImatError(f"{src}: no rows with split={split!r}")
        return _finish(df, root if root is not None else src.parent, str(src))
    try:
        from imat.formats import read_split
    except ImportError:  # the formats part has not landed
        raise ImatError(
            f"{src}: reading competition files needs imat.formats, which is not available"
        ) from None
    df = read_split(src, split or "test")
    if root is None:
        raise ImatError(f"{src}: a competition file needs --images (the folder its images are in)")
    return _finish(df, root, str(src))


def sample_rows(df: pd.DataFrame, count: int, seed: int = 0) -> pd.DataFrame:
    """At most ``count`` rows, a seeded random subset spread over the list (not the first few classes)."""
    if len(df) <= count:
        return df.reset_index(drop=True)
    return df.sample(n=count, random_state=seed).sort_index().reset_index(drop=True)
