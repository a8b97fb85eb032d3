"""Train the teacher pool: one shared engine run per teacher, each with its own recipe.

A teacher is a plain classification task (cross-entropy, optional label smoothing and Mixup/CutMix)
on the run's manifest, at its own input size and augmentation preset. After each teacher ``pool.json``
is updated, so an interrupted pool keeps every finished teacher and ``--resume`` continues the rest.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imat.config import RunConfig, TeacherSpec, save_resolved
from imat.engine.runtime import is_main_rank
from imat.errors import ImatError
from imat.manifest import ClassMap, prepare_manifest
from teachers.build import count_params, create_model, resolve_data_config
from teachers.pool import TeacherEntry, read_pool_json, update_pool_entry

log = logging.getLogger(__name__)


@dataclass
class TeacherResult:
    name: str
    arch: str
    input_size: int
    status: str  # trained | skipped
    epochs: int
    val_top1: float | None
    val_top3: float | None
    wall_s: float


def select_specs(cfg: RunConfig, only: list[str] | None, source: str = "config") -> list[TeacherSpec]:
    specs = list(cfg.teachers.pool)
    if not specs:
        raise ImatError(f"{source}: teachers.pool is empty: list at least one teacher (name, arch, ...)")
    if only:
        names = [s.name for s in specs]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ImatError(
                f"{source}: no teacher named {', '.join(unknown)} in teachers.pool (have {', '.join(names)})"
            )
        specs = [s for s in specs if s.name in only]
    return specs


def read_summary(out_dir: str | os.PathLike[str]) -> pd.DataFrame | None:
    p = Path(out_dir) / "summary.csv"
    if not p.is_file():
        return None
    try:
        return pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None


def epochs_done(summary: pd.DataFrame | None) -> int:
    if summary is None or summary.empty:
        return 0
    return len(summary)


def is_finished(out_dir: str | os.PathLike[str], spec: TeacherSpec) -> bool:
    """True when the teacher's best weights exist and its summary covers every planned epoch."""
    if not (Path(out_dir) / "best.safetensors").is_file():
        return False
    return epochs_done(read_summary(out_dir)) >= spec.train.epochs


def best_row(summary: pd.DataFrame | None, best_metric: str) -> dict[str, Any]:
    """The summary row of the epoch whose weights are ``best.safetensors`` (by the recipe's metric)."""
    if summary is None or summary.empty:
        return {}
    if "is_best" in summary and summary["is_best"].astype(bool).any():
        return summary[summary["is_best"].astype(bool)].iloc[-1].to_dict()
    column = {"top1": "val_top1", "top3": "val_top3", "loss": "val_loss"}[best_metric]
    if column not in summary or summary[column].isna().all():
        return summary.iloc[-1].to_dict()
    values = summary[column]
    pos = values.idxmin() if best_metric == "loss" else values.idxmax()
    return summary.loc[pos].to_dict()


