"""The Python API for notebooks: ``import imat`` and call the steps of a run one by one.

Every function takes the run's config (from :func:`load_config` or :func:`demo_config`) and reads and
writes the same files as the matching command, under ``cfg.run_dir``, so a notebook and the command
line can continue each other's runs. Stages are imported inside the functions: ``import imat`` stays
cheap, and only the stage a call needs is loaded. ``imat/__init__.py`` re-exports these names lazily.

    import imat
    cfg = imat.demo_config("runs/nb", limit=300)        # or imat.load_config("configs/x.yaml", ["k=v"])
    imat.prepare_data(cfg)                               # download (URL-only inputs) + the manifest
    imat.train_pool(cfg); imat.evaluate_pool(cfg)
    imat.distill(cfg)
    onnx = imat.export(cfg)
    imat.predict(cfg); imat.write_submission(cfg)
    imat.score(cfg)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from imat.config import RunConfig

PathLike = str | os.PathLike[str]


def _progress(cfg: RunConfig, progress: bool | None) -> bool:
    return cfg.pipeline.progress if progress is None else progress


def load_config(path: PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run's YAML config, apply ``k=v`` overrides by dotted path (``"distill.lr=0.05"``) and
    validate it; raises :class:`imat.errors.ImatError` naming the file, key or value at fault."""
    from imat.config import load_config as _load

    return _load(path, list(overrides))


def demo_config_path() -> Path:
    """The demo config shipped inside the package (a copy of the repository's configs/demo.yaml)."""
    from importlib import resources

    return Path(str(resources.files("imat") / "configs" / "demo.yaml"))


def demo_config(
    out: PathLike = "runs/demo", overrides: Sequence[str] = (), *, seed: int = 0, limit: int | None = None
) -> RunConfig:
    """The config of ``imat demo``: writes the embedded MNIST kit under ``OUT/kit`` (once; ``limit``
    keeps a class-balanced subset of that many digits) and returns the shipped demo config pointed at
    it, with ``run_dir=OUT`` and the images downloaded to ``OUT/images``."""
    from imat.kit import write_kit

    out = Path(out)
    kit = out / "kit"
    if not (kit / "train.json").is_file():
        write_kit("mnist5k", kit, seed=seed, limit=limit)
    base = [
        f"run_dir={out}",
        f"data.train={kit / 'train.json'}",
        f"data.val={kit / 'val.json'}",
        f"data.test={kit / 'test.json'}",
        f"data.solution={kit / 'solution.csv'}",
        f"data.images={out / 'images'}",
    ]
    return load_config(demo_config_path(), [*base, *overrides])


def prepare_data(cfg: RunConfig) -> pd.DataFrame:
    """Fetch the images of URL-only inputs into ``data.images`` (resumable) and write the run's manifest
    (``RUN_DIR/data/manifest.parquet``); returns the manifest, one row per image."""
    from imat.app.pipeline import step_data
    from imat.manifest import load_manifest

    step_data(cfg)
    return load_manifest(cfg.manifest_path)[0]


def train_pool(cfg: RunConfig, *, resume: bool = True, progress: bool | None = None) -> list[Any]:
    """Train every teacher of ``teachers.pool`` into ``RUN_DIR/teachers/`` (finished teachers are kept,
    stopped ones resume); returns one result per teacher (name, arch, status, val top-1/top-3)."""
    from teachers.train import train_pool as _train_pool

    return _train_pool(cfg, resume=resume, progress=_progress(cfg, progress))


def evaluate_pool(cfg: RunConfig, *, progress: bool | None = None) -> pd.DataFrame:
    """Each teacher's and the ensemble's top-1/top-3 on the validation split (also written to
    ``RUN_DIR/teachers/pool_eval.csv``); returns that table."""
    from teachers.evaluate import evaluate_pool as _evaluate_pool

    result = _evaluate_pool(
        cfg.pool_dir,
        tta_flip=cfg.teachers.tta_flip,
        num_workers=cfg.data.num_workers,
        progress=_progress(cfg, progress),
    )
    return result.table


def distill(cfg: RunConfig, *, resume: bool = True, progress: bool | None = None) -> pd.DataFrame:
    """Distil the pool into the student of ``cfg.distill`` (method meal | meal-v2 | kd | ce) under
    ``RUN_DIR/student/``; returns the per-epoch summary (``summary.csv``)."""
    from distill.train import distill as _distill

    return _distill(cfg, resume=resume, progress=_progress(cfg, progress))


def export(
    cfg: RunConfig,
    checkpoint: PathLike | None = None,
    out: PathLike | None = None,
    *,
    progress: bool | None = None,
) -> Path:
    """Export a student checkpoint to ONNX at ``out`` (default ``RUN_DIR/export/student.onnx``), verified
    against PyTorch on validation images at ``export.precision``; returns the ONNX path. The default
    checkpoint is the model the pipeline's select step chose (``RUN_DIR/submission.json``) when there
    is one, else the distilled student (``RUN_DIR/student/best.safetensors``)."""
    from imat.app.submission_choice import chosen_checkpoint, read_choice, submitted_onnx

    record = read_choice(cfg.run_path) if checkpoint is None else None
    if checkpoint is not None:
        ckpt = Path(checkpoint)
    elif record is not None:
        ckpt = chosen_checkpoint(cfg)
    else:
        ckpt = cfg.run_path / "student" / "best.safetensors"
    pool = record if record is not None and record.get("kind") == "pool" else None
    if pool is None and ckpt.is_dir():  # a teacher pool folder passed by hand
        pool = {"selected": False, "method": None}
    default = submitted_onnx(cfg) if checkpoint is None else cfg.run_path / "export" / "student.onnx"
    out = Path(out) if out is not None else default
    export_report(cfg, ckpt, out, _progress(cfg, progress), pool=pool)
    return out


