"""Which trained student the pipeline exports and submits, and why (``RUN_DIR/submission.json``).

The candidates are the run's students of the deployment architecture (``distill.student.arch``): the
distilled student (``RUN_DIR/student``), the student alone (``RUN_DIR/baseline/student``) and any other
engine run under the run directory whose ``best.safetensors`` is a student of that architecture with the
run's classes (Ray Tune trials, a student trained by hand with another method). An engine run is a
folder holding both ``summary.csv`` and ``best.safetensors``.

Each candidate is scored by the validation metrics stored inside its ``best.safetensors`` (the engine
writes those of the very weights it saved), so the score compared is the score of the file exported.
``pipeline.submit_model: best`` takes the lowest validation error on ``submit.select_by`` (default the
submission format's leaderboard metric); ties go to the distilled student, then the student alone, then
the other runs in path order. ``distilled`` and ``baseline`` force one.

When the run has a labelled validation split, ``best`` also compares each student with the TTA that
helps it and the teacher pool exported as one model (and its greedy selection), with and without TTA,
all measured the same way (:mod:`imat.app.candidates`), and keeps only the candidates within
``submit.budget``: ``student`` (the default: the student's cost, a student without TTA, as before),
``none`` (the most accurate candidate, whatever it costs) or limits on images/s and parameters.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from imat.config import RunConfig
from imat.errors import ImatError
from imat.io import write_json
from imat.weights import read_meta

log = logging.getLogger("imat.submission")

CHOICE_FILE = "submission.json"
BASELINE_NAME = "student alone (CE)"
# folders that never hold a student run (and can be large): skipped by the search for other runs
_SKIP = {"tensorboard", "teacher_cache", "export", ".pipeline"}


@dataclass
class Candidate:
    role: str  # distilled | baseline | other
    name: str  # its row in the results table
    run_dir: str  # the engine's output folder
    checkpoint: str  # its best.safetensors
    top1_err: float | None  # validation errors of the weights in the checkpoint (None: not measured)
    top3_err: float | None
    best_epoch: int | None  # the epoch the checkpoint holds
    last_epoch: int | None  # the last epoch trained (summary.csv)
    picked_on: str  # what chose the checkpoint's epoch inside the run
    kind: str = "student"  # student | pool (a teacher pool exported as one model; checkpoint: its folder)
    images_per_s: float | None = None  # at submit.batch_size on submit.provider, divided by the TTA views
    params: int | None = None  # an ensemble counts every member
    tta: dict[str, Any] | None = None  # {flip, scales, views, label}; None: not measured (no TTA)
    prior_correction: bool | None = None  # None: as submit.prior_correction says
    measured_on: str = "checkpoint"  # where the errors come from: the checkpoint, or validation measured
    fits_budget: bool = True
    onnx: str | None = None  # the fp32 ONNX it was measured with
    selected: bool = False  # pool: only its greedy selection
    method: str | None = None  # pool: mean | geomean

    @property
    def views(self) -> int:
        return int((self.tta or {}).get("views", 1))

    def error(self, metric: str) -> float | None:
        return self.top1_err if metric == "top1" else self.top3_err


def select_metric(cfg: RunConfig) -> str:
    """``submit.select_by``, else the leaderboard metric of ``submit.format`` (top3 / top1)."""
    if cfg.submit.select_by:
        return cfg.submit.select_by
    from submit.formats import get_format

    return get_format(cfg.submit.format, cfg.submit.topk).metric


def distilled_name(cfg: RunConfig) -> str:
    return f"student ({cfg.distill.method})"


def _error(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return 1.0 - value if math.isfinite(value) else None


def _last_epoch(summary: Path) -> int | None:
    try:
        epochs = pd.read_csv(summary, usecols=["epoch"])["epoch"]
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    return int(epochs.max()) if len(epochs) else None


def read_candidate(role: str, name: str, run_dir: Path) -> tuple[Candidate, dict[str, Any]] | None:
    """The candidate in ``run_dir`` and its checkpoint's metadata, or None when the run has no
    ``best.safetensors`` yet."""
    ckpt = run_dir / "best.safetensors"
    if not ckpt.is_file():
        return None
    meta = read_meta(ckpt)
    metrics = meta.get("metrics") or {}
    has_val = any(str(k).startswith("val_") for k in metrics)
    picked_on = (
        f"validation {meta.get('best_metric', 'top1')}" if has_val else "training loss (no validation)"
    )
    epoch = meta.get("epoch")
    cand = Candidate(
        role=role,
        name=name,
        run_dir=str(run_dir),
        checkpoint=str(ckpt),
        top1_err=_error(metrics, "val_top1"),
        top3_err=_error(metrics, "val_top3"),
        best_epoch=int(epoch) if epoch is not None else None,
        last_epoch=_last_epoch(run_dir / "summary.csv"),
        picked_on=picked_on,
    )
    return cand, meta


def _other_runs(cfg: RunConfig, known: set[Path]) -> list[Path]:
    """Engine runs under the run directory besides ``known`` (the pool and the images are not searched)."""
    skip = {cfg.pool_dir.resolve(), *known}
    if cfg.data.images:
        skip.add(Path(cfg.data.images).resolve())
    found = []
    for dirpath, dirnames, filenames in os.walk(cfg.run_path):  # symlinked folders are not followed
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP and (here / d).resolve() not in skip)
        if "best.safetensors" in filenames and "summary.csv" in filenames and here.resolve() not in known:
            found.append(here)
    return found


def _classes(meta: dict[str, Any]) -> list[str]:
    return [str(x) for x in (meta.get("classes") or {}).get("source_labels", [])]


def _mismatch(meta: dict[str, Any], arch: str, classes: list[str]) -> str | None:
    """Why a checkpoint cannot stand in for the distilled student, or None when it can."""
    if meta.get("kind") != "student":
        return f"not a student (kind {meta.get('kind')!r})"
    if meta.get("arch") != arch:
        return f"architecture {meta.get('arch')} is not the deployment's {arch}"
    if _classes(meta) != classes:
        return "its classes differ from the distilled student's"
    return None


def find_candidates(cfg: RunConfig) -> list[Candidate]:
    """The students to compare, the distilled one first; [] before the distilled student exists."""
    from distill.train import STUDENT_DIR

    student_dir = cfg.run_path / STUDENT_DIR
    first = read_candidate("distilled", distilled_name(cfg), student_dir)
    if first is None:
        return []
    distilled, ref = first
    arch, classes = cfg.distill.student.arch, _classes(ref)
    baseline_dir = cfg.run_path / "baseline" / STUDENT_DIR
    out = [distilled]
    known = {student_dir.resolve(), baseline_dir.resolve()}
    runs = [("baseline", BASELINE_NAME, baseline_dir)]
    for run in _other_runs(cfg, known):
        rel = run.relative_to(cfg.run_path).as_posix()
        runs.append(("other", rel, run))
    for role, name, run in runs:
        try:
            found = read_candidate(role, name, run)
        except ImatError as exc:
            if role != "other":
                raise
            log.warning("submission: %s left out of the comparison: %s", run, exc)
            continue
        if found is None:
            continue
        cand, meta = found
        if role == "other":
            cand.name = f"student ({meta.get('method', '?')}, {name})"
        why = _mismatch(meta, arch, classes)
        if why:
            log.warning("submission: %s left out of the comparison: %s", cand.checkpoint, why)
            continue
        out.append(cand)
    return out


def budget_text(cfg: RunConfig, student: Candidate | None = None) -> str:
    """``submit.budget`` in words."""
    budget = cfg.submit.budget
    if budget == "none":
        return "no budget"
    if budget == "student":
        params = student.params if student is not None else None
        size = f", {params:,} parameters" if params else ""
        return f"the student's cost (a student{size}, one forward pass per image)"
    parts = []
    if budget.images_per_s is not None:
        parts.append(f"at least {budget.images_per_s:,.0f} images/s")
    if budget.params is not None:
        parts.append(f"at most {budget.params:,} parameters")
    return ", ".join(parts) or "no budget"


def fits_budget(cand: Candidate, cfg: RunConfig, student: Candidate | None) -> bool:
    """Whether ``cand`` is within ``submit.budget``; an unmeasured cost never passes an explicit limit."""
    budget = cfg.submit.budget
    if budget == "none":
        return True
    if budget == "student":  # what imat submitted before budgets: a student, one forward pass per image
        return cand.kind == "student" and cand.views == 1
    if budget.images_per_s is not None and (
        cand.images_per_s is None or cand.images_per_s < budget.images_per_s
    ):
        return False
    return budget.params is None or (cand.params is not None and cand.params <= budget.params)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _list(cands: list[Candidate], metric: str) -> str:
    return ", ".join(f"{c.name} {_pct(c.error(metric))}" for c in cands)


def choose(
    cands: list[Candidate], metric: str, submit_model: str = "best", budget: str | None = None
) -> tuple[Candidate, str]:
    """The candidate to submit and the one sentence that says why. ``cands[0]`` is the distilled one;
    with ``best``, only candidates with ``fits_budget`` compete (``budget``: the budget in words)."""
    if not cands or cands[0].role != "distilled":
        raise ImatError("submission: no distilled student to choose from (run the distill step first)")
    distilled, label = cands[0], metric.replace("top", "top-")
    if submit_model == "best" and any(c.kind != "student" or c.views > 1 or not c.fits_budget for c in cands):
        return _choose_within_budget(cands, metric, budget or "the budget")
    scored = [c for c in cands if c.error(metric) is not None]
    if submit_model != "best":
        chosen = next((c for c in cands if c.role == submit_model), None)
        if chosen is None:
            raise ImatError(
                f"pipeline.submit_model: {submit_model}, but the run has no student alone "
                f"(no best.safetensors in {Path(distilled.run_dir).parent / 'baseline' / 'student'}; "
                f"set pipeline.baseline=true)"
            )
        scores = f" (validation {label} error: {_list(scored, metric)})" if scored else ""
        return chosen, f"Submitted {chosen.name} because pipeline.submit_model={submit_model}{scores}."
    if not scored:
        return distilled, (
            f"Submitted {distilled.name}: no student has a validation {label} score to compare "
            f"(no labelled validation split), so the distilled student."
        )
    # min keeps the first of equals: candidate order is the tie rule (distilled, student alone, others)
    chosen = min(scored, key=lambda c: c.error(metric))  # type: ignore[arg-type,return-value]
    best = chosen.error(metric)
    others = [c for c in scored if c is not chosen]
    ties = [c for c in others if c.error(metric) == best]
    if not others:
        return (
            chosen,
            f"Submitted {chosen.name}, the only student with a validation {label} score ({_pct(best)}).",
        )
    if ties:
        rule = (
            "ties go to the distilled student"
            if chosen is distilled
            else "ties go to the distilled student, then the student alone, then other runs"
        )
        return chosen, (
            f"Submitted {chosen.name}: its validation {label} error ({_pct(best)}) ties with "
            f"{', '.join(c.name for c in ties)}, and {rule}."
        )
    if chosen is distilled:
        return chosen, (
            f"Submitted {chosen.name}: the lowest validation {label} error of the {len(scored)} students "
            f"compared ({_pct(best)}; {_list(others, metric)})."
        )
    return chosen, (
        f"Submitted {chosen.name}, not the distilled {distilled.name}: its validation {label} error is "
        f"lower ({_pct(best)} vs {_list(others, metric)})."
    )


def _choose_within_budget(cands: list[Candidate], metric: str, budget: str) -> tuple[Candidate, str]:
    """``best`` among students, TTA variants and pools: the lowest validation error within the budget;
    ties go to the earlier candidate (students first, as in :func:`choose`, then TTA, then pools)."""
    label = metric.replace("top", "top-")
    inside = [c for c in cands if c.fits_budget and c.error(metric) is not None]
    if not inside:
        raise ImatError(
            f"submit.budget: no candidate with a validation score is within {budget} "
            f"({_list(cands, metric)}); raise the budget or set submit.budget=none"
        )
    chosen = min(inside, key=lambda c: c.error(metric))  # type: ignore[arg-type,return-value]
    best = chosen.error(metric)
    outside = [c for c in cands if not c.fits_budget and c.error(metric) is not None]
    better = [c for c in outside if c.error(metric) < best]  # type: ignore[operator]
    others = [c for c in inside if c is not chosen]
    text = (
        f"Submitted {chosen.name}: the lowest validation {label} error ({_pct(best)}) of the "
        f"{len(inside)} candidates within {budget}"
    )
    text += f" ({_list(others, metric)})" if others else ""
    if better:
        text += f"; more accurate but over the budget: {_list(better, metric)}"
    return chosen, text + "."


def distillation_note(cands: list[Candidate], val_images: int) -> str | None:
    """One line on what distillation changed against the student alone, on top-1 validation error, and
    whether the difference exceeds the noise of ``val_images`` images: the 95% interval of a difference
    of two error rates (normal approximation for two independent samples, which is conservative for two
    models scored on the same images). None without both students' scores."""
    distilled = next((c for c in cands if c.role == "distilled"), None)
    alone = next((c for c in cands if c.role == "baseline"), None)
    if distilled is None or alone is None or val_images <= 0:
        return None
    a, b = distilled.top1_err, alone.top1_err
    if a is None or b is None:
        return None
    diff = a - b
    half = 1.96 * math.sqrt((a * (1 - a) + b * (1 - b)) / val_images)
    if abs(diff) <= half:
        verdict = "within the noise, so on this data the two cannot be told apart"
    elif diff < 0:
        verdict = "distillation helped, beyond the noise"
    else:
        verdict = "distillation hurt, beyond the noise (compare the pool's accuracy with the student's)"
    return (
        f"Distilled vs alone: top-1 error {_pct(a)} vs {_pct(b)} on {val_images:,} validation images, "
        f"{100 * diff:+.2f} points against a 95% interval of +-{100 * half:.2f}: {verdict}."
    )


