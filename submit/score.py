"""Score a submission CSV against a solution CSV with the competitions' metrics.

Solution files: a header ``id,<truth>`` where the truth column is ``expected`` (what the demo kit
writes), ``label`` or ``predicted`` (a submission-shaped answer key); further columns such as
Kaggle's ``Usage`` are ignored. The truth is the first label of that column.

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


def read_solution(path: str | os.PathLike[str]) -> dict[str, str]:
    """{id: true label} from a solution CSV (see the module docstring for accepted headers)."""
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
    out: dict[str, str] = {}
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
    if not out:
        raise ImatError(f"{p}: no rows")
    return out


def score(
    submission: str | os.PathLike[str],
    solution: str | os.PathLike[str],
    metric: str = "top3",
    max_labels: int = 3,
) -> dict[str, Any]:
    """Top-1 and top-3 accuracy and error of ``submission``; ``score`` is the error of ``metric``."""
    if metric not in METRICS:
        raise ImatError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    truth = read_solution(solution)
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

    n = len(sub.ids)
    top1 = sum(
        1 for i, labels in zip(sub.ids, sub.labels, strict=True) if labels and same(labels[0], truth[i])
    )
    top3 = sum(
        1 for i, labels in zip(sub.ids, sub.labels, strict=True) if any(same(x, truth[i]) for x in labels[:3])
    )
    result = {
        "submission": str(Path(submission)),
        "solution": str(Path(solution)),
        "images": n,
        "empty_rows": sum(1 for labels in sub.labels if not labels),
        "top1_accuracy": top1 / n,
        "top1_error": 1 - top1 / n,
        "top3_accuracy": top3 / n,
        "top3_error": 1 - top3 / n,
        "metric": metric,
    }
    result["score"] = result[f"{metric}_error"]
    return result
