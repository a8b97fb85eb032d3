"""Score a submission CSV against a solution CSV with the competitions' metrics.

Solution files: a header ``id,<truth>`` where the truth column is ``expected`` (what the demo kit
writes), ``label`` or ``predicted`` (a submission-shaped answer key). The truth is the first label of
that column. A Kaggle ``Usage`` column (``Public`` / ``Private`` / ``Ignored``) splits the leaderboard:
the scores are then given overall and per split (``public_*``, ``private_*``), ``Ignored`` rows must
still be in the submission but count nowhere. Other columns are ignored.

Metrics (lower is better, as on the leaderboards): top-1 error = 1 - share of images whose first
predicted label is right (Furniture 2018); top-3 error = 1 - share whose label is among the first
three (Product 2019, iNaturalist 2018). Both are always computed; ``metric`` picks the headline
``score``. A row with no labels counts as wrong. The submission must hold exactly the solution's ids,
once each, with integer labels when the solution's labels are integers, and at most ``max_labels``
labels per row (3 by default, 1 for ``--format furniture2018``)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from imat.errors import ImatError, require_file
from submit.validate import _is_int, check_submission, read_submission

TRUTH_COLUMNS = ("expected", "label", "predicted")
METRICS = ("top1", "top3")
USAGES = ("public", "private", "ignored")  # Kaggle's Usage values, lower-cased


def read_solution(path: str | os.PathLike[str]) -> dict[str, str]:
    """{id: true label} from a solution CSV (see the module docstring for accepted headers)."""
    return read_solution_usage(path)[0]


def read_solution_usage(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, str] | None]:
    """({id: true label}, {id: usage} or None when the solution has no ``Usage`` column); usage values
    are lower-cased ``public`` / ``private`` / ``ignored``."""
    p = require_file(path, "solution")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ImatError(f"{p}: not a UTF-8 text file") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise ImatError(f"{p}: empty solution file")
    header = [h.strip().lower() for h in rows[0]]
    truth = next((c for c in TRUTH_COLUMNS if c in header), None)
    if not header or header[0] != "id" or truth is None:
        raise ImatError(
            f"{p}: wrong solution header {','.join(rows[0])!r}, expected 'id' and one of {', '.join(TRUTH_COLUMNS)}"
        )
    col = header.index(truth)
    usage_col = header.index("usage") if "usage" in header else None
    out: dict[str, str] = {}
    usage: dict[str, str] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            raise ImatError(f"{p}: line {line_no} has {len(row)} fields, the header has {len(header)}")
        key = row[0].strip()
        if key in out:
            raise ImatError(f"{p}: duplicate id {key!r}")
        tokens = row[col].split()
        if not tokens:
            raise ImatError(f"{p}: id {key!r} has no label")
        out[key] = tokens[0]
        if usage_col is not None:
            value = row[usage_col].strip()
            if value.lower() not in USAGES:
                raise ImatError(
                    f"{p}: line {line_no}: Usage {value!r} is not one of Public, Private, Ignored"
                )
            usage[key] = value.lower()
    if not out:
        raise ImatError(f"{p}: no rows")
    if usage_col is not None and all(v == "ignored" for v in usage.values()):
        raise ImatError(f"{p}: every row has Usage 'Ignored': nothing to score")
    return out, (usage if usage_col is not None else None)


def score(
    submission: str | os.PathLike[str],
    solution: str | os.PathLike[str],
    metric: str = "top3",
    max_labels: int = 3,
) -> dict[str, Any]:
    """Top-1 and top-3 accuracy and error of ``submission``; ``score`` is the error of ``metric``.

    With a ``Usage`` column the overall figures cover the Public and Private rows, and each of the two
    present gets ``<usage>_images``, ``<usage>_top1_error``, ``<usage>_top3_error`` and ``<usage>_score``
    (flat keys, so score.json stays one table row); ``ignored_images`` counts the rows left out."""
    if metric not in METRICS:
        raise ImatError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    truth, usage = read_solution_usage(solution)
    sub = read_submission(submission)
    int_labels = all(_is_int(v) for v in truth.values())
    check_submission(
        sub,
        header=("id", "predicted"),
        expected_ids=list(truth),
        max_labels=max_labels,
        min_labels=0,
        int_labels=int_labels,
        case_insensitive_header=True,
    )

    def same(a: str, b: str) -> bool:
        return int(a) == int(b) if int_labels else a == b

    rows = list(zip(sub.ids, sub.labels, strict=True))
    hit1 = {i: bool(labels) and same(labels[0], truth[i]) for i, labels in rows}
    hit3 = {i: any(same(x, truth[i]) for x in labels[:3]) for i, labels in rows}
    scored = [i for i, _ in rows if usage is None or usage[i] != "ignored"]
    counted = set(scored)
    n = len(scored)
    top1 = sum(hit1[i] for i in scored)
    top3 = sum(hit3[i] for i in scored)
    result: dict[str, Any] = {
        "submission": str(Path(submission)),
        "solution": str(Path(solution)),
        "images": n,
        "empty_rows": sum(1 for i, labels in rows if not labels and i in counted),
        "top1_accuracy": top1 / n,
        "top1_error": 1 - top1 / n,
        "top3_accuracy": top3 / n,
        "top3_error": 1 - top3 / n,
        "metric": metric,
    }
    result["score"] = result[f"{metric}_error"]
    if usage is not None:
        for name in ("public", "private"):
            ids = [i for i in scored if usage[i] == name]
            if ids:
                errors = {
                    k: 1 - sum(h[i] for i in ids) / len(ids) for k, h in (("top1", hit1), ("top3", hit3))
                }
                result[f"{name}_images"] = len(ids)
                result[f"{name}_top1_error"] = errors["top1"]
                result[f"{name}_top3_error"] = errors["top3"]
                result[f"{name}_score"] = errors[metric]
        result["ignored_images"] = len(rows) - n
    return result


def usage_summary(result: dict[str, Any]) -> str | None:
    """One line with the public and private leaderboard scores of :func:`score`'s result, or None when
    the solution had no ``Usage`` column."""
    if "ignored_images" not in result:
        return None
    parts = [
        f"{name} {result[f'{name}_score']:.5f} ({result[f'{name}_images']} images)"
        for name in ("public", "private")
        if f"{name}_score" in result
    ]
    ignored = f"; {result['ignored_images']} ignored" if result["ignored_images"] else ""
    return f"leaderboard ({result['metric']} error): " + ", ".join(parts) + ignored
