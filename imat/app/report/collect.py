"""Read what a run directory holds. Every reader returns None when its file is absent, so a report
can be made at any stage of a run (after the teachers only, or after the whole pipeline)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml


def _csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path) if path.is_file() else None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


@dataclass
class RunData:
    run_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    teacher_curves: dict[str, pd.DataFrame] = field(default_factory=dict)
    student_curves: pd.DataFrame | None = None
    pool_eval: pd.DataFrame | None = None
    results: pd.DataFrame | None = None  # the pipeline's comparison table (model, errors, params, images/s)
    export_info: dict[str, Any] | None = None
    predictions: pd.DataFrame | None = None
    solution: pd.DataFrame | None = None
    score: dict[str, Any] | None = None
    submission: dict[str, Any] | None = None  # submission.json: the exported student, the scores compared
    audit: pd.DataFrame | None = None
    audit_dir: Path | None = None
    audit_info: dict[str, Any] | None = None  # audit.json: in- or out-of-sample, folds, issues, flips
    clean: pd.DataFrame | None = None  # the pipeline's clean step (data/clean.json), one row


def _solution_path(run_dir: Path, config: dict[str, Any]) -> Path | None:
    given = (config.get("data") or {}).get("solution")
    return Path(given) if given and Path(given).is_file() else None


def collect(run_dir: str | Path) -> RunData:
    root = Path(run_dir)
    cfg_path = root / "config.yaml"
    config = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    data = RunData(run_dir=root, config=config or {})
    teachers_dir = Path((data.config.get("teachers") or {}).get("dir") or root / "teachers")
    if teachers_dir.is_dir():
        for summary in sorted(teachers_dir.glob("*/summary.csv")):
            df = _csv(summary)
            if df is not None and len(df):
                data.teacher_curves[summary.parent.name] = df
        data.pool_eval = _csv(teachers_dir / "pool_eval.csv")
    data.student_curves = _csv(root / "student" / "summary.csv")
    data.results = _csv(root / "results.csv")
    data.export_info = _json(root / "export" / "student.onnx.json") or _json(
        root / "export" / "pool.onnx.json"
    )
    preds = root / "predictions.parquet"
    if preds.is_file():
        try:
            data.predictions = pd.read_parquet(preds)
        except Exception:  # a half-written or foreign file: the report goes on without it
            data.predictions = None
    solution = _solution_path(root, data.config)
    data.solution = _csv(solution) if solution else None
    data.score = _json(root / "score.json")
    data.submission = _json(root / "submission.json")
    audits = sorted(root.glob("audit/*.csv")) or sorted(root.glob("**/audit*.csv"))
    if audits:
        data.audit = _csv(audits[0])
        data.audit_dir = audits[0].parent
        data.audit_info = _json(audits[0].parent / "audit.json")
    from imat.app.pipeline_labels import read_clean_summary

    data.clean = read_clean_summary(root)
    return data
