"""`imat pipeline CONFIG`: every step from competition files to a scored submission and a report.

Each step reads files and writes files. When a step finishes it leaves a marker in
``RUN_DIR/.pipeline/``; a step whose marker and outputs exist is skipped, so a killed pipeline picks
up where it stopped (and the step that was running resumes from its own checkpoint). A step that runs
makes every later step run too, since their inputs may have changed (a new baseline changes the choice
of the submitted model; training steps that finished resume as no-ops). ``--force STEP`` reruns that
step and every step after it. The stage packages are imported lazily, step by step:
``imat`` itself imports none of them (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imat.app.pipeline_labels import clean_files, step_clean, step_label_audit, uses_run_audit
from imat.config import RunConfig, save_resolved
from imat.errors import ImatError
from imat.io import write_json

log = logging.getLogger("imat.app.pipeline")

MARKERS = ".pipeline"


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[RunConfig], None]
    outputs: Callable[[RunConfig], list[Path]]  # what must exist for the step to count as done
    enabled: Callable[[RunConfig], bool] = lambda cfg: True
    current: Callable[[RunConfig], bool] = lambda cfg: True  # are the outputs still valid for this config?


def _student(cfg: RunConfig) -> Path:
    return cfg.run_path / "student" / "best.safetensors"


def _onnx(cfg: RunConfig) -> Path:
    from imat.app.submission_choice import submitted_onnx

    return submitted_onnx(cfg)


def _choice_current(cfg: RunConfig) -> bool:
    from imat.app.submission_choice import choice_is_current

    return choice_is_current(cfg)


def _distils(cfg: RunConfig) -> bool:
    """Whether the run's method learns from the teachers (else its student is the baseline itself)."""
    from distill.methods import get_method

    return get_method(cfg.distill.method).needs_teachers


def _baseline_cfg(cfg: RunConfig) -> RunConfig:
    """The student alone: the same student and recipe, plain CE on the labels, beside the MEAL run."""
    distill = cfg.distill.model_copy(update={"method": "ce"})
    teachers = cfg.teachers.model_copy(update={"dir": str(cfg.pool_dir)})
    return cfg.model_copy(
        update={"run_dir": str(cfg.run_path / "baseline"), "distill": distill, "teachers": teachers}
    )


# -- the steps -----------------------------------------------------------------------------------------


def step_data(cfg: RunConfig) -> None:
    """Fetch the images of URL-only competitions (resumable), then write the manifest."""
    from imat.download import download
    from imat.formats import read_split, write_manifest

    for split in ("train", "val", "test"):
        source = getattr(cfg.data, split)
        if not source or not Path(source).is_file() or not cfg.data.images:
            continue
        rows = read_split(source, "test")  # labels are not needed to fetch images
        rows = rows[rows["url"].astype(str) != ""]
        if len(rows):
            report = download(
                rows,
                cfg.data.images,
                workers=cfg.pipeline.download_workers,
                max_side=cfg.pipeline.download_max_side,
                progress=cfg.pipeline.progress,
            )
            print(report.format())
            if not (report.status["status"].isin(["ok", "skipped"])).any():
                raise ImatError(
                    f"{source}: no image could be fetched into {cfg.data.images} (see download_status.csv)"
                )
    path = write_manifest(cfg)
    print(f"manifest: {path}")


def step_teachers(cfg: RunConfig) -> None:
    from teachers.train import results_table, train_pool

    print(results_table(train_pool(cfg, resume=True, progress=cfg.pipeline.progress)))


def step_evaluate(cfg: RunConfig) -> None:
    from teachers.evaluate import describe_selection, evaluate_pool, table_for_print

    result = evaluate_pool(
        cfg.pool_dir,
        tta_flip=cfg.teachers.tta_flip,
        num_workers=cfg.data.num_workers,
        progress=cfg.pipeline.progress,
    )
    print(table_for_print(result.table))
    print(describe_selection(result.selection))


def step_audit(cfg: RunConfig) -> None:
    """Rank training images by how strongly the pool disagrees with their label (report gallery)."""
    from distill.audit import audit

    res = audit(
        cfg.pool_dir,
        cfg,
        top=cfg.pipeline.audit_top,
        num_workers=cfg.data.num_workers,
        progress=cfg.pipeline.progress,
    )
    print(f"audit: {res.csv} ({len(res.table)} training images ranked)")


def step_distill(cfg: RunConfig) -> None:
    from distill.train import distill

    distill(cfg, resume=True, progress=cfg.pipeline.progress)


def step_baseline(cfg: RunConfig) -> None:
    from distill.train import distill

    distill(_baseline_cfg(cfg), resume=True, progress=cfg.pipeline.progress)


def step_select(cfg: RunConfig) -> None:
    """Choose the student to export: the best on validation, or the one pipeline.submit_model forces."""
    from imat.app.submission_choice import choose_submission

    print(choose_submission(cfg)["reason"])


