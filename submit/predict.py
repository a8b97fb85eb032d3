"""Batched top-k inference with onnxruntime over a folder, a manifest or a competition file.

Decoding and the eval transform (imat.data, identical to training's evaluation) run in DataLoader
worker processes, so JPEG decoding of the next batches overlaps with inference of the current one.
An image that cannot be read, or whose header declares more than ``max_pixels`` pixels (never decoded),
still gets a row, flagged ``missing`` with empty lists, so the submission writer can give it a
documented fallback instead of the run crashing."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imat.data.decode import DEFAULT_MAX_PIXELS
from imat.errors import ImatError, require_file
from imat.io import write_with
from imat.manifest import ClassMap
from submit.export import read_description
from submit.inputs import read_images
from submit.runtime import Runner, create_session
from submit.verify import topk_indices

log = logging.getLogger(__name__)

META_KEY = b"imat"
COLUMNS = ["image_id", "topk_labels", "topk_scores", "missing"]


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def class_map_of(description: dict[str, Any], source: str) -> ClassMap:
    try:
        c = description["classes"]
        return ClassMap(list(c["source_labels"]), list(c.get("names", [])), c.get("label_type", "str"))
    except (KeyError, TypeError) as exc:
        raise ImatError(f"{source}: model description has no class map ({exc})") from None


def predict(
    model: str | os.PathLike[str],
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
    split: str | None = None,
    topk: int = 3,
    provider: str = "auto",
    batch_size: int = 64,
    tta_flip: bool = False,
    workers: int = 2,
    save_probs: bool = False,
    threads: int | None = None,
    decoder: str = "cv2",
    progress: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: bool = True,
    tta_scales: str | Sequence[float] | None = None,
) -> pd.DataFrame:
    """Predict the top-``topk`` classes of every image of ``source``; write Parquet to ``out`` if given.

    Returns the predictions frame: ``image_id``, ``topk_labels`` (the competition's own labels),
    ``topk_scores`` (probabilities), ``missing`` and, with ``save_probs``, ``probs`` (every class, in
    class-map order; needed for prior correction). The Parquet's metadata (key ``imat``) records the
    model, the class map, the active provider, the options and how many rows are ``missing`` (of which
    ``too_large``: over ``max_pixels``). ``draft``: big JPEGs are decoded at a DCT scale that keeps the
    eval resize's detail, as training's validation does. ``tta_flip`` and ``tta_scales`` (``"1.0,1.15"``)
    average the probabilities of several views (:mod:`submit.tta`); the metadata's ``tta`` says which."""
    from tqdm.auto import tqdm

    from imat.data import ImageDataset, build_loader, decode_side
    from submit.tta import average_views, make_tta, view_transform

    model = require_file(model, "model")
    if topk < 1:
        raise ImatError(f"--topk must be >= 1, got {topk}")
    if batch_size < 1:
        raise ImatError(f"--batch-size must be >= 1, got {batch_size}")
    tta = make_tta(tta_flip, tta_scales)
    desc = read_description(model)
    classes = class_map_of(desc, str(model))
    k = min(topk, classes.num_classes)
    rows = read_images(source, images, split)
    session, active = create_session(model, provider, threads=threads, description=desc, max_batch=batch_size)
    runner = Runner(session, active, fixed_batch=batch_size)
    probs_out = bool(desc.get("softmax_in_graph"))
    size, crop = int(desc["input_size"]), float(desc.get("crop_pct", 0.875))
    transform = view_transform(desc, tta.scales)
    # the closest view (largest scale) needs the most detail from a draft decode
    side = decode_side(None, size, crop / max(tta.scales)) if draft else None
    dataset = ImageDataset(rows, None, transform, decoder, max_pixels, side)
    loader = build_loader(dataset, batch_size, shuffle=False, num_workers=workers)

    n = len(rows)
    top_idx = np.full((n, k), -1, dtype=np.int64)
    top_scores = np.zeros((n, k), dtype=np.float32)
    seen = np.zeros(n, dtype=bool)
    all_probs = np.zeros((n, classes.num_classes), dtype=np.float32) if save_probs else None
    bar = tqdm(total=n, desc="predict", unit="img", disable=not progress, leave=False)
    for batch in loader:
        x = batch["image"].numpy()
        index = batch["index"].numpy()
        probs = average_views(lambda b: runner(b)[0], x, tta.flip, probs_out)
        if probs.shape[1] != classes.num_classes:
            raise ImatError(
                f"{model}: outputs {probs.shape[1]} classes, its class map has {classes.num_classes}"
            )
        idx = topk_indices(probs, k)
        top_idx[index] = idx
        top_scores[index] = np.take_along_axis(probs, idx, axis=1)
        seen[index] = True
        if all_probs is not None:
            all_probs[index] = probs
        bar.update(len(index) + int(batch["skipped"]))
    bar.close()
    missing = ~seen
    too_large = 0
    if missing.any():
        too_large = count_too_large([dataset.paths[i] for i in np.flatnonzero(missing)], max_pixels)
        log.warning(
            "%d of %d images could not be read (%d too large); flagged missing",
            int(missing.sum()),
            n,
            too_large,
        )

    labels = [
        [classes.to_source(i) for i in row] if ok else [] for row, ok in zip(top_idx, seen, strict=True)
    ]
    frame = pd.DataFrame(
        {
            "image_id": rows["image_id"].astype(str).to_numpy(dtype=object),
            "topk_labels": labels,
            "topk_scores": [
                list(map(float, s)) if ok else [] for s, ok in zip(top_scores, seen, strict=True)
            ],
            "missing": missing,
        }
    )
    if all_probs is not None:
        frame["probs"] = [p if ok else np.zeros(0, np.float32) for p, ok in zip(all_probs, seen, strict=True)]
    info = {
        "model": str(model),
        "precision": desc.get("precision"),
        "provider": active,
        "topk": k,
        "tta_flip": tta_flip,
        "tta": {**tta.to_dict(), "label": tta.label},
        "images": n,
        "missing": int(missing.sum()),
        "too_large": too_large,
        "classes": classes.to_dict(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    frame.attrs["imat"] = info
    if out is not None:
        write_predictions(out, frame, info)
    log.info("predicted %d images with provider %s (%d missing)", n, active, info["missing"])
    return frame


def count_too_large(paths: list[str], max_pixels: int | None) -> int:
    """How many of ``paths`` declare more than ``max_pixels`` pixels (headers only: cheap per file)."""
    from imat.data.decode import ImageTooLargeError, check_pixels, read_header

    count = 0
    for path in paths:
        try:
            with open(path, "rb") as fh:
                check_pixels(read_header(fh.read()), max_pixels)
        except ImageTooLargeError:
            count += 1
        except OSError:
            pass
    return count


def _label_type(classes: dict[str, Any]) -> Any:
    import pyarrow as pa

    return pa.int64() if classes.get("label_type") == "int" else pa.string()


def write_predictions(path: str | os.PathLike[str], frame: pd.DataFrame, info: dict[str, Any]) -> Path:
    """Atomic Parquet with explicit list types (so an all-missing file still has them) and metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [
        pa.field("image_id", pa.string()),
        pa.field("topk_labels", pa.list_(_label_type(info["classes"]))),
        pa.field("topk_scores", pa.list_(pa.float32())),
        pa.field("missing", pa.bool_()),
    ]
    arrays = [
        pa.array(frame["image_id"].astype(str).tolist(), pa.string()),
        pa.array(frame["topk_labels"].tolist(), fields[1].type),
        pa.array(frame["topk_scores"].tolist(), fields[2].type),
        pa.array(frame["missing"].astype(bool).tolist(), pa.bool_()),
    ]
    if "probs" in frame.columns:
        fields.append(pa.field("probs", pa.list_(pa.float32())))
        arrays.append(pa.array([np.asarray(p, np.float32) for p in frame["probs"]], fields[-1].type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={META_KEY: json.dumps(info)}))
    return write_with(path, lambda tmp: pq.write_table(table, str(tmp)))


def read_predictions(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(predictions frame, the ``imat`` metadata written by :func:`predict`) with one-line errors."""
    import pyarrow.parquet as pq

    p = require_file(path, "predictions")
    try:
        table = pq.read_table(str(p))
    except Exception as exc:  # pyarrow raises several types
        raise ImatError(f"{p}: not a readable Parquet file ({exc.__class__.__name__})") from None
    lacking = [c for c in COLUMNS if c not in table.column_names]
    if lacking:
        raise ImatError(f"{p}: not an imat predictions file (no {', '.join(lacking)} column)")
    raw = (table.schema.metadata or {}).get(META_KEY)
    info = json.loads(raw) if raw else {}
    df = table.to_pandas()
    df["image_id"] = df["image_id"].astype(str)
    if df["image_id"].duplicated().any():
        dup = df.loc[df["image_id"].duplicated(), "image_id"].iloc[0]
        raise ImatError(f"{p}: image id {dup!r} appears more than once")
    if info.get("probs_shards") and "probs" not in df.columns:
        df["probs"] = _shard_probs(p.parent / info["probs_shards"], df["image_id"])
    return df, info


def _shard_probs(folder: Path, image_ids: pd.Series) -> list[np.ndarray]:
    """The probabilities `imat predict --ray --save-probs` left in worker-written shards, in the order
    of ``image_ids`` (an unreadable image has none)."""
    import pyarrow.dataset as pads

    if not folder.is_dir():
        raise ImatError(f"{folder}: the probability shards named by the predictions file are missing")
    table = pads.dataset(str(folder), format="parquet").to_table(columns=["image_id", "probs", "missing"])
    by_id = dict(zip(table.column("image_id").to_pylist(), table.column("probs").to_numpy(), strict=True))
    missing = dict(
        zip(table.column("image_id").to_pylist(), table.column("missing").to_pylist(), strict=True)
    )
    return [
        np.asarray(by_id[i], np.float32) if not missing.get(i, True) else np.zeros(0, np.float32)
        for i in image_ids.astype(str)
    ]
