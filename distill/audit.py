"""`imat data audit`: which training labels are likely wrong? Confident learning on teacher probabilities.

Web-crawled competition labels are noisy (Product 2019, the iMaterialist sets). Each training image
gets teacher probabilities and cleanlab (Northcutt et al., JAIR 2021) turns them into a label quality
score (``get_label_quality_scores``, lower is worse) and a verdict (``find_label_issues``: is it a
likely label issue, from the estimated joint of given and true labels). Two sources of probabilities:

* out-of-sample (``imat data audit --config CONFIG``): K-fold cross-fitted teachers
  (:mod:`teachers.crossfit`), each image scored by teachers that never saw it: what confident
  learning requires, since a teacher that memorised a flipped label stops flagging it;
* in-sample (``imat data audit POOL_DIR``): the trained pool itself, cheap but blind to memorised flips.

The CSV (every image, worst label first: given label, suggested label, score, verdict) feeds
``data.clean``; ``audit.html`` is a self-contained gallery of the worst N; ``audit.json`` records
where the probabilities came from and which labels were judged. With ``data.label_noise`` (from the
config, or as recorded in pool.json) the same seeded corruption the teachers saw is applied first and a
``flipped`` column says which labels were really corrupted, so precision and recall can be measured.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from imat.config import LabelNoise, RunConfig
from imat.errors import ImatError
from imat.io import write_csv, write_json, write_text
from imat.manifest import ClassMap, load_manifest

log = logging.getLogger(__name__)


@dataclass
class AuditResult:
    table: pd.DataFrame
    csv: Path
    html: Path
    precision_at_top: float | None  # fraction of the top N that were really flipped (label noise only)
    info: dict[str, Any]  # what audit.json holds: source of the probabilities, counts, precision/recall


def score_labels(
    probs: np.ndarray,
    labels: np.ndarray,
    method: str = "self_confidence",
    filter_by: str = "prune_by_noise_rate",
) -> pd.DataFrame:
    """cleanlab's verdict on each row of ``probs [N, C]`` with given ``labels [N]`` (all >= 0):
    ``label_quality`` (get_label_quality_scores, in [0, 1], lower = more likely wrong),
    ``is_label_issue`` (find_label_issues), the ``suggested`` class (argmax) and the probabilities of the
    given and suggested classes."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    if (labels < 0).any():
        raise ValueError("score_labels: every label must be known (>= 0)")
    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    n = len(labels)
    quality = get_label_quality_scores(labels, p, method=method)
    with warnings.catch_warnings():  # classes too rare to estimate a noise rate for: cleanlab warns each
        warnings.simplefilter("ignore", UserWarning)
        issues = find_label_issues(labels, p, filter_by=filter_by, n_jobs=1)
    suggested = p.argmax(axis=1)
    return pd.DataFrame(
        {
            "label_quality": quality,
            "is_label_issue": issues.astype(bool),
            "suggested": suggested,
            "p_given": p[np.arange(n), labels],
            "p_suggested": p[np.arange(n), suggested],
        }
    )


def flip_metrics(table: pd.DataFrame) -> dict[str, float | None]:
    """Precision and recall of the audit against known flips: at the number of flips (the worst
    n_flips labels; precision = recall there) and for cleanlab's issues; None where undefined."""
    flipped = table["flipped"].to_numpy(dtype=bool)
    n_flips = int(flipped.sum())
    ranked = flipped[np.argsort(table["label_quality"].to_numpy(), kind="stable")]
    at_n = float(ranked[:n_flips].mean()) if n_flips else None
    issues = table["is_label_issue"].to_numpy(dtype=bool)
    hit = int((issues & flipped).sum())
    return {
        "flips": n_flips,
        "precision_at_flips": at_n,
        "recall_at_flips": at_n,
        "issues_precision": hit / int(issues.sum()) if issues.any() else None,
        "issues_recall": hit / n_flips if n_flips else None,
    }


