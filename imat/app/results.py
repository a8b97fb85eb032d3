"""The comparison table a run ends with: each teacher, the ensemble, the student alone, the MEAL
student (and any other student run the select step compared) and the ONNX student, with top-1/top-3
error on validation, parameters and images/s. ``submitted`` marks the student the pipeline exported
(``RUN_DIR/submission.json``); the ONNX row is that student's export.

Errors come from what the steps measured on the validation split (pool_eval.csv, the student's best
epoch in summary.csv) and, for the ONNX model, from running it over the validation images. Images/s is
model compute only (random input at each model's own size, batch 32, this machine's CPU threads), timed
one model after another in the same process so the figures compare."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from imat.app.submission_choice import find_candidates, read_choice, submitted_onnx
from imat.config import RunConfig
from imat.io import write_csv

BATCH = 32


def time_torch(model: torch.nn.Module, input_size: int, images: int) -> float:
    x = torch.randn(BATCH, 3, input_size, input_size)
    model.eval()
    with torch.inference_mode():
        model(x)  # warm-up
        done, start = 0, time.perf_counter()
        while done < images:
            model(x)
            done += BATCH
    return done / (time.perf_counter() - start)


def time_onnx(path: Path, input_size: int, images: int) -> float:
    from submit.runtime import Runner, create_session

    session, provider = create_session(path, provider="cpu")
    runner = Runner(session, provider)
    x = np.random.default_rng(0).standard_normal((BATCH, 3, input_size, input_size)).astype(np.float32)
    runner(x)
    done, start = 0, time.perf_counter()
    while done < images:
        runner(x)
        done += BATCH
    return done / (time.perf_counter() - start)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _student_row(name: str, student_dir: Path, images: int) -> dict[str, Any] | None:
    from submit.model import load_checkpoint

    weights, summary = student_dir / "best.safetensors", student_dir / "summary.csv"
    if not weights.is_file() or not summary.is_file():
        return None
    df = pd.read_csv(summary)
    best = df[df["is_best"].astype(bool)].tail(1) if "is_best" in df.columns else df.tail(1)
    row = best.iloc[0] if len(best) else df.iloc[-1]
    model, meta, prep, _ = load_checkpoint(weights)
    return {
        "model": name,
        "arch": meta.get("arch"),
        "top1_err": 1 - float(row["val_top1"]),
        "top3_err": 1 - float(row["val_top3"]),
        "params": _params(model),
        "images_per_s": time_torch(model, prep.input_size, images),
        "source": f"{summary} (epoch {int(row['epoch'])})",
        "note": "adversarial term inert"
        if str(df.get("adversarial", pd.Series([""])).iloc[-1]) == "inert"
        else "",
    }


def _onnx_row(cfg: RunConfig, images: int) -> dict[str, Any] | None:
    from submit.predict import predict

    onnx = submitted_onnx(cfg)
    manifest = cfg.manifest_path
    if not onnx.is_file() or not manifest.is_file():
        return None
    info = json.loads(onnx.with_name(onnx.name + ".json").read_text())
    what = "pool" if info.get("pool") else "student"
    preds = predict(
        onnx,
        manifest,
        images=cfg.data.images,
        split="val",
        topk=3,
        provider="cpu",
        workers=cfg.data.num_workers,
        decoder=cfg.data.decoder,
        progress=False,
        max_pixels=cfg.data.max_pixels,
        draft=cfg.data.draft,
    )
    truth = (
        pd.read_parquet(manifest).query("split == 'val'").set_index("image_id")["source_label"].astype(str)
    )
    top = preds.set_index("image_id")["topk_labels"].map(lambda t: [str(x) for x in t])
    given = truth.reindex(top.index)
    top1 = np.mean([len(t) > 0 and t[0] == g for t, g in zip(top, given, strict=True)])
    top3 = np.mean([g in t[:3] for t, g in zip(top, given, strict=True)])
    size = int(info.get("input_size") or cfg.distill.student.input_size)
    return {
        "model": f"{what} (ONNX {info.get('precision', 'fp32')})",
        "arch": info.get("arch"),
        "top1_err": 1 - float(top1),
        "top3_err": 1 - float(top3),
        "params": None,
        "images_per_s": time_onnx(onnx, size, images),
        "source": str(onnx),
        "pool_params": (info.get("pool") or {}).get("params"),
    }


def results_table(cfg: RunConfig) -> pd.DataFrame:
    from submit.model import load_checkpoint

    images = cfg.pipeline.speed_images
    rows: list[dict[str, Any]] = []
    pool_eval = cfg.pool_dir / "pool_eval.csv"
    speeds: dict[str, tuple[int, float]] = {}
    if pool_eval.is_file():
        table = pd.read_csv(pool_eval)
        for _, r in table[table["kind"] == "teacher"].iterrows():
            model, meta, prep, _ = load_checkpoint(cfg.pool_dir / r["name"] / "best.safetensors")
            speeds[r["name"]] = (_params(model), time_torch(model, prep.input_size, images))
            rows.append(
                {
                    "model": f"teacher {r['name']}",
                    "arch": meta.get("arch"),
                    "top1_err": 1 - r["top1"],
                    "top3_err": 1 - r["top3"],
                    "params": speeds[r["name"]][0],
                    "images_per_s": speeds[r["name"]][1],
                    "source": str(pool_eval),
                }
            )
        for _, r in table[table["kind"].isin(["mean", "geomean"])].iterrows():
            members = [m for m in str(r["members"]).replace(",", " ").split() if m in speeds]
            rows.append(
                {
                    "model": r["name"],
                    "arch": "+".join(members),
                    "top1_err": 1 - r["top1"],
                    "top3_err": 1 - r["top3"],
                    "params": sum(speeds[m][0] for m in members),
                    # the ensemble runs every member on each image
                    "images_per_s": 1 / sum(1 / speeds[m][1] for m in members) if members else None,
                    "source": str(pool_eval),
                }
            )
    for row in rows:
        row["submitted"] = False
    # the student alone first, then the distilled student, then other runs (the select step's order)
    cands = sorted(find_candidates(cfg), key=lambda c: {"baseline": 0, "distilled": 1}.get(c.role, 2))
    choice = read_choice(cfg.run_path) or {}
    chosen = Path(choice["checkpoint"]).resolve() if choice.get("checkpoint") else None
    students, exported = [], None
    for cand in cands:
        row = _student_row(cand.name, Path(cand.run_dir), images)
        if row is not None:
            row["submitted"] = chosen is not None and Path(cand.checkpoint).resolve() == chosen
            students.append(row)
            if row["submitted"] or (exported is None and cand.role == "distilled"):
                exported = row
    onnx = _onnx_row(cfg, images)
    if onnx is not None:
        pool_params = onnx.pop("pool_params", None)
        onnx["params"] = pool_params or (exported["params"] if exported is not None else None)
        onnx["submitted"] = False
    rows += students + ([onnx] if onnx is not None else [])
    return pd.DataFrame(
        rows,
        columns=[
            "model",
            "arch",
            "top1_err",
            "top3_err",
            "params",
            "images_per_s",
            "source",
            "submitted",
            "note",
        ],
    )


def format_table(table: pd.DataFrame) -> str:
    shown = pd.DataFrame(
        {
            "model": table["model"],
            "top-1 err %": table["top1_err"].map(lambda v: f"{100 * v:.2f}"),
            "top-3 err %": table["top3_err"].map(lambda v: f"{100 * v:.2f}"),
            "params": table["params"].map(lambda v: "" if pd.isna(v) else f"{v / 1e6:.2f}M"),
            "images/s": table["images_per_s"].map(lambda v: "" if pd.isna(v) else f"{v:,.0f}"),
        }
    )
    if "submitted" in table.columns and table["submitted"].fillna(False).astype(bool).any():
        shown["submitted"] = table["submitted"].fillna(False).astype(bool).map(lambda v: "yes" if v else "")
    notes = table["note"].map(lambda v: "" if pd.isna(v) else str(v)) if "note" in table.columns else None
    if notes is not None and notes.astype(bool).any():
        shown["note"] = notes
    return shown.to_string(index=False)


def write_results(cfg: RunConfig, table: pd.DataFrame) -> Path:
    return write_csv(cfg.run_path / "results.csv", table)
