"""Assemble the report: sections in pipeline order, each present only when the run has its data."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from imat.app.report import plots
from imat.app.report.collect import RunData, collect
from imat.errors import require_dir
from imat.io import write_text

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left} img.plot{max-width:100%;margin:.4em 0}
.gallery{display:flex;flex-wrap:wrap;gap:8px} .gallery figure{margin:0;width:130px;font-size:.7em}
.gallery img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;border:1px solid #ccc}
.muted{color:#777}
"""


# After loading, the page records how many of its images decoded (body[data-images]="ok/total"), so a
# headless browser can confirm that the report renders with its images.
IMAGE_CHECK = """<script>window.addEventListener("load",()=>{const i=[...document.images];
document.body.dataset.images=i.filter(x=>x.complete&&x.naturalWidth>0).length+"/"+i.length;});</script>"""


def _img(b64: str | None, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">' if b64 else ""


def _table(df: pd.DataFrame, max_rows: int = 50) -> str:
    shown = df.head(max_rows).copy()
    for col in shown.columns:
        if pd.api.types.is_float_dtype(shown[col]):
            shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    return shown.to_html(index=False, border=0, escape=True)


def _thumb(path: Path) -> str | None:
    from imat.data.decode import ImageDecodeError, decode_image

    try:  # the pixel limit applies (a bomb gets no thumbnail); a big JPEG decodes at a DCT scale
        image = decode_image(path, "cv2", min_side=128)[..., ::-1]  # RGB -> BGR for imencode
    except ImageDecodeError:
        return None
    h, w = image.shape[:2]
    scale = 128 / max(h, w)
    if scale < 1:
        image = cv2.resize(
            image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
        )
    ok, png = cv2.imencode(".png", np.ascontiguousarray(image))
    return base64.b64encode(png.tobytes()).decode("ascii") if ok else None


def _truth_and_pred(data: RunData) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    preds, sol = data.predictions, data.solution
    if preds is None or sol is None or "id" not in sol.columns:
        return None
    truth_col = next((c for c in ("expected", "label", "predicted") if c in sol.columns and c != "id"), None)
    if truth_col is None or "topk_labels" not in preds.columns:
        return None
    top1 = {
        str(i): (str(list(t)[0]) if len(t) else "")
        for i, t in zip(preds["image_id"], preds["topk_labels"], strict=True)
    }
    merged = sol.assign(id=sol["id"].astype(str), truth=sol[truth_col].astype(str).str.split().str[0])
    merged["pred"] = merged["id"].map(top1).fillna("")
    labels = sorted(set(merged["truth"]), key=lambda s: (len(s), s))
    return merged["truth"].to_numpy(), merged["pred"].to_numpy(), labels


# The audit's own columns, as short captions; other audit CSVs fall back to every column.
AUDIT_CAPTION = (("rank", "#{}"), ("given_label", "given {}"), ("suggested_label", "teachers say {}"))


def _audit_caption(row: pd.Series, columns: pd.Index, path_col: str | None) -> str:
    if all(k in columns for k, _ in AUDIT_CAPTION):
        parts = [fmt.format(row[k]) for k, fmt in AUDIT_CAPTION]
        if "p_given" in columns:
            parts.append(f"p(given)={float(row['p_given']):.2f}")
        return " · ".join(parts)
    return " · ".join(
        f"{k}={row[k]:.3g}" if isinstance(row[k], float) else f"{k}={row[k]}"
        for k in columns
        if k not in (path_col, "abs_path")
    )[:160]


def _audit_section(data: RunData, limit: int = 48) -> str:
    df = data.audit
    if df is None or df.empty:
        return ""
    path_col = next((c for c in ("abs_path", "file", "path") if c in df.columns), None)
    figures = []
    for _, row in df.head(limit).iterrows():
        thumb = None
        if path_col:
            p = Path(str(row[path_col]))
            if not p.is_absolute() and data.audit_dir is not None:
                p = data.audit_dir / p
            thumb = _thumb(p)
        caption = _audit_caption(row, df.columns, path_col)
        src = (
            f'<img alt="audit image" src="data:image/png;base64,{thumb}">'
            if thumb
            else "<div class=muted>(no image)</div>"
        )
        figures.append(f"<figure>{src}<figcaption>{html.escape(caption)}</figcaption></figure>")
    return (
        "<h2>Most suspicious training labels (teacher audit)</h2>"
        + _label_steps(data)
        + f"<p class=muted>{len(df)} images ranked; the first {min(limit, len(df))} shown.</p>"
        f"<div class=gallery>{''.join(figures)}</div>"
    )


def _submission_section(data: RunData) -> str:
    """The one sentence that says which model was submitted and why, and the candidates compared."""
    from imat.app.submission_choice import format_candidates

    sub = data.submission
    if not sub:
        return ""
    cands = pd.DataFrame(sub.get("candidates") or [])
    table = ""
    if not cands.empty:
        shown = format_candidates(sub, text=False).rename(
            columns={"top-1 err %": "val top-1 err %", "top-3 err %": "val top-3 err %"}
        )
        shown["best epoch"] = cands["best_epoch"].map(lambda v: "" if pd.isna(v) else str(int(v)))
        shown["last epoch"] = cands["last_epoch"].map(lambda v: "" if pd.isna(v) else str(int(v)))
        shown["best epoch picked on"] = cands["picked_on"]
        shown["errors from"] = cands.get("measured_on", pd.Series(["checkpoint"] * len(cands)))
        shown["checkpoint"] = cands["checkpoint"]
        table = shown.to_html(index=False, border=0, escape=True)
    budget = f" Budget: {sub['budget']}." if sub.get("budget") else ""
    return (
        f"<h2>Submitted model</h2><p>{html.escape(str(sub.get('reason', '')))}</p>"
        f"{f'<p class=muted>{html.escape(budget.strip())}</p>' if budget else ''}{table}"
        f"<p class=muted>Exported: {html.escape(str(sub.get('checkpoint', '')))}; each student's "
        f"best epoch is the one its best.safetensors holds; images/s at submit.batch_size on this "
        f"machine's provider, divided by the TTA views.</p>"
    )


def _adversarial_note(curves: pd.DataFrame) -> str:
    """What the discriminators did: their last balanced accuracy per block, or that they were inert."""
    cols = [c for c in curves.columns if c.startswith("d_acc_b")]
    if not cols or curves.empty:
        return ""
    last = ", ".join(f"block {c[len('d_acc_b') :]} {float(curves[c].iloc[-1]):.2f}" for c in cols)
    if "adversarial" in curves.columns and str(curves["adversarial"].iloc[-1]) == "inert":
        return (
            "<p><b>Adversarial term inert:</b> every discriminator stayed at chance (balanced accuracy "
            f"within 0.5 ± 0.05) for the whole run (last epoch: {html.escape(last)}).</p>"
        )
    return f"<p class=muted>Discriminators' balanced accuracy in the last epoch: {html.escape(last)}.</p>"


def _epochs_note(curves: pd.DataFrame, config: dict[str, Any]) -> str:
    """Last epoch trained and the epoch best.safetensors holds (the last one marked is_best)."""
    if "epoch" not in curves.columns or curves.empty:
        return ""
    last = int(curves["epoch"].max())
    if "is_best" not in curves.columns:
        return f"<p class=muted>Last epoch {last}.</p>"
    best_rows = curves[curves["is_best"].astype(str).str.lower().isin(["true", "1"])]
    if best_rows.empty:
        return f"<p class=muted>Last epoch {last}.</p>"
    best = int(best_rows["epoch"].iloc[-1])
    metric = ((config.get("distill") or {}).get("train") or {}).get("best_metric", "top1")
    on = f"validation {metric}" if any(c.startswith("val_") for c in curves.columns) else "training loss"
    return f"<p class=muted>Last epoch {last}; best.safetensors holds epoch {best} (best {on}).</p>"


def _label_steps(data: RunData) -> str:
    """Where the audit's probabilities came from, what it found, and the cleaning it fed (if any)."""
    parts = []
    if data.audit_info:
        info = {k: v for k, v in data.audit_info.items() if isinstance(v, int | float | str | bool)}
        parts.append(_table(pd.DataFrame([info])))
    if data.clean is not None:
        parts += ["<h3>Cleaning applied before training (data.clean)</h3>", _table(data.clean)]
    return "".join(parts)


def render(data: RunData) -> str:
    parts = [f"<h1>imat report: {html.escape(str(data.run_dir))}</h1>"]
    if data.results is not None:
        parts += [
            "<h2>Results</h2>",
            _table(data.results),
            _img(plots.accuracy_vs_cost(data.results), "accuracy vs cost"),
        ]
    parts.append(_submission_section(data))
    if data.score:
        parts += ["<h2>Leaderboard score</h2>", _table(pd.DataFrame([data.score]))]
    if data.pool_eval is not None:
        parts += ["<h2>Teacher pool and ensemble (validation)</h2>", _table(data.pool_eval)]
    if data.teacher_curves:
        parts.append("<h2>Teacher training curves</h2>")
        parts += [
            _img(plots.training_curves(name, df), f"{name} curves")
            for name, df in data.teacher_curves.items()
        ]
    if data.student_curves is not None:
        parts += [
            "<h2>Student training curves</h2>",
            _img(plots.training_curves("student", data.student_curves), "student curves"),
            _epochs_note(data.student_curves, data.config),
            _adversarial_note(data.student_curves),
        ]
    tp = _truth_and_pred(data)
    if tp is not None:
        truth, pred, labels = tp
        parts += [
            "<h2>Test predictions</h2>",
            _img(plots.confusion(truth, pred, labels), "confusion matrix"),
            _img(plots.per_class_accuracy(truth, pred), "per-class accuracy"),
        ]
    parts.append(_audit_section(data))
    if data.export_info:
        flat = {k: v for k, v in data.export_info.items() if isinstance(v, int | float | str | bool)}
        verify = data.export_info.get("verification")
        if isinstance(verify, dict):
            flat.update(
                {f"verify_{k}": v for k, v in verify.items() if isinstance(v, int | float | str | bool)}
            )
        parts += [
            "<h2>ONNX export verification</h2>",
            _table(pd.DataFrame([flat]).T.reset_index().set_axis(["key", "value"], axis=1)),
        ]
    if not any(parts[1:]):
        parts.append("<p class=muted>This run directory holds no results yet.</p>")
    body = "\n".join(p for p in parts if p)
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>imat report</title><style>{STYLE}</style>"
        f"</head><body>{body}{IMAGE_CHECK}</body></html>"
    )


def build_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write RUN_DIR/report.html (or ``out``) and return its path."""
    root = require_dir(run_dir, "run directory")
    target = Path(out) if out else root / "report.html"
    write_text(target, render(collect(root)))
    return target
