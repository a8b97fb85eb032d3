"""Every model a team could submit, measured on validation: accuracy and cost, for the select step.

Besides the run's students (:mod:`imat.app.submission_choice`), the candidates are each student with
the test-time augmentation that helps it, and the teacher pool exported as one model (and its greedy
selection), with and without TTA. Each model is exported once to fp32 ONNX under
``RUN_DIR/candidates/`` and run by onnxruntime over the validation split (``submit.provider``) with
every TTA setting tried (none, flip, ``submit.tta_search_scales``, both), so accuracy and cost are those
of the file a submission would run. Cost is the model's parameters and its images/s at
``submit.batch_size`` on that provider (random input, model compute only), divided by the TTA views.

Choices made on validation are kept honest: a candidate whose post-processing (TTA setting, and prior
correction when ``submit.prior_correction: auto``) is chosen from several reports a cross-fitted error:
the validation images are split in two halves (seeded); the setting is chosen on one half and scored on
the other, both ways, and the two held-out scores are pooled. The setting the candidate then uses is the
one that is best on the whole split. A candidate with nothing to choose is scored on the whole split.
The pool's greedy selection is itself chosen on validation (``imat teachers eval``), so it is cross-fitted
too, on the same halves: the teachers are selected greedily on one half (from every teacher's own
probabilities) and that ensemble is scored on the other. Where a half selects the teachers the whole
split selected, the held-out half is scored with the exported selection (and the post-processing chosen
on the tuning half); where it selects others, with those teachers' probabilities (mean or geomean, no
TTA). The selection submitted is the one chosen on the whole split.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imat.errors import ImatError
from imat.io import write_json

if TYPE_CHECKING:
    from imat.app.submission_choice import Candidate
    from imat.config import RunConfig
    from submit.tta import TTA

log = logging.getLogger("imat.candidates")

FOLDER = "candidates"
SPLIT_SEED = 0


@dataclass
class Option:
    """One post-processing setting of a model and its validation probabilities."""

    tta: TTA
    prior: bool
    probs: np.ndarray  # [images, classes]

    @property
    def cost(self) -> tuple[int, bool]:
        return (self.tta.views, self.prior)


@dataclass
class Members:
    """Every teacher's validation probabilities, to cross-fit the pool's greedy selection."""

    probs: np.ndarray  # [teachers, images, classes], rows as the options'
    names: list[str]
    selected: list[str]  # the selection made on the whole split: the one the options' probabilities are
    metric: str  # what the greedy selection maximised
    method: str  # mean | geomean


@dataclass
class Crossfit:
    option: Option  # chosen on the whole split
    top1_err: float
    top3_err: float
    how: str  # "validation" | "validation, cross-fitted over N settings"
    per_option: list[dict[str, Any]] = field(default_factory=list)


def topk_err(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    from teachers.ensemble import topk_accuracy

    acc = topk_accuracy(probs, labels, k)
    return float("nan") if np.isnan(acc) else 1.0 - acc


def halves(labels: np.ndarray, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the labelled rows (seeded shuffle), as index arrays."""
    known = np.flatnonzero(np.asarray(labels) >= 0)
    order = np.random.default_rng(seed).permutation(known)
    return np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])


def _best(options: list[Option], labels: np.ndarray, rows: np.ndarray, k: int) -> Option:
    """The option with the lowest top-``k`` error on ``rows``; ties go to the cheaper (earlier) one."""
    masked = np.full(len(labels), -1, dtype=np.int64)
    masked[rows] = labels[rows]
    errors = [topk_err(o.probs, masked, k) for o in options]
    return options[int(np.argmin(errors))]


def _held_probs(
    options: list[Option],
    labels: np.ndarray,
    tune: np.ndarray,
    held: np.ndarray,
    k: int,
    members: Members | None,
) -> np.ndarray:
    """The held-out rows' probabilities of what ``tune`` chooses: the option best on ``tune``, for the
    teachers a greedy selection on ``tune`` picks (``members``) when it picks other teachers."""
    if members is not None:
        from teachers.ensemble import ensemble_probs
        from teachers.select import greedy_select

        picked = greedy_select(
            members.probs[:, tune], labels[tune], members.names, metric=members.metric, method=members.method
        )
        if picked.names != members.selected:
            return ensemble_probs(members.probs[:, held], members.method, picked.indices)
    return _best(options, labels, tune, k).probs[held]


