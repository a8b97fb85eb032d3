"""`imat data audit`: which training labels does the teacher ensemble disagree with most?

Web-crawled competition labels are noisy (Product 2019, the iMaterialist sets). A pool of teachers
trained on those labels still learns the majority signal, so an image whose given label gets a low
ensemble probability is a good candidate for a wrong label. Each training image is scored with

    suspicion = 1 - p_ens(given label)          (0: the ensemble agrees fully, 1: it gives it nothing)
    margin    = p_ens(best other class) - p_ens(given label)   (> 0: the ensemble prefers another class)

and the ranking is written as a CSV (every image, most suspicious first) plus a self-contained HTML
gallery (base64 thumbnails) of the top N. With ``data.label_noise`` in the config the same seeded
corruption the teachers and students saw is applied first and a ``flipped`` column says which labels
were really corrupted, so the audit's precision can be measured.
"""

from __future__ import annotations

import base64
import html
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from imat.config import RunConfig
from imat.errors import ImatError
from imat.io import write_csv, write_text
from imat.manifest import ClassMap, load_manifest

log = logging.getLogger(__name__)


@dataclass
class AuditResult:
    table: pd.DataFrame
    csv: Path
    html: Path
    precision_at_top: float | None  # fraction of the top N that were really flipped (label noise only)


def score_labels(probs: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Per-row ``p_given``, ``suspicion``, ``margin``, ``predicted`` and ``p_predicted`` from
    ensemble probabilities ``[N, C]`` and the given labels ``[N]`` (rows with label < 0 get NaN)."""
    n = len(labels)
    valid = labels >= 0
    safe = np.where(valid, labels, 0)
    p_given = probs[np.arange(n), safe].astype(np.float64)
    others = probs.astype(np.float64).copy()
    others[np.arange(n), safe] = -np.inf
    best_other = others.max(axis=1)
    predicted = probs.argmax(axis=1)
    out = pd.DataFrame(
        {
            "p_given": np.where(valid, p_given, np.nan),
            "suspicion": np.where(valid, 1.0 - p_given, np.nan),
            "margin": np.where(valid, best_other - p_given, np.nan),
            "predicted": predicted,
            "p_predicted": probs.max(axis=1).astype(np.float64),
        }
    )
    return out


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
    """A self-contained page: one card per suspicious image with its given and predicted labels."""
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
        cards.append(
            "<figure>"
            f"{img}<figcaption><b>#{int(row['rank'])}</b> {html.escape(str(row['image_id']))}<br>"
            f"given <b>{html.escape(str(row['given_label']))}</b> (p={row['p_given']:.3f})<br>"
            f"ensemble <b>{html.escape(str(row['predicted_label']))}</b> (p={row['p_predicted']:.3f}) {flipped}"
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
        f"<p>{len(table)} training images ranked by 1 - ensemble probability of the given label; "
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
    """Rank the pool's training images by ensemble disagreement; write ``audit.csv`` and ``audit.html``."""
    from imat.data import resolve_paths
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
    from imat.config import LabelNoise
    from imat.data import labelled_splits

    noise = cfg.data.label_noise if cfg is not None else LabelNoise()
    train, _, clean = labelled_splits(df, noise, classes.num_classes)
    flipped = None if clean is None else clean != train["label"].to_numpy()
    if train.empty:
        raise ImatError(f"{manifest}: no labelled training images to audit")
    root = (cfg.data.images if cfg is not None else None) or read_pool_json(pool).get("images")
    decoder = cfg.data.decoder if cfg is not None else read_pool_json(pool).get("decoder", "cv2")
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
    ens = ensemble_probs(probs, "mean")
    scores = score_labels(ens, labels)
    table = pd.DataFrame(
        {
            "image_id": train["image_id"].astype(str),
            "path": train["path"].astype(str),
            "abs_path": [str(Path(p).resolve()) for p in resolve_paths(train, root)],
            "given_index": train["label"].to_numpy(),
            "given_label": [classes.to_source(i) for i in train["label"]],
        }
    )
    table = pd.concat([table, scores], axis=1)
    table["predicted_label"] = [classes.to_source(i) for i in table["predicted"]]
    table["readable"] = labels >= 0
    if flipped is not None:
        table["flipped"] = flipped
    table = table[table["readable"]].drop(columns=["readable", "predicted"])
    table = table.sort_values(["suspicion", "margin"], ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    out = (
        Path(out_dir)
        if out_dir is not None
        else (cfg.run_path / "audit" if cfg is not None else pool.parent / "audit")
    )
    csv_path = write_csv(out / "audit.csv", table)
    title = f"Label audit: {len(entries)} teacher(s), {len(table)} training images"
    html_path = write_text(out / "audit.html", gallery_html(table, top, title))
    precision = float(table["flipped"].head(top).mean()) if flipped is not None else None
    return AuditResult(table, csv_path, html_path, precision)