def thumbnail_b64(path: str | os.PathLike[str], size: int = 128) -> str | None:
    """A JPEG thumbnail (longest side ``size``) as base64, or None when the image cannot be read."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        return None
    h, w = img.shape[:2]
    scale = size / max(h, w)
    if scale < 1:
        img = cv2.resize(
            img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
        )
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return base64.b64encode(buf.tobytes()).decode("ascii") if ok else None


def gallery_html(table: pd.DataFrame, top: int, title: str) -> str:
    """A self-contained page: one card per suspicious image with its given and suggested labels."""
    cards = []
    for _, row in table.head(top).iterrows():
        thumb = thumbnail_b64(row["abs_path"])
        img = (
            f'<img alt="{html.escape(str(row["image_id"]))}" src="data:image/jpeg;base64,{thumb}">'
            if thumb
            else '<div class="missing">unreadable</div>'
        )
        flipped = ""
        if "flipped" in row and bool(row["flipped"]):
            flipped = '<span class="flip">known flip</span>'
        issue = '<span class="flip">issue</span> ' if bool(row["is_label_issue"]) else ""
        cards.append(
            "<figure>"
            f"{img}<figcaption><b>#{int(row['rank'])}</b> {html.escape(str(row['image_id']))}<br>"
            f"given <b>{html.escape(str(row['given_label']))}</b> (p={row['p_given']:.3f})<br>"
            f"suggested <b>{html.escape(str(row['suggested_label']))}</b> (p={row['p_suggested']:.3f})<br>"
            f"{issue}quality {row['label_quality']:.3f} {flipped}"
            "</figcaption></figure>"
        )
    style = (
        "body{font-family:sans-serif;margin:1.5em}figure{display:inline-block;width:170px;margin:6px;"
        "vertical-align:top;font-size:12px}img{max-width:160px;max-height:160px;display:block}"
        ".flip{color:#b00}.missing{width:128px;height:96px;background:#eee}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(table)} training images ranked by cleanlab's label quality (lowest first), "
        f"{int(table['is_label_issue'].sum())} flagged as likely label issues; "
        f"the {min(top, len(table))} most suspicious shown.</p>{''.join(cards)}</body></html>\n"
    )


def _manifest_for(pool_dir: Path, cfg: RunConfig | None) -> tuple[pd.DataFrame, ClassMap, Path]:
    from teachers.pool import read_pool_json

    candidates = []
    if cfg is not None:
        candidates.append(cfg.manifest_path)
    rel = read_pool_json(pool_dir).get("manifest")
    if rel:
        candidates.append((pool_dir / rel).resolve())
    candidates.append(pool_dir.parent / "data" / "manifest.parquet")
    for p in candidates:
        if p.is_file():
            df, classes = load_manifest(p)
            return df, classes, p
    raise ImatError(
        f"{pool_dir}: no manifest found for this pool (looked at {', '.join(map(str, candidates))})"
    )


def pool_labels(pool_dir: Path, cfg: RunConfig | None) -> LabelNoise:
    """The label noise the pool was trained with: pool.json's record (older pools have none: then the
    config's, or none). A config that says otherwise is an error, not a silent audit of other labels."""
    from teachers.pool import pool_file, read_pool_json

    recorded = read_pool_json(pool_dir).get("label_noise")
    if recorded is None:
        return cfg.data.label_noise if cfg is not None else LabelNoise()
    try:
        noise = LabelNoise.model_validate(recorded)
    except ValueError:
        raise ImatError(
            f"{pool_file(pool_dir)}: label_noise: not a label-noise setting: {recorded!r}"
        ) from None
    if cfg is not None and cfg.data.label_noise != noise:
        raise ImatError(
            f"{pool_file(pool_dir)}: the pool was trained with label_noise {noise.model_dump()} but the "
            f"config says data.label_noise {cfg.data.label_noise.model_dump()}"
        )
    return noise


def audit(
    pool_dir: str | os.PathLike[str],
    cfg: RunConfig | None = None,
    *,
    top: int = 100,
    out_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
) -> AuditResult:
    """In-sample audit: the trained pool's ensemble on its own training images (cheap; blind to flips
    the teachers memorised). Writes ``audit.csv``, ``audit.html`` and ``audit.json``."""
    from imat.data import labelled_splits
    from teachers.ensemble import ensemble_probs, pool_probs
    from teachers.pool import load_pool, read_pool_json

    pool = Path(pool_dir)
    if top < 1:
        raise ImatError(f"--top must be >= 1, got {top}")
    entries = load_pool(pool, cfg.distill.teachers if cfg is not None else None)
    df, classes, manifest = _manifest_for(pool, cfg)
    for e in entries:
        if e.num_classes != classes.num_classes:
            raise ImatError(
                f"teacher {e.name} has {e.num_classes} classes but {manifest} has {classes.num_classes}"
            )
    noise = pool_labels(pool, cfg)
    train, _, truth = labelled_splits(df, noise, classes.num_classes)
    if train.empty:
        raise ImatError(f"{manifest}: no labelled training images to audit")
    record = read_pool_json(pool)
    root = (cfg.data.images if cfg is not None else None) or record.get("images")
    decoder = cfg.data.decoder if cfg is not None else record.get("decoder", "cv2")
    probs, labels = pool_probs(
        entries,
        train,
        root,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        decoder=decoder,
        progress=progress,
    )
    out = (
        Path(out_dir)
        if out_dir is not None
        else (cfg.audit_dir if cfg is not None else pool.parent / "audit")
    )
    acfg = cfg.audit if cfg is not None else None
    info = {
        "probabilities": "in_sample",
        "pool": str(pool.resolve()),
        "teachers": [e.name for e in entries],
        "label_noise": noise.model_dump(mode="json"),
    }
    return _finish(train, truth, ensemble_probs(probs, "mean"), labels, root, classes, out, top, info, acfg)


