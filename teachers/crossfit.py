"""Out-of-sample probabilities for the label audit: K-fold cross-fitting through the pool code.

The training rows are cut into K stratified folds; fold k's teachers (``audit.teachers``, or the run's
own pool recipes) are trained by :func:`teachers.train.train_pool` on the other K-1 folds into
``AUDIT_DIR/folds/fold<k>/`` and then predict fold k. Every training image is thus scored by teachers
that never saw its label, which is what confident learning needs: a teacher that memorised a flipped
label stops flagging it. Resumable: finished teachers are skipped, a half-trained one continues from
its checkpoint, and each fold's held-out probabilities are kept (``holdout_probs.npz``) until its
teachers or rows change.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imat.config import CleanConfig, RunConfig
from imat.errors import ImatError
from imat.io import write_bytes, write_csv, write_json

log = logging.getLogger(__name__)

PROBS_FILE = "holdout_probs.npz"


@dataclass
class CrossFit:
    train: pd.DataFrame  # the audited training rows (label noise applied, no cleaning)
    truth: np.ndarray | None  # their clean labels when data.label_noise corrupted them
    probs: np.ndarray  # [N, C] mean probability of the fold's teachers, each row out-of-sample
    labels: np.ndarray  # [N] given labels, -1 where an image could not be read
    folds: np.ndarray  # [N] the fold each row was held out in
    teachers: list[str]
    fold_dirs: list[Path]


def assign_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Stratified, seeded fold of each row (scikit-learn's StratifiedKFold)."""
    from sklearn.model_selection import StratifiedKFold

    if len(labels) < folds:
        raise ImatError(f"audit.folds is {folds} but there are only {len(labels)} training images")
    out = np.empty(len(labels), dtype=np.int64)
    with warnings.catch_warnings():  # a class rarer than K cannot be in every fold: that is fine here
        warnings.simplefilter("ignore", UserWarning)
        split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for k, (_, held) in enumerate(split.split(np.zeros(len(labels)), labels)):
            out[held] = k
    return out


def fold_config(cfg: RunConfig, k: int) -> RunConfig:
    """The run config fold ``k`` trains with: the audit's teachers into their own pool folder, and no
    ``data.clean`` (the audit judges the given labels; cleaning is what it feeds)."""
    teachers = cfg.audit.teachers if cfg.audit.teachers.pool else cfg.teachers
    root = Path(cfg.audit.teachers.dir) if cfg.audit.teachers.dir else cfg.audit_dir / "folds"
    teachers = teachers.model_copy(update={"dir": str(root / f"fold{k}")})
    data = cfg.data.model_copy(update={"clean": CleanConfig()})
    return cfg.model_copy(update={"teachers": teachers, "data": data})


def _ids_hash(ids: pd.Series) -> str:
    return hashlib.sha256("\n".join(sorted(ids.astype(str))).encode()).hexdigest()


def _weights_stamp(entries: list[Any]) -> list[list[Any]]:
    out = []
    for e in entries:
        st = e.weights_path.stat()
        out.append([e.name, st.st_size, st.st_mtime_ns])
    return out


def _load_probs(path: Path, stamp: dict[str, Any], n: int) -> tuple[np.ndarray, np.ndarray] | None:
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        return None
    try:
        if json.loads(meta.read_text(encoding="utf-8")) != stamp:
            return None
        with np.load(path, allow_pickle=False) as z:
            probs, labels = z["probs"], z["labels"]
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    return (probs, labels) if len(labels) == n else None


def crossfit_probs(
    cfg: RunConfig,
    *,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = 0,
    force: bool = False,
) -> CrossFit:
    """Train (or reuse) each fold's teachers and return every training row's out-of-sample probabilities."""
    from imat.data import labelled_splits
    from imat.manifest import prepare_manifest
    from teachers.ensemble import ensemble_probs, pool_probs
    from teachers.pool import load_pool, read_pool_json
    from teachers.train import train_pool

    K, seed = cfg.audit.folds, cfg.audit.seed
    first = fold_config(cfg, 0)
    if not first.teachers.pool:
        raise ImatError("config: no teachers to cross-fit: set audit.teachers.pool or teachers.pool")
    df, classes, manifest = prepare_manifest(cfg)
    train, _, truth = labelled_splits(df, cfg.data.label_noise, classes.num_classes)
    if train.empty:
        raise ImatError(f"{manifest}: no labelled training images to audit")
    folds = assign_folds(train["label"].to_numpy(), K, seed)
    root = Path(first.teachers.dir).parent
    write_csv(root / "folds.csv", pd.DataFrame({"image_id": train["image_id"], "fold": folds}))
    probs = np.empty((len(train), classes.num_classes), dtype=np.float32)
    labels = train["label"].to_numpy(dtype=np.int64).copy()
    names = [s.name for s in first.teachers.pool]
    fold_dirs = []
    for k in range(K):
        fcfg = fold_config(cfg, k)
        held = folds == k
        held_rows = train[held].reset_index(drop=True)
        record = {
            "fold": k,
            "folds": K,
            "seed": seed,
            "holdout": _ids_hash(held_rows["image_id"]),
            "label_noise": cfg.data.label_noise.model_dump(mode="json"),
        }
        pool_dir = fcfg.pool_dir
        previous = read_pool_json(pool_dir, missing_ok=True).get("crossfit")
        stale = previous is not None and previous != record
        if stale:
            log.warning(
                "audit fold %d: its rows or labels changed since %s was trained: retraining", k, pool_dir
            )
        log.info(
            "audit fold %d/%d: %d training images, %d held out", k + 1, K, int((~held).sum()), len(held_rows)
        )
        train_pool(
            fcfg,
            resume=True,
            force=force or stale,
            source="audit.teachers",
            subset=train.loc[~held, "image_id"],
            provenance={"crossfit": record},
        )
        entries = load_pool(pool_dir, names)
        stamp = {"crossfit": record, "teachers": _weights_stamp(entries)}
        cached = None if force or stale else _load_probs(pool_dir / PROBS_FILE, stamp, len(held_rows))
        if cached is None:
            p, lab = pool_probs(
                entries,
                held_rows,
                cfg.data.images,
                batch_size=batch_size,
                device=device,
                num_workers=num_workers,
                decoder=cfg.data.decoder,
            )
            cached = (ensemble_probs(p, "mean").astype(np.float32), lab)
            buf = io.BytesIO()
            np.savez(buf, probs=cached[0], labels=cached[1])
            write_bytes(pool_dir / PROBS_FILE, buf.getvalue())
            write_json((pool_dir / PROBS_FILE).with_suffix(".json"), stamp)
        else:
            log.info("audit fold %d: held-out probabilities computed earlier, reused", k)
        probs[held], labels[held] = cached
        fold_dirs.append(pool_dir)
    return CrossFit(train, truth, probs, labels, folds, names, fold_dirs)