def export_report(
    cfg: RunConfig, ckpt: Path, out: Path, progress: bool, pool: dict[str, Any] | None = None
) -> dict[str, Any]:
    """:func:`export` with the checkpoint chosen, returning the export's report (the pipeline's step).
    ``pool`` (``selected``, ``method``): ``ckpt`` is a teacher pool folder, exported as one model."""
    from submit.export import export_model
    from submit.inputs import read_images

    images = read_images(cfg.manifest_path, cfg.data.images, split="val")
    calib = read_images(cfg.manifest_path, cfg.data.images, split="train")
    verify = images.sample(n=min(len(images), cfg.export.verify_images), random_state=0)
    calib = calib.sample(n=min(len(calib), cfg.export.calibration_images), random_state=0)
    if pool is not None:
        from submit.pool_export import export_pool

        return export_pool(
            ckpt,
            out,
            verify,
            calib,
            cfg.export,
            selected=bool(pool.get("selected")),
            method=pool.get("method"),
            decoder=cfg.data.decoder,
            progress=progress,
        )
    return export_model(ckpt, out, verify, calib, cfg.export, decoder=cfg.data.decoder, progress=progress)


def predict(
    cfg: RunConfig,
    model: PathLike | None = None,
    source: PathLike | None = None,
    out: PathLike | None = None,
    *,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Top-k predictions of an ONNX model (default the submitted one, ``RUN_DIR/export/student.onnx``
    or ``pool.onnx``) for every image of ``source`` (default ``data.test``) with onnxruntime, written to
    ``out`` (default ``RUN_DIR/predictions.parquet``); returns them (``image_id``, ``topk_labels``,
    ``topk_scores``). TTA (``submit.tta_flip``, ``submit.tta_scales``) is the one the select step chose
    for the submitted model when there is a choice, else the config's."""
    from imat.app.submission_choice import submitted_onnx, submitted_postprocessing
    from imat.errors import ImatError
    from submit.predict import predict as _predict

    source = source if source is not None else cfg.data.test
    if not source:
        raise ImatError("data.test is not set: nothing to predict")
    flip, scales, prior = submitted_postprocessing(cfg)
    if model is not None:
        flip, scales = cfg.submit.tta_flip, cfg.submit.tta_scales
    return _predict(
        model if model is not None else submitted_onnx(cfg),
        source,
        out=out if out is not None else cfg.run_path / "predictions.parquet",
        images=cfg.data.images,
        split="test",
        topk=cfg.submit.topk,
        provider=cfg.submit.provider,
        batch_size=cfg.submit.batch_size,
        tta_flip=flip,
        tta_scales=scales,
        workers=cfg.data.num_workers,
        save_probs=prior,
        decoder=cfg.data.decoder,
        progress=_progress(cfg, progress),
        max_pixels=cfg.data.max_pixels,
        draft=cfg.data.draft,
    )


def write_submission(
    cfg: RunConfig, predictions: PathLike | None = None, out: PathLike | None = None
) -> Path:
    """Write the competition's submission (``submit.format``) from the predictions (default
    ``RUN_DIR/predictions.parquet``) to ``out`` (default ``RUN_DIR/submission.csv``), validated
    against the test file: the competition's header, every test id once, in its order."""
    out = Path(out) if out is not None else cfg.run_path / "submission.csv"
    submission_stats(cfg, predictions, out)
    return out


def submission_stats(cfg: RunConfig, predictions: PathLike | None, out: Path) -> dict[str, Any]:
    """:func:`write_submission`, returning what the writer reports (rows, fallbacks; the pipeline's step)."""
    from imat.app.submission_choice import submitted_postprocessing
    from submit.formats import write_submission as _write

    return _write(
        predictions if predictions is not None else cfg.run_path / "predictions.parquet",
        cfg.submit.format,
        cfg.data.test,
        out,
        sample=cfg.submit.sample_submission,
        train=cfg.manifest_path,
        prior_correction=submitted_postprocessing(cfg)[2],
        topk=cfg.submit.topk,
    )


def score(
    cfg: RunConfig | None = None,
    submission: PathLike | None = None,
    solution: PathLike | None = None,
    metric: str = "top3",
) -> dict[str, Any]:
    """Top-1/top-3 accuracy and error of a submission (default ``RUN_DIR/submission.csv``) against a
    solution file (default ``data.solution``); ``score`` is the error of ``metric``."""
    from imat.errors import ImatError
    from submit.score import score as _score

    if submission is None or solution is None:
        if cfg is None:
            raise ImatError("score: pass a config, or both submission and solution")
        submission = submission if submission is not None else cfg.run_path / "submission.csv"
        solution = solution if solution is not None else cfg.data.solution
    if not solution:
        raise ImatError("score: no solution file (data.solution is not set)")
    return _score(submission, solution, metric=metric)


def run_pipeline(cfg: RunConfig, *, force: str | None = None, until: str | None = None) -> pd.DataFrame:
    """Every step of ``imat pipeline`` in order, skipping steps whose outputs exist (``force`` reruns
    from that step, ``until`` stops after it); returns one row per step (step, status, seconds)."""
    import pandas as pd

    from imat.app.pipeline import run_pipeline as _run

    return pd.DataFrame(_run(cfg, force=force, until=until), columns=["step", "status", "seconds"])


__all__ = [
    "demo_config",
    "distill",
    "evaluate_pool",
    "export",
    "load_config",
    "predict",
    "prepare_data",
    "run_pipeline",
    "score",
    "train_pool",
    "write_submission",
]