def step_export(cfg: RunConfig) -> None:
    from imat.app.api import export_report
    from imat.app.submission_choice import chosen_checkpoint, read_choice

    record = read_choice(cfg.run_path) or {}
    ckpt = chosen_checkpoint(cfg)
    pool = record if record.get("kind") == "pool" else None
    report = export_report(cfg, ckpt, _onnx(cfg), cfg.pipeline.progress, pool=pool)
    print(f"export: {ckpt} -> {_onnx(cfg)} ({report.get('precision', cfg.export.precision)})")


def step_predict(cfg: RunConfig) -> None:
    from imat.app.api import predict

    if not cfg.data.test:
        raise ImatError("pipeline: data.test is not set: nothing to predict")
    predict(cfg)


def step_submit(cfg: RunConfig) -> None:
    from imat.app.api import submission_stats

    stats = submission_stats(cfg, None, cfg.run_path / "submission.csv")
    print(f"submission: {cfg.run_path / 'submission.csv'} ({stats})")


def step_score(cfg: RunConfig) -> None:
    from submit.score import score

    result = score(cfg.run_path / "submission.csv", cfg.data.solution, metric="top3")
    write_json(cfg.run_path / "score.json", result)
    print(f"score: {result}")


def step_results(cfg: RunConfig) -> None:
    from imat.app.results import results_table, write_results

    print(f"results: {write_results(cfg, results_table(cfg))}")


def step_report(cfg: RunConfig) -> None:
    from imat.app.report import build_report

    print(f"report: {build_report(cfg.run_path)}")


STEPS: list[Step] = [
    Step("data", step_data, lambda c: [c.manifest_path]),
    # data.clean from this run's audit: cross-fitted audit -> clean -> teachers (imat/app/pipeline_labels.py)
    Step("label_audit", step_label_audit, lambda c: [c.audit_dir / "audit.json"], uses_run_audit),
    Step("clean", step_clean, lambda c: list(clean_files(c)), lambda c: c.clean_csv is not None),
    Step("teachers", step_teachers, lambda c: [c.pool_dir / "pool.json"], lambda c: bool(c.teachers.pool)),
    Step(
        "evaluate", step_evaluate, lambda c: [c.pool_dir / "pool_eval.csv"], lambda c: bool(c.teachers.pool)
    ),
    Step(
        "audit",
        step_audit,
        lambda c: [c.run_path / "audit" / "audit.csv"],
        lambda c: bool(c.teachers.pool) and c.pipeline.audit_top > 0 and not uses_run_audit(c),
    ),
    Step("distill", step_distill, lambda c: [_student(c)]),
    Step(
        "baseline",
        step_baseline,
        lambda c: [_student(_baseline_cfg(c))],
        lambda c: (c.pipeline.baseline or c.pipeline.submit_model == "baseline") and _distils(c),
    ),
    Step("select", step_select, lambda c: [c.run_path / "submission.json"], current=_choice_current),
    Step("export", step_export, lambda c: [_onnx(c), _onnx(c).with_name(_onnx(c).name + ".json")]),
    Step(
        "predict", step_predict, lambda c: [c.run_path / "predictions.parquet"], lambda c: bool(c.data.test)
    ),
    Step("submit", step_submit, lambda c: [c.run_path / "submission.csv"], lambda c: bool(c.data.test)),
    Step(
        "score",
        step_score,
        lambda c: [c.run_path / "score.json"],
        lambda c: bool(c.data.test and c.data.solution and Path(c.data.solution).is_file()),
    ),
    Step("results", step_results, lambda c: [c.run_path / "results.csv"]),
    Step("report", step_report, lambda c: [c.run_path / "report.html"]),
]
STEP_NAMES = [s.name for s in STEPS]


def _marker(cfg: RunConfig, step: Step) -> Path:
    return cfg.run_path / MARKERS / f"{step.name}.done"


def is_done(cfg: RunConfig, step: Step) -> bool:
    return _marker(cfg, step).is_file() and all(p.exists() for p in step.outputs(cfg)) and step.current(cfg)


def run_pipeline(
    cfg: RunConfig, force: str | None = None, until: str | None = None
) -> list[tuple[str, str, float]]:
    """Run every enabled step in order; returns (step, status, seconds) rows."""
    for name in (force, until):
        if name is not None and name not in STEP_NAMES:
            raise ImatError(f"unknown step {name!r} (steps: {', '.join(STEP_NAMES)})")
    from distill.methods import get_method

    get_method(cfg.distill.method)  # an unknown method fails here, not after the teachers have trained
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, cfg.run_path / "config.yaml")
    forcing = False
    done: list[tuple[str, str, float]] = []
    for step in STEPS:
        forcing = forcing or step.name == force
        if not step.enabled(cfg):
            done.append((step.name, "not needed", 0.0))
        elif forcing or not is_done(cfg, step):
            _marker(cfg, step).unlink(missing_ok=True)
            print(f"== {step.name} ==", flush=True)
            start = time.perf_counter()
            step.run(cfg)
            seconds = time.perf_counter() - start
            write_json(
                _marker(cfg, step), {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds}
            )
            done.append((step.name, "ran", seconds))
            forcing = True  # what this step wrote is an input of the steps after it
        else:
            done.append((step.name, "done earlier", 0.0))
        if step.name == until:
            break
    return done