def _settings(cfg: RunConfig) -> tuple[str, str]:
    return select_metric(cfg), cfg.pipeline.submit_model


def _compared_settings(cfg: RunConfig) -> dict[str, Any]:
    """Everything besides the students that changes the comparison: the submit settings and the pool."""
    from teachers.pool import read_pool_json

    sub = cfg.submit
    keys = ("budget", "tta_flip", "tta_scales", "tta_search", "tta_search_scales", "prior_correction")
    out: dict[str, Any] = {k: getattr(sub, k) for k in keys}
    out["budget"] = sub.budget if isinstance(sub.budget, str) else sub.budget.model_dump()
    out["pool_candidates"] = sub.pool_candidates
    out["provider"], out["batch_size"] = sub.provider, sub.batch_size
    try:
        pool = read_pool_json(cfg.pool_dir) if sub.pool_candidates else {}
    except ImatError:
        pool = {}
    out["pool"] = {"teachers": pool.get("teachers", []), "selected": pool.get("selected")}
    return json.loads(json.dumps(out))


def choice_is_current(cfg: RunConfig) -> bool:
    """Whether ``submission.json`` was made with this config's settings from the students the run
    holds now (a changed ``pipeline.submit_model``, budget or pool, or a new tune trial makes the select
    step rerun)."""
    try:
        record = read_choice(cfg.run_path)
    except ImatError:
        return False
    if record is None:
        return False
    recorded = (record.get("select_by"), record.get("submit_model"))
    now = [asdict(c) for c in find_candidates(cfg)]
    return (
        recorded == _settings(cfg)
        and now == record.get("students")
        and record.get("settings") == _compared_settings(cfg)
    )


