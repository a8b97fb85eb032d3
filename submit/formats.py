"""Leaderboard submission files for each supported competition format.

==============  ===================  =====================================================================
format          header               row
==============  ===================  =====================================================================
product2019     ``id,predicted``     id with its ``.jpg``; 3 space-separated class ids (metric: top-3 error)
furniture2018   ``id,predicted``     integer image id; 1 label_id 1..128 (metric: top-1 error)
coco            ``id,predicted``     COCO image ``id``; ``topk`` (default 3) space-separated category_ids,
                                     best first, as iNaturalist 2017/2018 on Kaggle (top-3 error); with
                                     ``--topk 1`` the single-label iNat 2019+ / Herbarium form
==============  ===================  =====================================================================

Rows follow the id order of the sample submission when one is given (its header is then copied
verbatim), else of the test file. Every id gets a row. **Fallback**: an image without a prediction
(not downloaded, unreadable, absent from the predictions file) gets the most frequent training classes
(``--train``), or, without training labels, the classes most often predicted first on this test set.
Predictions are matched to test rows by image id, then by the test file's relative path, its file
name, and the file name without extension (so predictions made from a plain folder match too)."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from imat.errors import ImatError, require_file
from imat.io import write_text
from imat.manifest import ClassMap
from submit.prior import prior_correct, train_frequencies
from submit.validate import check_submission, parse_submission

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubmissionFormat:
    name: str
    labels: int  # labels per row
    metric: str  # the leaderboard metric
    header: tuple[str, str] = ("id", "predicted")
    int_labels: bool = True


FORMATS: dict[str, SubmissionFormat] = {
    "product2019": SubmissionFormat("product2019", 3, "top3"),
    "furniture2018": SubmissionFormat("furniture2018", 1, "top1"),
    "coco": SubmissionFormat("coco", 3, "top3"),
}


def get_format(name: str, topk: int | None = None) -> SubmissionFormat:
    if name not in FORMATS:
        raise ImatError(f"unknown submission format {name!r} (choose from {', '.join(FORMATS)})")
    fmt = FORMATS[name]
    if name == "coco" and topk:
        fmt = SubmissionFormat(fmt.name, int(topk), "top1" if topk == 1 else fmt.metric)
    return fmt


def read_test_rows(test: str | os.PathLike[str]) -> pd.DataFrame:
    """``image_id`` and ``path`` of every test image, in the test file's order (imat.formats)."""
    from imat.formats import read_split

    path = require_file(test, "test file")
    df = read_split(path, "test")
    return pd.DataFrame({"image_id": df["image_id"].astype(str), "path": df["path"].astype(str)})