def crossfit(
    options: list[Option], labels: np.ndarray, metric: str, members: Members | None = None
) -> Crossfit:
    """Choose among ``options`` (cheapest first) by ``metric`` and report an honest error: cross-fitted
    over the two halves of the labelled rows when there is a choice (of the setting, or of the teachers:
    ``members``), else on every labelled row."""
    k = int(metric[3:])
    labels = np.asarray(labels)
    options = sorted(options, key=lambda o: o.cost)
    table = [
        {
            "tta": o.tta.label,
            "prior_correction": o.prior,
            "top1_err": topk_err(o.probs, labels, 1),
            "top3_err": topk_err(o.probs, labels, 3),
        }
        for o in options
    ]
    chosen = _best(options, labels, np.flatnonzero(labels >= 0), k)
    if len(options) == 1 and members is None:
        return Crossfit(chosen, table[0]["top1_err"], table[0]["top3_err"], "validation", table)
    a, b = halves(labels)
    wrong1 = wrong3 = 0.0
    for tune, held in ((a, b), (b, a)):
        probs = _held_probs(options, labels, tune, held, k, members)
        held_labels = labels[held]
        wrong1 += len(held) * topk_err(probs, held_labels, 1)
        wrong3 += len(held) * topk_err(probs, held_labels, 3)
    n = len(a) + len(b)
    over = [f"{len(options)} settings"] if len(options) > 1 else []
    if members is not None:
        over.insert(0, "the greedy selection")
    how = f"validation, cross-fitted over {' and '.join(over)}"
    return Crossfit(chosen, wrong1 / n, wrong3 / n, how, table)


# -- measuring the models -------------------------------------------------------------------------------


@dataclass
class Model:
    name: str
    kind: str  # student | pool
    source: Path  # checkpoint, or pool folder
    onnx: Path
    params: int
    images_per_s: float  # one view
    selected: bool = False
    method: str = "mean"


def _quick_export(loaded: tuple[Any, ...], out: Path, cfg: RunConfig) -> None:
    """fp32 ONNX with its description, for measuring (the submitted model is exported and verified
    by the export step)."""
    import tempfile

    from submit.export import ExportWrapper, copy_onnx, export_fp32, model_description, sidecar_path

    model, meta, prep, classes = loaded
    wrapper = ExportWrapper(model).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as tmp:
        fp32 = Path(tmp) / "model.onnx"  # with its external data beside it when large
        export_fp32(wrapper, prep.input_size, fp32, cfg.export.opset, cfg.export.exporter)
        write_json(sidecar_path(out), model_description(prep, classes, meta, "fp32", wrapper))
        copy_onnx(fp32, out)


def time_model(onnx: Path, provider: str, batch: int, images: int) -> float:
    """Images/s of the model's compute at ``batch`` on ``provider`` (random input at its size)."""
    from submit.export import read_description
    from submit.runtime import Runner, create_session

    desc = read_description(onnx)
    session, active = create_session(onnx, provider, description=desc, max_batch=batch)
    runner = Runner(session, active)
    size = int(desc["input_size"])
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    runner(x)  # warm-up (and TensorRT's engine build)
    done, start = 0, time.perf_counter()
    while done < images:
        runner(x)
        done += batch
    return done / (time.perf_counter() - start)


def _models(
    cfg: RunConfig, students: list[Candidate], left_out: list[dict[str, str]] | None = None
) -> list[Model]:
    """Each candidate network exported and timed; a pool that fails is left out (``left_out``: its
    name and why), a student's failure is raised."""
    from submit.model import load_checkpoint
    from submit.pool_export import build_pool_model, is_pool, pool_members

    folder = cfg.run_path / FOLDER
    # (name, kind, source, builder, selected): each network is built, exported and freed in turn, so a
    # pool of large teachers is never held twice
    todo: list[tuple[str, str, Path, Callable[[], tuple[Any, ...]], bool]] = []
    for c in students:
        todo.append((c.name, "student", Path(c.checkpoint), partial(load_checkpoint, c.checkpoint), False))
    if cfg.submit.pool_candidates and is_pool(cfg.pool_dir):
        full, _ = pool_members(cfg.pool_dir)
        teachers = f"{len(full)} teacher{'s' if len(full) > 1 else ''}"
        todo.append(
            (f"pool ({teachers}, mean)", "pool", cfg.pool_dir, partial(build_pool_model, cfg.pool_dir), False)
        )
        try:
            chosen, method = pool_members(cfg.pool_dir, selected=True)
        except ImatError:
            chosen, method = [], "mean"
        if chosen and ([e.name for e in chosen], method) != ([e.name for e in full], "mean"):
            name = f"pool selection ({'+'.join(e.name for e in chosen)}, {method})"
            todo.append((name, "pool", cfg.pool_dir, partial(build_pool_model, cfg.pool_dir, True), True))
    batch = min(cfg.submit.batch_size, 64)
    out = []
    for idx, (name, kind, source, build, selected) in enumerate(todo):
        onnx = folder / f"{idx}-{kind}.onnx"
        try:
            built = build()
            _quick_export(built, onnx, cfg)
            params = sum(p.numel() for p in built[0].parameters())
            method = str(built[1].get("method", "mean"))
            del built
            speed = time_model(onnx, cfg.submit.provider, batch, cfg.pipeline.speed_images)
        except measure_errors() as exc:
            if kind == "student":
                raise
            _leave_out(left_out, name, "export or timing", exc)
            continue
        out.append(Model(name, kind, source, onnx, params, speed, selected, method))
    return out


