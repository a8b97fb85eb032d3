"""Read and check submission CSVs exactly as a leaderboard would, with one-line errors.

The writer renders its CSV in memory and runs it through :func:`check_submission` before anything
touches the disk, and ``imat score`` reads submissions with the same code, so "written" implies
"accepted by the scorer"."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imat.errors import ImatError, require_file


@dataclass
class Submission:
    header: list[str]
    ids: list[str]
    labels: list[list[str]]  # space-separated predictions of each row, best first
    source: str = "submission"


def parse_submission(text: str, source: str = "submission") -> Submission:
    """Parse CSV text: a header line, then ``id,<space-separated labels>`` rows."""
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise ImatError(f"{source}: empty file (no header)") from None
    header = [h.strip() for h in header]
    ids: list[str] = []
    labels: list[list[str]] = []
    for line_no, row in enumerate(reader, start=2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line (trailing newline)
        if len(row) != len(header):
            raise ImatError(f"{source}: line {line_no} has {len(row)} fields, the header has {len(header)}")
        ids.append(row[0].strip())
        labels.append(row[1].split() if len(row) > 1 else [])
    return Submission(header, ids, labels, source)


def read_submission(path: str | os.PathLike[str]) -> Submission:
    p = require_file(path, "submission")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ImatError(f"{p}: not a UTF-8 text file") from None
    return parse_submission(text, str(p))


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def check_submission(
    sub: Submission,
    header: Sequence[str] = ("id", "predicted"),
    expected_ids: Sequence[str] | None = None,
    max_labels: int = 3,
    min_labels: int = 1,
    int_labels: bool = True,
    same_order: bool = False,
    case_insensitive_header: bool = False,
) -> None:
    """Raise ImatError (one line, naming the first offending id) unless ``sub`` is valid.

    Checks, in order: header, duplicate ids, missing ids, unknown ids, (``same_order``) row order,
    labels that are not integers (when ``int_labels``), too many labels, too few labels."""
    src = sub.source
    got = [h.lower() for h in sub.header] if case_insensitive_header else list(sub.header)
    want = [h.lower() for h in header] if case_insensitive_header else list(header)
    if got != want:
        raise ImatError(f"{src}: wrong header {','.join(sub.header)!r}, expected {','.join(header)!r}")
    seen: set[str] = set()
    for i in sub.ids:
        if i in seen:
            raise ImatError(f"{src}: duplicate id {i!r}")
        seen.add(i)
    if expected_ids is not None:
        expected = list(expected_ids)
        expected_set = set(expected)
        missing = [i for i in expected if i not in seen]
        if missing:
            raise ImatError(f"{src}: {len(missing)} missing ids, e.g. {missing[0]!r}")
        unknown = [i for i in sub.ids if i not in expected_set]
        if unknown:
            raise ImatError(f"{src}: {len(unknown)} unknown ids, e.g. {unknown[0]!r}")
        if same_order and sub.ids != expected:
            first = next(n for n, (a, b) in enumerate(zip(sub.ids, expected, strict=True)) if a != b)
            raise ImatError(f"{src}: row {first + 1} is id {sub.ids[first]!r}, expected {expected[first]!r}")
    for row_id, labels in zip(sub.ids, sub.labels, strict=True):
        if int_labels:
            bad = next((t for t in labels if not _is_int(t)), None)
            if bad is not None:
                raise ImatError(f"{src}: id {row_id!r}: label {bad!r} is not an integer")
        if len(labels) > max_labels:
            raise ImatError(f"{src}: id {row_id!r} has {len(labels)} labels, at most {max_labels} allowed")
        if len(labels) < min_labels:
            raise ImatError(f"{src}: id {row_id!r} has {len(labels)} labels, at least {min_labels} required")


def validate_file(
    path: str | os.PathLike[str], expected_ids: Sequence[str] | None = None, **kwargs: object
) -> Submission:
    """Read ``path`` and :func:`check_submission` it; returns the parsed submission."""
    sub = read_submission(Path(path))
    check_submission(sub, expected_ids=expected_ids, **kwargs)  # type: ignore[arg-type]
    return sub
