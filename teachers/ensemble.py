"""Teachers' probabilities on a split, and how good the pool is as an ensemble.

Each teacher sees the images the way it was trained (its own input size, mean/std and crop), so the
pool may mix architectures and resolutions freely. :func:`pool_probs` is the reusable core: an array
``[n_teachers, n_images, n_classes]`` aligned with the manifest rows, plus their labels; evaluation,
greedy selection and the distillation side's data audit all start from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from imat.engine import distributed as dist_utils
from imat.errors import ImatError
from teachers.pool import TeacherEntry, load_teacher

METHODS = ("mean", "geomean")
_EPS = 1e-12


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    num_images: int,
    *,
    device: str | torch.device = "cpu",
    tta_flip: bool = False,
    progress: bool = False,
    desc: str = "predict",
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities of ``model`` for dict batches ``{"image", "index"}``.

    Returns ``(probs [num_images, C] float32, seen [num_images] bool)``: rows are placed by each
    sample's ``index`` (loaders may drop unreadable images); rows never seen stay uniform. With
    ``tta_flip`` a row is the mean of the probabilities of the image and its horizontal flip. ``progress``
    shows a bar over the batches (``desc`` names it)."""
    dev = torch.device(device)
    model.eval()
    probs: np.ndarray | None = None
    seen = np.zeros(num_images, dtype=bool)
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        images = batch["image"].to(dev, non_blocking=True).float()
        index = torch.as_tensor(batch["index"]).cpu().numpy()
        p = torch.softmax(model(images).float(), dim=1)
        if tta_flip:
            p = 0.5 * (p + torch.softmax(model(torch.flip(images, dims=[3])).float(), dim=1))
        p_np = p.cpu().numpy()
        if probs is None:
            probs = np.full((num_images, p_np.shape[1]), 1.0 / p_np.shape[1], dtype=np.float32)
        probs[index] = p_np
        seen[index] = True
    if probs is None:
        raise ImatError("no image could be read: nothing to predict")
    return probs, seen