def measure_errors() -> tuple[type[BaseException], ...]:
    """What exporting or running one candidate may raise without stopping the comparison: imat's own
    errors, onnx/protobuf/onnxruntime errors (a graph over protobuf's 2 GB, an op the provider lacks)
    and running out of memory."""
    from google.protobuf.message import Error as ProtobufError
    from onnx.checker import ValidationError
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    names = ("Fail", "InvalidArgument", "NoSuchFile", "InvalidProtobuf", "RuntimeException", "InvalidGraph")
    ort = tuple(e for e in (getattr(ort_errors, n, None) for n in names) if isinstance(e, type))
    return (ImatError, OSError, RuntimeError, ValueError, MemoryError, ProtobufError, ValidationError, *ort)


def _leave_out(left_out: list[dict[str, str]] | None, name: str, stage: str, exc: BaseException) -> None:
    first = str(exc).splitlines()[0] if str(exc) else ""
    reason = f"{stage} failed: {exc.__class__.__name__}: {first}"[:500]
    log.warning("candidate %s left out: %s", name, reason)
    if left_out is not None:
        left_out.append({"name": name, "reason": reason})


def _options(
    cfg: RunConfig, model: Model, rows: Any, counts: np.ndarray | None
) -> tuple[list[Option], np.ndarray]:
    """Every post-processing setting's validation probabilities, and which rows could not be read."""
    from submit.export import read_description
    from submit.predict import predict
    from submit.prior import prior_correct, train_frequencies
    from submit.tta import make_tta, view_transform

    settings = {make_tta(cfg.submit.tta_flip, cfg.submit.tta_scales)}
    if cfg.submit.tta_search:
        scales = cfg.submit.tta_search_scales
        settings |= {make_tta(False), make_tta(True), make_tta(False, scales), make_tta(True, scales)}
    prior = cfg.submit.prior_correction
    priors = [False, True] if prior == "auto" and counts is not None else [bool(prior)]
    out = []
    missing = np.zeros(len(rows.labels), dtype=bool)
    for tta in sorted(settings, key=lambda t: (t.views, t.flip)):
        try:
            view_transform(read_description(model.onnx), tta.scales)
        except ImatError as exc:  # a scale this model's crop cannot take: that setting is left out
            log.warning("%s: TTA %s left out: %s", model.name, tta.label, exc)
            continue
        frame = predict(
            model.onnx,
            cfg.manifest_path,
            images=cfg.data.images,
            split="val",
            topk=1,
            provider=cfg.submit.provider,
            batch_size=cfg.submit.batch_size,
            tta_flip=tta.flip,
            tta_scales=list(tta.scales),
            workers=cfg.data.num_workers,
            save_probs=True,
            decoder=cfg.data.decoder,
            max_pixels=cfg.data.max_pixels,
            draft=cfg.data.draft,
            progress=False,
        )
        if len(frame) != len(missing):
            raise ImatError(f"{model.onnx}: predictions do not match the validation rows")
        missing |= frame["missing"].to_numpy(dtype=bool)
        probs = np.stack(
            [p if len(p) else np.zeros(rows.num_classes, np.float32) for p in frame["probs"]]
        ).astype(np.float32)
        for use in priors:
            if use and counts is None:
                raise ImatError("submit.prior_correction needs the training class counts of the manifest")
            p = prior_correct(probs, train_frequencies(counts)).astype(np.float32) if use else probs
            out.append(Option(tta, use, p))
    return out, missing


@dataclass
class ValRows:
    labels: np.ndarray
    num_classes: int
    frame: Any = None  # the manifest's validation rows (pandas), in predict's order


