"""`imat teachers eval`: every teacher, the two ensembles and the greedy selection on one split."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imat.errors import ImatError
from imat.io import write_csv
from imat.manifest import load_manifest
from teachers.ensemble import default_manifest, evaluate_probs, pool_probs
from teachers.pool import load_pool, read_pool_json, write_pool_json
from teachers.select import Selection, greedy_select

log = logging.getLogger(__name__)

EVAL_FILE = "pool_eval.csv"


@dataclass
class PoolEvaluation:
    table: pd.DataFrame  # the rows written to pool_eval.csv
    selection: Selection
    probs: np.ndarray  # [teachers, images, classes]
    labels: np.ndarray
    path: Path


def pool_data(
    pool_dir: str | os.PathLike[str], manifest: str | os.PathLike[str] | None = None
) -> tuple[Path, str | None, str]:
    """(manifest, images root, decoder) the pool was trained on, as pool.json recorded them; an explicit
    ``manifest`` wins. Falls back to the run layout (RUN_DIR/teachers -> RUN_DIR/data/manifest.parquet)."""
    data = read_pool_json(pool_dir)
    images = data.get("images")
    decoder = data.get("decoder") or "cv2"
    if manifest is not None:
        return Path(manifest), images, decoder
    recorded = data.get("manifest")
    if recorded:
        p = Path(recorded)
        return (p if p.is_absolute() else Path(pool_dir) / p), images, decoder
    return default_manifest(pool_dir), images, decoder


def evaluate_pool(
    pool_dir: str | os.PathLike[str],
    *,
    manifest: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
    decoder: str | None = None,
    split: str = "val",
    names: list[str] | None = None,
    tta_flip: bool = False,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = 0,
    metric: str = "top3",
    max_images: int | None = None,
    progress: bool = True,
) -> PoolEvaluation:
    """Evaluate the pool on ``split`` of its manifest, select teachers greedily, write pool_eval.csv
    (atomically) and record the selection in pool.json under ``selected``.

    Under torchrun each rank scores its share of the images on its own GPU (:func:`pool_probs`); every
    rank returns the whole evaluation and rank 0 alone writes the files."""
    from imat.engine import distributed as dist_utils

    dist_utils.init_from_env()
    pool = Path(pool_dir)
    entries = load_pool(pool, names)
    manifest_path, recorded_images, recorded_decoder = pool_data(pool, manifest)
    if not manifest_path.is_file():
        raise ImatError(
            f"manifest not found: {manifest_path} (pass --manifest, or --config of the run that trained the pool)"
        )
    df, classes = load_manifest(manifest_path)
    rows = df[(df["split"] == split) & (df["label"] >= 0)].reset_index(drop=True)
    if rows.empty:
        raise ImatError(f"{manifest_path}: no labelled {split} images to evaluate on")
    if max_images is not None and len(rows) > max_images:
        rows = rows.sample(n=max_images, random_state=0).sort_index().reset_index(drop=True)
    wrong = [e.name for e in entries if e.num_classes != classes.num_classes]
    if wrong:
        raise ImatError(
            f"teachers {', '.join(wrong)} have another class count than {manifest_path} "
            f"({classes.num_classes} classes)"
        )
    probs, labels = pool_probs(
        entries,
        rows,
        images if images is not None else recorded_images,
        tta_flip=tta_flip,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        decoder=decoder or recorded_decoder,
        progress=progress,
    )
    teacher_names = [e.name for e in entries]
    selection = greedy_select(probs, labels, teacher_names, metric=metric)
    table = evaluate_probs(probs, labels, teacher_names, selection.indices)
    table.insert(2, "selected", [n in selection.names for n in table["name"]])
    table.loc[table["kind"] != "teacher", "selected"] = False
    table.loc[table["name"] == "greedy_selection", "selected"] = True
    table["tta_flip"] = tta_flip
    table["split"] = split
    path = pool / EVAL_FILE
    if dist_utils.rank() == 0:
        write_csv(path, table)
        data = read_pool_json(pool)
        data["selected"] = {
            "teachers": selection.names,
            "metric": metric,
            "method": selection.method,
            "score": selection.score,
            "split": split,
            "tta_flip": tta_flip,
        }
        write_pool_json(pool, data)
    dist_utils.barrier()  # no rank reads pool.json's selection before rank 0 has written it
    return PoolEvaluation(table, selection, probs, labels, path)


def describe_selection(selection: Selection) -> str:
    steps = ", ".join(f"+{name} -> {100 * score:.2f}" for name, score in selection.history)
    return (
        f"greedy selection by ensemble {selection.metric} ({selection.method} of probabilities): "
        f"{' '.join(selection.names)} ({steps})"
    )


def table_for_print(table: pd.DataFrame) -> str:
    shown: dict[str, Any] = {
        "name": table["name"],
        "members": table["members"],
        "top1": table["top1"].map(lambda v: "n/a" if pd.isna(v) else f"{100 * v:.2f}"),
        "top3": table["top3"].map(lambda v: "n/a" if pd.isna(v) else f"{100 * v:.2f}"),
        "images": table["images"],
    }
    return pd.DataFrame(shown).to_string(index=False)
