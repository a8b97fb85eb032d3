"""The pipeline's label steps, between the manifest and the teachers: a cross-fitted label audit and
the cleaning it feeds (``data.clean: {from: audit, ...}``). Kept apart from :mod:`imat.app.pipeline` so
the step list there only names them; the stage packages are imported lazily, as there."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from imat.config import RunConfig
from imat.io import write_csv, write_json


def uses_run_audit(cfg: RunConfig) -> bool:
    """The config cleans from this run's own (cross-fitted) audit, so the pipeline must make it first."""
    return cfg.data.clean.enabled and cfg.data.clean.from_ == "audit"


def clean_files(cfg: RunConfig) -> tuple[Path, Path]:
    """What the clean step writes: the rows it changes and a summary (read by the report)."""
    return cfg.run_path / "data" / "clean.csv", cfg.run_path / "data" / "clean.json"


def step_label_audit(cfg: RunConfig) -> None:
    """Out-of-sample label audit: ``audit.folds`` cross-fitted teachers, then cleanlab (resumable)."""
    from distill.audit import crossfit_audit

    res = crossfit_audit(cfg, top=max(cfg.pipeline.audit_top, 1), num_workers=cfg.data.num_workers)
    print(
        f"label audit: {res.info['issues']} likely label issues among {len(res.table)} training images "
        f"({cfg.audit.folds}-fold cross-fitted teachers): {res.csv}"
    )


def step_clean(cfg: RunConfig) -> None:
    """Apply ``data.clean`` to the training labels the teachers and the student will see, and say how."""
    from imat.data import labelled_splits
    from imat.data.clean import cleaning_record, plan_cleaning
    from imat.manifest import load_manifest

    df, classes = load_manifest(cfg.manifest_path)
    train, _, _ = labelled_splits(df, cfg.data.label_noise, classes.num_classes)
    csv = cfg.clean_csv
    assert csv is not None  # the step is enabled only then
    plan = plan_cleaning(train, cfg.data.clean, csv)
    plan = plan.assign(
        action=cfg.data.clean.action,
        given_label=[classes.to_source(i) for i in plan["given_index"]],
        suggested_label=[classes.to_source(i) for i in plan["suggested_index"]],
    )
    rows, summary = clean_files(cfg)
    write_csv(rows, plan)
    record = cleaning_record(train, cfg.data.clean, csv)
    write_json(summary, record)
    verb = {"drop": "dropped", "relabel": "relabelled", "downweight": "downweighted"}[cfg.data.clean.action]
    print(f"clean: {verb} {record['images']} of {record['train_images']} training labels ({rows})")


def read_clean_summary(run_dir: Path) -> pd.DataFrame | None:
    """The clean step's summary as a one-row table, or None when the run did not clean."""
    import json

    path = run_dir / "data" / "clean.json"
    if not path.is_file():
        return None
    try:
        return pd.DataFrame([json.loads(path.read_text(encoding="utf-8"))])
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return None