def _members(cfg: RunConfig, rows: ValRows) -> tuple[Members, np.ndarray]:
    """Every pool teacher's validation probabilities (as ``imat teachers eval`` computed them for the
    greedy selection, with its TTA flip) and the labels, -1 where no teacher could read the image."""
    from teachers.ensemble import pool_probs
    from teachers.pool import load_pool, read_pool_json

    chosen = read_pool_json(cfg.pool_dir).get("selected") or {}
    entries = load_pool(cfg.pool_dir)
    probs, labels = pool_probs(
        entries,
        rows.frame.assign(label=rows.labels),
        cfg.data.images,
        tta_flip=bool(chosen.get("tta_flip")),
        batch_size=min(cfg.submit.batch_size, 64),
        num_workers=cfg.data.num_workers,
        decoder=cfg.data.decoder,
    )
    members = Members(
        probs,
        [e.name for e in entries],
        [str(n) for n in chosen.get("teachers") or []],
        str(chosen.get("metric") or "top3"),
        str(chosen.get("method") or "mean"),
    )
    return members, labels


def _val_rows(cfg: RunConfig) -> tuple[ValRows, np.ndarray | None] | None:
    """Labels of the validation rows in predict's order (-1 unreadable/unlabelled) and train counts."""
    import pandas as pd

    from imat.manifest import load_manifest
    from submit.formats import train_counts

    if not cfg.manifest_path.is_file():
        return None
    df, classes = load_manifest(cfg.manifest_path)
    if "split" not in df.columns or not ((df["split"] == "val") & (df["label"] >= 0)).any():
        return None
    val = df[df["split"] == "val"].reset_index(drop=True)
    labels = pd.to_numeric(val["label"], errors="coerce").fillna(-1).astype(np.int64).to_numpy()
    try:
        counts = train_counts(cfg.manifest_path, classes)
    except ImatError:
        counts = None
    return ValRows(labels, classes.num_classes, val), counts


def measured_candidates(
    cfg: RunConfig, students: list[Candidate], left_out: list[dict[str, str]] | None = None
) -> list[Candidate]:
    """The students with their measured validation accuracy and cost, each student's best TTA, and the
    pool (and its greedy selection) with and without TTA; ``students`` unchanged when the run has no
    labelled validation split to measure on. A pool candidate whose export or measurement fails is
    left out with a warning (appended to ``left_out``: name and reason); a student's failure is raised,
    since the distilled student must be comparable."""
    from dataclasses import replace

    from imat.app.submission_choice import select_metric

    found = _val_rows(cfg)
    if found is None or not students:
        return students
    rows, counts = found
    metric = select_metric(cfg)
    base_tta = (cfg.submit.tta_flip, tuple(cfg.submit.tta_scales))
    out: list[Candidate] = []
    extra: list[Candidate] = []
    by_checkpoint = {Path(c.checkpoint).resolve(): c for c in students}
    for model in _models(cfg, students, left_out):
        try:
            options, missing = _options(cfg, model, rows, counts)
            members, seen = _members(cfg, rows) if model.selected else (None, None)
        except measure_errors() as exc:
            if model.kind == "student":
                raise
            _leave_out(left_out, model.name, "measuring on validation", exc)
            continue
        labels = rows.labels.copy()
        labels[missing] = -1  # an unreadable image is left out, as imat teachers eval leaves it out
        if seen is not None:  # the teachers were chosen on this split too: that choice is cross-fitted
            labels[seen < 0] = -1
        base = [o for o in options if (o.tta.flip, tuple(o.tta.scales)) == base_tta]
        plain = crossfit(base, labels, metric, members) if base else None
        tuned = crossfit(options, labels, metric, members) if len(options) > len(base) else None
        student = model.kind == "student"
        template = by_checkpoint[model.source.resolve()] if student else _pool_template(model)
        for fit, suffix in ((plain, ""), (tuned, " + TTA")):
            if fit is None or (suffix and fit.option.tta.views == 1):
                continue  # no TTA setting helped: the plain candidate already stands for it
            tta = fit.option.tta
            name = template.name + (f" + TTA {tta.label}" if suffix else "")
            cand = replace(
                template,
                name=name,
                top1_err=fit.top1_err,
                top3_err=fit.top3_err,
                picked_on=template.picked_on,
                images_per_s=model.images_per_s / tta.views,
                params=model.params,
                tta={**tta.to_dict(), "label": tta.label},
                prior_correction=fit.option.prior,
                measured_on=fit.how,
                onnx=str(model.onnx),
            )
            (out if model.kind == "student" and not suffix else extra).append(cand)
    return out + extra


def _pool_template(model: Model) -> Candidate:
    from imat.app.submission_choice import Candidate

    return Candidate(
        role="selection" if model.selected else "pool",
        name=model.name,
        run_dir=str(model.source),
        checkpoint=str(model.source),
        top1_err=None,
        top3_err=None,
        best_epoch=None,
        last_epoch=None,
        picked_on="each teacher's best epoch",
        kind="pool",
        selected=model.selected,
        method=model.method,
    )