def teacher_loader(
    entry: TeacherEntry,
    df: pd.DataFrame,
    images_root: str | os.PathLike[str] | None,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    decoder: str = "cv2",
) -> Any:
    """An eval loader over ``df`` with the teacher's own input size, mean/std and crop."""
    from imat.data import ImageDataset, build_eval_transform, build_loader

    transform = build_eval_transform(entry.input_size, tuple(entry.mean), tuple(entry.std), entry.crop_pct)
    dataset = ImageDataset(df.reset_index(drop=True), images_root, transform, decoder)
    return build_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def pool_probs(
    entries: Sequence[TeacherEntry],
    df: pd.DataFrame,
    images_root: str | os.PathLike[str] | None,
    *,
    tta_flip: bool = False,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    num_workers: int = 0,
    decoder: str = "cv2",
    models: Sequence[nn.Module] | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Every teacher's validation (or any split's) probabilities for the rows of ``df``.

    Returns ``(probs [n_teachers, n_images, n_classes] float32, labels [n_images] int64)`` in the row
    order of ``df``. Images no teacher could read get label -1 (and uniform probabilities), so metrics
    that skip labels < 0 ignore them, as they ignore unlabelled test rows. ``models`` may pass already
    loaded teachers (same order as ``entries``) to avoid loading them twice. ``progress``: a bar per teacher.

    In a distributed job (torchrun, Ray Train; every rank must call this) each rank scores its share of
    the rows (:func:`imat.engine.distributed.shard_rows`) on its own device, and the shares are summed
    across ranks in chunks, so every rank returns the whole result, as one process would."""
    if not entries:
        raise ImatError("no teachers to evaluate")
    classes = {e.num_classes for e in entries}
    if len(classes) > 1:
        listing = ", ".join(f"{e.name}={e.num_classes}" for e in entries)
        raise ImatError(f"teachers disagree on the class count ({listing})")
    dev = dist_utils.process_device(device)  # a rank's own GPU when distributed
    df = df.reset_index(drop=True)
    n = len(df)
    if n == 0:
        raise ImatError("no images to evaluate")
    sharded = dist_utils.is_distributed()
    rows = np.asarray(dist_utils.shard_rows(n), dtype=np.int64)
    mine = df.iloc[rows].reset_index(drop=True)
    n_classes = entries[0].num_classes
    out = (np.zeros if sharded else np.empty)((len(entries), n, n_classes), dtype=np.float32)
    seen_mine = np.ones(len(rows), dtype=bool)
    for t, entry in enumerate(entries):
        model = models[t] if models is not None else load_teacher(entry, dev)
        model.to(dev)
        loader = teacher_loader(
            entry, mine, images_root, batch_size=batch_size, num_workers=num_workers, decoder=decoder
        )
        try:
            probs, seen = predict_probs(
                model,
                loader,
                len(rows),
                device=dev,
                tta_flip=tta_flip,
                progress=progress,
                desc=f"teacher {entry.name}",
            )
        except ImatError:  # none of this rank's images readable: the others may have some, decided below
            if not sharded:
                raise
            probs = np.full((len(rows), n_classes), 1.0 / n_classes, dtype=np.float32)
            seen = np.zeros(len(rows), dtype=bool)
        if probs.shape[1] != out.shape[2]:
            raise ImatError(
                f"teacher {entry.name}: the network outputs {probs.shape[1]} classes, pool.json says "
                f"{entry.num_classes}"
            )
        out[t, rows] = probs
        seen_mine &= seen
        if models is None:
            del model
    seen_count = np.zeros(n, dtype=np.int32)
    seen_count[rows] = seen_mine
    if sharded:
        dist_utils.sum_rows_across_ranks_(torch.from_numpy(out), dev)
        dist_utils.sum_rows_across_ranks_(torch.from_numpy(seen_count), dev)
        if not seen_count.any():
            raise ImatError("no image could be read: nothing to predict")
    labels = df["label"].to_numpy(dtype=np.int64).copy()
    labels[seen_count == 0] = -1
    return out, labels


def ensemble_probs(
    probs: np.ndarray, method: str = "mean", members: Sequence[int] | None = None
) -> np.ndarray:
    """Combine ``probs [T, N, C]`` over teachers: ``mean`` of probabilities, or ``geomean`` (the mean of
    log-probabilities, renormalised: a class must be likely for every teacher to win)."""
    if method not in METHODS:
        raise ImatError(f"unknown ensemble method {method!r} (use {' or '.join(METHODS)})")
    p = probs if members is None else probs[list(members)]
    if p.ndim != 3 or p.shape[0] == 0:
        raise ValueError(f"expected probabilities [teachers, images, classes], got shape {p.shape}")
    if method == "mean":
        return p.mean(axis=0)
    logp = np.log(np.clip(p.astype(np.float64), _EPS, None)).mean(axis=0)
    logp -= logp.max(axis=1, keepdims=True)
    e = np.exp(logp)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of labelled rows (label >= 0) whose label is among the ``k`` highest scores.

    Ties are broken by class index (stable sort), so results are deterministic. NaN when no row has a
    label."""
    labels = np.asarray(labels)
    keep = labels >= 0
    if not keep.any():
        return float("nan")
    p = probs[keep]
    k = min(k, p.shape[1])
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return float((top == labels[keep, None]).any(axis=1).mean())


def evaluate_probs(
    probs: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    selection: Sequence[int] | None = None,
    selection_method: str = "mean",
) -> pd.DataFrame:
    """Rows ``name, kind, members, top1, top3``: each teacher, ``ensemble_mean``, ``ensemble_geomean``
    and (when given) ``greedy_selection``: the ensemble of the selected teachers."""
    rows: list[dict[str, Any]] = []
    for t, name in enumerate(names):
        rows.append(_row(name, "teacher", [name], probs[t], labels))
    for method in METHODS:
        rows.append(_row(f"ensemble_{method}", method, list(names), ensemble_probs(probs, method), labels))
    if selection is not None:
        chosen = [names[i] for i in selection]
        combined = ensemble_probs(probs, selection_method, selection)
        rows.append(_row("greedy_selection", selection_method, chosen, combined, labels))
    return pd.DataFrame(rows)


def _row(name: str, kind: str, members: list[str], p: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "members": " ".join(members),
        "top1": topk_accuracy(p, labels, 1),
        "top3": topk_accuracy(p, labels, 3),
        "images": int((np.asarray(labels) >= 0).sum()),
    }


def default_manifest(pool_dir: str | os.PathLike[str]) -> Path:
    """Where a run keeps its manifest relative to its pool (RUN_DIR/teachers -> RUN_DIR/data)."""
    return Path(pool_dir).parent / "data" / "manifest.parquet"