def choose_submission(cfg: RunConfig) -> dict[str, Any]:
    """Compare the run's students, write ``RUN_DIR/submission.json`` and return what it holds."""
    from distill.methods import get_method

    metric, _ = _settings(cfg)
    if cfg.pipeline.submit_model == "baseline" and not get_method(cfg.distill.method).needs_teachers:
        raise ImatError(
            "pipeline.submit_model: baseline, but distill.method is ce, so the distilled student is the "
            "student alone: use pipeline.submit_model=distilled"
        )
    students = find_candidates(cfg)
    compared_students = [asdict(c) for c in students]  # before the budget marks them: the rerun check
    cands = students
    left_out: list[dict[str, str]] = []  # candidates whose export or measurement failed, and why
    if cfg.pipeline.submit_model == "best" and students:
        from imat.app.candidates import measured_candidates

        cands = measured_candidates(cfg, students, left_out)
    budget = budget_text(cfg, cands[0] if cands else None)
    for c in cands:
        c.fits_budget = fits_budget(c, cfg, cands[0])
    chosen, reason = choose(cands, metric, cfg.pipeline.submit_model, budget)
    record = {
        "model": chosen.name,
        "role": chosen.role,
        "kind": chosen.kind,
        "checkpoint": chosen.checkpoint,
        "selected": chosen.selected,
        "method": chosen.method,
        "tta": chosen.tta,
        "prior_correction": chosen.prior_correction,
        "select_by": metric,
        "submit_model": cfg.pipeline.submit_model,
        "budget": budget,
        "reason": reason,
        "candidates": [{**asdict(c), "submitted": c is chosen} for c in cands],
        "left_out": left_out,
        "students": compared_students,
        "settings": _compared_settings(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(cfg.run_path / CHOICE_FILE, record)
    return record


def format_candidates(record: dict[str, Any], text: bool = True) -> Any:
    """The select step's candidates (``submission.json``): validation errors, cost, TTA, whether each
    fits ``submit.budget`` and which was submitted; a string, or the frame with ``text=False``."""
    cands = pd.DataFrame(record.get("candidates") or [])
    if cands.empty:
        return "" if text else cands

    def col(name: str) -> pd.Series:
        return cands[name] if name in cands.columns else pd.Series([None] * len(cands))

    shown = pd.DataFrame(
        {
            "candidate": cands["name"],
            "submitted": col("submitted").map(lambda v: "yes" if v else ""),
            "fits budget": col("fits_budget").map(lambda v: "no" if v is False else "yes"),
            "top-1 err %": col("top1_err").map(lambda v: "" if pd.isna(v) else f"{100 * v:.2f}"),
            "top-3 err %": col("top3_err").map(lambda v: "" if pd.isna(v) else f"{100 * v:.2f}"),
            "params": col("params").map(lambda v: "" if pd.isna(v) else f"{v / 1e6:.2f}M"),
            "images/s": col("images_per_s").map(lambda v: "" if pd.isna(v) else f"{v:,.0f}"),
            "TTA": col("tta").map(lambda v: v.get("label", "none") if isinstance(v, dict) else "none"),
        }
    )
    return shown.to_string(index=False) if text else shown


def read_choice(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What ``submission.json`` holds, or None when the run has none (yet)."""
    path = Path(run_dir) / CHOICE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ImatError(f"{path}: not valid JSON (rerun the select step: --force select)") from None


def submitted_onnx(cfg: RunConfig) -> Path:
    """Where the export step writes the submitted model: ``RUN_DIR/export/pool.onnx`` for a teacher
    pool, else ``RUN_DIR/export/student.onnx``."""
    try:
        record = read_choice(cfg.run_path) or {}
    except ImatError:
        record = {}
    name = "pool.onnx" if record.get("kind") == "pool" else "student.onnx"
    return cfg.run_path / "export" / name


def submitted_postprocessing(cfg: RunConfig) -> tuple[bool, list[float], bool]:
    """(TTA flip, TTA scales, prior correction) to predict and submit with: the submitted candidate's,
    as the select step chose them on validation, else the config's (``prior_correction: auto`` without
    a choice is off)."""
    try:
        record = read_choice(cfg.run_path) or {}
    except ImatError:
        record = {}
    tta = record.get("tta")
    flip, scales = (
        (bool(tta["flip"]), list(tta["scales"])) if tta else (cfg.submit.tta_flip, cfg.submit.tta_scales)
    )
    prior = cfg.submit.prior_correction
    if prior == "auto":
        prior = bool(record.get("prior_correction"))
    return flip, scales, bool(prior)


def chosen_checkpoint(cfg: RunConfig) -> Path:
    """The checkpoint the select step chose, for the export step."""
    record = read_choice(cfg.run_path)
    if record is None or not record.get("checkpoint"):
        raise ImatError(f"{cfg.run_path / CHOICE_FILE}: missing (run the select step first)")
    path = Path(record["checkpoint"])
    if not path.is_file():
        raise ImatError(
            f"{cfg.run_path / CHOICE_FILE}: the chosen checkpoint {path} is gone (--force select)"
        )
    return path