def _num(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def teacher_meta(spec: TeacherSpec, data_cfg: dict[str, Any], classes: ClassMap) -> dict[str, Any]:
    """What ``best.safetensors`` carries so a teacher can be rebuilt from its weights alone."""
    return {
        "name": spec.name,
        "kind": "teacher",
        "arch": spec.arch,
        "num_classes": classes.num_classes,
        "input_size": data_cfg["input_size"],
        "mean": data_cfg["mean"],
        "std": data_cfg["std"],
        "crop_pct": data_cfg["crop_pct"],
        "model_kwargs": dict(spec.model_kwargs),
        "classes": classes.to_dict(),
    }


def pool_entry(
    spec: TeacherSpec, pool_dir: Path, data_cfg: dict[str, Any], num_classes: int, params: int | None
) -> TeacherEntry:
    """pool.json's record of a teacher from its folder (summary.csv + the recipe)."""
    summary = read_summary(pool_dir / spec.name)
    row = best_row(summary, spec.train.best_metric)
    best = pool_dir / spec.name / "best.safetensors"
    if best.is_file():  # the engine records the metrics of the saved epoch in the weights themselves
        from imat.weights import read_meta

        metrics = read_meta(best).get("metrics") or {}
        row = {**row, **{k: v for k, v in metrics.items() if k in ("val_top1", "val_top3")}}
    return TeacherEntry(
        name=spec.name,
        arch=spec.arch,
        num_classes=num_classes,
        input_size=int(data_cfg["input_size"]),
        mean=list(data_cfg["mean"]),
        std=list(data_cfg["std"]),
        crop_pct=float(data_cfg["crop_pct"]),
        weights=f"{spec.name}/best.safetensors",
        val_top1=_num(row.get("val_top1")),
        val_top3=_num(row.get("val_top3")),
        params=params,
        epochs=epochs_done(summary),
        model_kwargs=dict(spec.model_kwargs),
        pool_dir=pool_dir,
    )


def split_frames(
    cfg: RunConfig, df: pd.DataFrame, classes: ClassMap, manifest: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and val rows of the manifest; the configured label noise and cleaning apply to train only."""
    from imat.data import run_splits

    train_df, val_df, _ = run_splits(cfg, df, classes.num_classes)
    if train_df.empty:
        raise ImatError(f"{manifest}: no labelled train images (set data.train)")
    if val_df.empty:
        raise ImatError(f"{manifest}: no labelled val images: teachers need data.val to be evaluated")
    return train_df, val_df


def train_teacher(
    cfg: RunConfig,
    spec: TeacherSpec,
    classes: ClassMap,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    *,
    resume: bool = False,
    progress: bool = True,
) -> tuple[pd.DataFrame, int]:
    """One engine run for ``spec`` into ``POOL/<name>/``; returns (summary, parameter count)."""
    from imat.data import build_mixup, recipe_loaders
    from imat.engine import ClassificationTask, Engine, seed_everything

    out_dir = cfg.pool_dir / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    data_cfg = resolve_data_config(spec)
    seed_everything(spec.train.seed)  # the run's seed fixes the initial weights (every rank alike)
    model = create_model(spec, classes.num_classes)
    params = count_params(model)
    recipe = spec.train
    mixup = build_mixup(recipe.aug, classes.num_classes)
    task = ClassificationTask(model, label_smoothing=recipe.aug.label_smoothing, mixup=mixup)
    train_loader, val_loader = recipe_loaders(
        recipe,
        data_cfg,
        train_df,
        val_df,
        images=cfg.data.images,
        decoder=cfg.data.decoder,
        num_workers=cfg.data.num_workers,
        max_pixels=cfg.data.max_pixels,
        draft=cfg.data.draft,
        decode=cfg.data.decode,
    )
    if is_main_rank():
        save_resolved(cfg, out_dir / "config.yaml")
    engine = Engine(
        task,
        recipe,
        out_dir,
        train_loader,
        val_loader,
        meta=teacher_meta(spec, data_cfg, classes),
        log_name=f"teacher {spec.name}",
        progress=progress,
    )
    summary = engine.fit(resume=resume)
    return summary, params


def label_record(cfg: RunConfig, df: pd.DataFrame, num_classes: int) -> dict[str, Any]:
    """What pool.json keeps of the labels a pool saw: ``data.label_noise`` and ``data.clean`` (with the
    audit's path and hash), so a later command (``imat data audit`` without a config) sees them too."""
    record: dict[str, Any] = {"label_noise": cfg.data.label_noise.model_dump(mode="json"), "clean": None}
    if cfg.clean_csv is not None:
        from imat.data import labelled_splits
        from imat.data.clean import cleaning_record

        noisy, _, _ = labelled_splits(df, cfg.data.label_noise, num_classes)
        record["clean"] = cleaning_record(noisy, cfg.data.clean, cfg.clean_csv)
    return record


def train_pool(
    cfg: RunConfig,
    *,
    only: list[str] | None = None,
    resume: bool = False,
    force: bool = False,
    source: str = "config",
    subset: pd.Series | list[str] | None = None,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[TeacherResult]:
    """Train every teacher of ``cfg.teachers.pool`` (or those named in ``only``) into the pool folder.

    A teacher whose ``best.safetensors`` exists and whose summary covers its planned epochs is skipped
    (unless ``force``); one with a partial run restarts, or continues from ``last.ckpt`` with ``resume``.
    ``pool.json`` is updated after each teacher. ``subset``: image ids of the training rows to train on
    (the label audit's cross-fitting), after label noise and cleaning; ``provenance`` is merged into
    pool.json beside the label record. ``progress=False``: no bars, epoch lines or tables."""
    specs = select_specs(cfg, only, source)
    for spec in specs:  # fail on a bad arch before spending minutes on the manifest or a first teacher
        resolve_data_config(spec)
    df, classes, manifest = prepare_manifest(cfg)
    train_df, val_df = split_frames(cfg, df, classes, manifest)
    if subset is not None:
        train_df = train_df[train_df["image_id"].astype(str).isin(set(map(str, subset)))]
        train_df = train_df.reset_index(drop=True)
        if train_df.empty:
            raise ImatError(f"{manifest}: none of the {len(subset)} requested training images is a train row")
    pool_dir = cfg.pool_dir
    pool_dir.mkdir(parents=True, exist_ok=True)
    if is_main_rank() and subset is None:  # a cross-fitting fold is part of a run, not the run itself
        save_resolved(cfg, cfg.run_path / "config.yaml")
    extra = {
        "manifest": os.path.relpath(manifest.resolve(), pool_dir.resolve()),
        "images": str(Path(cfg.data.images).resolve()) if cfg.data.images else None,
        "decoder": cfg.data.decoder,
        **label_record(cfg, df, classes.num_classes),
        "train_images": len(train_df),
        **(provenance or {}),
    }
    previous = read_pool_json(pool_dir, missing_ok=True)
    changed = [k for k in ("label_noise", "clean") if k in previous and previous[k] != extra[k]]
    if changed and not force:  # finished teachers learnt other labels: they are not this config's pool
        log.warning("%s: the pool was trained with another %s: retraining its teachers", pool_dir, changed[0])
        force = True
    results: list[TeacherResult] = []
    for spec in specs:
        out_dir = pool_dir / spec.name
        data_cfg = resolve_data_config(spec)
        start = time.perf_counter()
        if not force and is_finished(out_dir, spec):
            status, params = "skipped", None
            log.info("teacher %s: finished earlier (%s), skipped", spec.name, out_dir)
        else:
            log.info(
                "teacher %s: %s at %d px, %d epochs, %s preset",
                spec.name,
                spec.arch,
                data_cfg["input_size"],
                spec.train.epochs,
                spec.train.aug.preset,
            )
            can_resume = resume and (out_dir / "last.ckpt").is_file() and not force
            _, params = train_teacher(
                cfg, spec, classes, train_df, val_df, resume=can_resume, progress=progress
            )
            status = "trained"
        if params is None:
            params = count_params(create_model(spec, classes.num_classes, load_weights=False))
        entry = pool_entry(spec, pool_dir, data_cfg, classes.num_classes, params)
        if is_main_rank():
            update_pool_entry(pool_dir, entry, extra=extra)
        results.append(
            TeacherResult(
                spec.name,
                spec.arch,
                entry.input_size,
                status,
                entry.epochs or 0,
                entry.val_top1,
                entry.val_top3,
                time.perf_counter() - start,
            )
        )
    return results


def results_table(results: list[TeacherResult]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None or np.isnan(v) else f"{100 * v:.2f}"

    df = pd.DataFrame(
        {
            "teacher": [r.name for r in results],
            "arch": [r.arch for r in results],
            "px": [r.input_size for r in results],
            "status": [r.status for r in results],
            "epochs": [r.epochs for r in results],
            "val_top1": [pct(r.val_top1) for r in results],
            "val_top3": [pct(r.val_top3) for r in results],
            "wall_s": [f"{r.wall_s:.1f}" for r in results],
        }
    )
    return df.to_string(index=False)
