"""A map-style dataset over manifest rows that survives bad files.

Web-scraped competitions always contain some images that are missing, truncated or not images at all,
and now and then one that declares more pixels than memory holds. Crashing an epoch for one of them
wastes hours, so an unreadable or too-large image becomes ``None`` (warned once per file, counted) and
the loader's collate drops it and reports how many it dropped."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from imat.data.decode import DECODERS, DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError, decode_image
from imat.errors import ImatError

log = logging.getLogger(__name__)


def resolve_paths(df: pd.DataFrame, images_root: str | os.PathLike[str] | None) -> list[str]:
    """Absolute-or-root-relative file paths for the manifest's ``path`` column."""
    if "path" not in df.columns:
        raise ImatError("manifest has no 'path' column")
    root = Path(images_root) if images_root is not None else None
    out = []
    for p in df["path"].astype(str).tolist():
        q = Path(p)
        out.append(str(q if q.is_absolute() or root is None else root / q))
    return out


def _apply(transform: Callable[..., Any] | None, image: np.ndarray) -> Any:
    if transform is None:
        return torch.from_numpy(image).permute(2, 0, 1).contiguous()  # uint8 CHW
    try:  # albumentations pipelines take keyword targets and return a dict
        import albumentations as A

        if isinstance(transform, (A.BaseCompose, A.BasicTransform)):
            return transform(image=image)["image"]
    except ImportError:  # pragma: no cover - albumentations is a hard dependency
        pass
    return transform(image)


class ImageDataset(Dataset):
    """Items are ``{"image": Tensor, "label": int, "index": int}`` or None for an unreadable image.

    ``index`` is the row position in ``df`` (stable across epochs and workers), which is how cached
    teacher outputs and per-image predictions find their row again. ``label`` is -1 when the manifest
    has no label (test split). ``skipped`` counts None returns in *this* process; with worker
    processes the per-batch ``skipped`` of the collate is the number to sum.

    ``max_pixels``: images whose header declares more pixels are skipped without being decoded.
    ``min_side``: JPEGs are decoded at 1/2, 1/4 or 1/8 scale while their shorter side stays >= it
    (None: full size; see :func:`imat.data.transforms.decode_side`)."""

    def __init__(
        self,
        df: pd.DataFrame,
        images_root: str | os.PathLike[str] | None = None,
        transform: Callable[..., Any] | None = None,
        decoder: str = "cv2",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_side: int | None = None,
    ) -> None:
        if decoder not in DECODERS:
            raise ImatError(f"unknown decoder {decoder!r} (choose from {', '.join(DECODERS)})")
        self.paths = resolve_paths(df, images_root)
        if "label" in df.columns:
            self.labels = df["label"].fillna(-1).astype("int64").to_numpy()
        else:
            self.labels = np.full(len(df), -1, dtype=np.int64)
        self.transform = transform
        self.decoder = decoder
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.skipped = 0
        self.bad_files: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray | None:
        """Decoded RGB uint8 pixels of row ``index``, or None (warned once, counted) when unreadable or
        too large."""
        path = self.paths[index]
        try:
            return decode_image(path, self.decoder, self.max_pixels, self.min_side)
        except ImageDecodeError as exc:
            self.skipped += 1
            if path not in self.bad_files:
                self.bad_files.add(path)
                kind = "too large" if isinstance(exc, ImageTooLargeError) else "unreadable"
                log.warning("skipping %s image: %s", kind, exc)
            return None

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = self.load(index)
        if image is None:
            return None
        return {"image": _apply(self.transform, image), "label": int(self.labels[index]), "index": int(index)}