def read_sample(sample: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """(header, ids) of a sample submission CSV."""
    p = require_file(sample, "sample submission")
    sub = parse_submission(p.read_text(encoding="utf-8-sig"), str(p))
    if len(sub.header) != 2:
        raise ImatError(f"{p}: a sample submission has 2 columns, this one has {len(sub.header)}")
    if len(set(sub.ids)) != len(sub.ids):
        raise ImatError(f"{p}: repeated ids in the sample submission")
    return sub.header, sub.ids


def train_counts(train: str | os.PathLike[str], classes: ClassMap) -> np.ndarray:
    """Per-class training image counts (class-map order) from a manifest Parquet or a competition file."""
    p = require_file(train, "training labels")
    if p.suffix.lower() == ".parquet":
        try:
            df = pd.read_parquet(p)
        except Exception as exc:  # pyarrow raises several types
            raise ImatError(f"{p}: not a readable Parquet file ({exc.__class__.__name__})") from None
        if "split" in df.columns and (df["split"] == "train").any():
            df = df[df["split"] == "train"]
    else:
        from imat.formats import read_split

        df = read_split(p, "train")
    if "source_label" not in df.columns:
        raise ImatError(f"{p}: no source_label column to count training classes from")
    counts = np.zeros(classes.num_classes, dtype=np.int64)
    unknown = 0
    for label, n in Counter(df["source_label"].astype(str)).items():
        if label == "":
            continue
        try:
            counts[classes.to_index(label)] += n
        except ImatError:
            unknown += n
    if unknown:
        log.warning("%s: %d training labels are not in the model's class map (ignored)", p, unknown)
    if counts.sum() == 0:
        raise ImatError(f"{p}: no training labels that match the model's class map")
    return counts


def _match_keys(value: str) -> list[str]:
    """Ways one image may be named: as given, its file name, its file name without extension."""
    posix = PurePosixPath(value.replace("\\", "/"))
    return list(dict.fromkeys([value, posix.name, posix.stem]))


def match_predictions(test: pd.DataFrame, pred_ids: list[str]) -> list[int | None]:
    """For each test row, the row of ``pred_ids`` holding its prediction (None: no prediction)."""
    exact = {v: i for i, v in enumerate(pred_ids)}
    loose: dict[str, int | None] = {}
    for i, v in enumerate(pred_ids):
        for key in _match_keys(v)[1:]:
            loose[key] = None if key in loose and loose[key] != i else i  # ambiguous keys are dropped
    out: list[int | None] = []
    for image_id, path in zip(test["image_id"], test["path"], strict=True):
        hit = exact.get(image_id)
        if hit is None:
            for key in [*(_match_keys(path) if path else []), *_match_keys(image_id)]:
                hit = exact.get(key, loose.get(key))
                if hit is not None:
                    break
        out.append(hit)
    return out


def render_csv(header: list[str] | tuple[str, ...], ids: list[str], labels: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row_id, row in zip(ids, labels, strict=True):
        writer.writerow([row_id, " ".join(str(x) for x in row)])
    return buf.getvalue()


def make_submission(
    predictions: pd.DataFrame,
    info: dict[str, Any],
    fmt: SubmissionFormat,
    test: pd.DataFrame,
    sample: tuple[list[str], list[str]] | None = None,
    counts: np.ndarray | None = None,
    prior_correction: bool = False,
) -> tuple[str, dict[str, Any]]:
    """(validated CSV text, statistics) for ``predictions`` in ``fmt``, one row per test id.

    ``test``: ``image_id``/``path`` rows of the test file. ``sample``: (header, ids) of a sample
    submission, whose order and header win. ``counts``: per-class training counts (fallback and prior
    correction). ``prior_correction`` needs the ``probs`` column and ``counts``."""
    if "classes" not in info:
        raise ImatError("predictions file has no class map in its metadata (not written by imat predict?)")
    c = info["classes"]
    classes = ClassMap(list(c["source_labels"]), list(c.get("names", [])), c.get("label_type", "str"))
    k = fmt.labels
    pred_ids = predictions["image_id"].astype(str).tolist()
    ok = ~predictions["missing"].astype(bool).to_numpy()

    if prior_correction:
        if "probs" not in predictions.columns:
            raise ImatError(
                "prior correction needs the full probabilities: run imat predict with --save-probs"
            )
        if counts is None:
            raise ImatError("prior correction needs training class frequencies: pass --train")
        rows = np.flatnonzero(ok)
        probs = (
            np.stack([np.asarray(predictions["probs"].iloc[i], np.float64) for i in rows])
            if len(rows)
            else None
        )
        if probs is not None and probs.shape[1] != classes.num_classes:
            raise ImatError(f"probs have {probs.shape[1]} classes, the class map {classes.num_classes}")
        labels_by_row: list[list[Any]] = [[] for _ in pred_ids]
        if probs is not None:
            corrected = prior_correct(probs, train_frequencies(counts))
            top = np.argsort(-corrected, axis=1, kind="stable")[:, :k]
            for r, idx in zip(rows, top, strict=True):
                labels_by_row[r] = [classes.to_source(i) for i in idx]
    else:
        labels_by_row = [
            list(x)[:k] if good else [] for x, good in zip(predictions["topk_labels"], ok, strict=True)
        ]
    short = [i for i, (lab, good) in enumerate(zip(labels_by_row, ok, strict=True)) if good and len(lab) < k]
    if short and k <= classes.num_classes:
        raise ImatError(
            f"predictions hold {len(labels_by_row[short[0]])} labels per image but {fmt.name} needs {k}: "
            f"rerun imat predict with --topk {k} (or --save-probs)"
        )

    if counts is not None:
        order = np.argsort(-np.asarray(counts), kind="stable")[:k]
        fallback = [classes.to_source(i) for i in order]
        fallback_from = "most frequent training classes"
    else:
        firsts = Counter(str(lab[0]) for lab in labels_by_row if lab)
        common = [lab for lab, _ in firsts.most_common()] + [str(s) for s in classes.source_labels]
        fallback = [classes.to_source(classes.to_index(s)) for s in list(dict.fromkeys(common))[:k]]
        fallback_from = "most frequently predicted classes"

    if sample is not None:
        header, ids = list(sample[0]), list(sample[1])
        known = set(test["image_id"])
        extra = [i for i in ids if i not in known]
        if extra:
            log.warning("%d sample ids are not in the test file (e.g. %r)", len(extra), extra[0])
        by_id = {i: p for i, p in zip(test["image_id"], test["path"], strict=True)}
        order_df = pd.DataFrame({"image_id": ids, "path": [by_id.get(i, "") for i in ids]})
    else:
        header, ids = list(fmt.header), test["image_id"].astype(str).tolist()
        order_df = test
    if len(set(ids)) != len(ids):
        raise ImatError("the test file repeats image ids")
    hits = match_predictions(order_df, pred_ids)
    out_labels: list[list[Any]] = []
    fallbacks = 0
    for hit in hits:
        labels = labels_by_row[hit] if hit is not None else []
        if not labels:
            labels = fallback
            fallbacks += 1
        out_labels.append(labels)
    text = render_csv(header, ids, out_labels)
    check_submission(
        parse_submission(text, "submission"),
        header=header,
        expected_ids=ids,
        max_labels=k,
        min_labels=min(k, classes.num_classes),
        int_labels=fmt.int_labels,
        same_order=True,
    )
    unused = len(set(range(len(pred_ids))) - {h for h in hits if h is not None})
    stats = {
        "format": fmt.name,
        "rows": len(ids),
        "predicted": len(ids) - fallbacks,
        "fallback_rows": fallbacks,
        "fallback_labels": [str(x) for x in fallback],
        "fallback_from": fallback_from,
        "prior_correction": prior_correction,
        "unused_predictions": unused,
        "header": header,
    }
    if unused:
        log.warning("%d predictions matched no test id", unused)
    if fallbacks:
        log.warning(
            "%d of %d test ids had no prediction; filled with the %s", fallbacks, len(ids), fallback_from
        )
    return text, stats


def write_submission(
    predictions_path: str | os.PathLike[str],
    fmt_name: str,
    test: str | os.PathLike[str],
    out: str | os.PathLike[str],
    sample: str | os.PathLike[str] | None = None,
    train: str | os.PathLike[str] | None = None,
    prior_correction: bool = False,
    topk: int | None = None,
) -> dict[str, Any]:
    """Read the predictions, build and validate the submission, then write ``out`` atomically."""
    from submit.predict import read_predictions

    fmt = get_format(fmt_name, topk)
    predictions, info = read_predictions(predictions_path)
    test_rows = read_test_rows(test)
    sample_data = read_sample(sample) if sample is not None else None
    c = info.get("classes")
    if c is None:
        raise ImatError(f"{predictions_path}: no class map in its metadata (not written by imat predict?)")
    classes = ClassMap(list(c["source_labels"]), list(c.get("names", [])), c.get("label_type", "str"))
    counts = train_counts(train, classes) if train is not None else None
    text, stats = make_submission(predictions, info, fmt, test_rows, sample_data, counts, prior_correction)
    write_text(out, text)
    stats["out"] = str(Path(out))
    return stats