def crossfit_audit(
    cfg: RunConfig,
    *,
    top: int = 100,
    out_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = 0,
    force: bool = False,
) -> AuditResult:
    """Out-of-sample audit: ``audit.folds``-fold cross-fitted teachers (resumable), then cleanlab."""
    from imat.manifest import prepare_manifest
    from teachers.crossfit import crossfit_probs

    if top < 1:
        raise ImatError(f"--top must be >= 1, got {top}")
    fit = crossfit_probs(cfg, batch_size=batch_size, device=device, num_workers=num_workers, force=force)
    _, classes, _ = prepare_manifest(cfg)
    info = {
        "probabilities": "out_of_sample",
        "folds": cfg.audit.folds,
        "fold_seed": cfg.audit.seed,
        "fold_pools": [str(p.resolve()) for p in fit.fold_dirs],
        "teachers": fit.teachers,
        "label_noise": cfg.data.label_noise.model_dump(mode="json"),
    }
    out = Path(out_dir) if out_dir is not None else cfg.audit_dir
    table = fit.train.assign(fold=fit.folds)
    return _finish(
        table, fit.truth, fit.probs, fit.labels, cfg.data.images, classes, out, top, info, cfg.audit
    )


def _finish(
    train: pd.DataFrame,
    truth: np.ndarray | None,
    probs: np.ndarray,
    labels: np.ndarray,
    root: str | None,
    classes: ClassMap,
    out: Path,
    top: int,
    info: dict[str, Any],
    acfg: Any,
) -> AuditResult:
    """cleanlab on the readable rows, then the ranked CSV, the gallery and audit.json."""
    from imat.config import AuditConfig
    from imat.data import resolve_paths

    acfg = acfg or AuditConfig()
    readable = labels >= 0
    if not readable.any():
        raise ImatError("no training image could be read: nothing to audit")
    train = train.reset_index(drop=True)
    table = pd.DataFrame(
        {
            "image_id": train["image_id"].astype(str),
            "path": train["path"].astype(str),
            "abs_path": [str(Path(p).resolve()) for p in resolve_paths(train, root)],
            "given_index": train["label"].to_numpy(dtype=np.int64),
        }
    )
    if "fold" in train.columns:
        table["fold"] = train["fold"].to_numpy()
    if truth is not None:
        table["flipped"] = truth != table["given_index"].to_numpy()
    table = table[readable].reset_index(drop=True)
    scores = score_labels(probs[readable], labels[readable], acfg.method, acfg.filter_by)
    table = pd.concat([table, scores], axis=1).rename(columns={"suggested": "suggested_index"})
    table["given_label"] = [classes.to_source(i) for i in table["given_index"]]
    table["suggested_label"] = [classes.to_source(i) for i in table["suggested_index"]]
    table = table.sort_values(["label_quality", "p_given"], kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    first = ["rank", "image_id", "given_label", "suggested_label", "label_quality", "is_label_issue"]
    table = table[first + [c for c in table.columns if c not in first]]
    csv_path = write_csv(out / "audit.csv", table)
    kind = "out-of-sample" if info["probabilities"] == "out_of_sample" else "in-sample"
    title = f"Label audit ({kind}): {len(info['teachers'])} teacher(s), {len(table)} training images"
    html_path = write_text(out / "audit.html", gallery_html(table, top, title))
    info = {
        **info,
        "method": acfg.method,
        "filter_by": acfg.filter_by,
        "images": len(table),
        "unreadable": int((~readable).sum()),
        "issues": int(table["is_label_issue"].sum()),
    }
    precision = None
    if "flipped" in table.columns:
        info.update(flip_metrics(table))
        precision = float(table["flipped"].head(top).mean())
    write_json(out / "audit.json", info)
    return AuditResult(table, csv_path, html_path, precision, info)
