"""Cleaning that feeds training: a label audit's verdicts applied to the training rows.

``data.clean`` names an audit CSV (written by ``imat data audit``: one row per training image with
its given label, the suggested label, cleanlab's label quality and whether it is a likely label
issue). The chosen rows (the ``top`` N lowest-quality labels, or ``auto``: cleanlab's issues) are
dropped, relabelled to the suggested class, or downweighted. :func:`imat.data.labelled_splits` calls
this, so teachers, the student and every other command that takes training rows see the same result.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from imat.errors import ImatError

if TYPE_CHECKING:
    from imat.config.data import CleanConfig

log = logging.getLogger(__name__)

AUDIT_COLUMNS = ("image_id", "given_index", "suggested_index", "label_quality", "is_label_issue")


def read_audit(path: str | os.PathLike[str]) -> pd.DataFrame:
    """An audit CSV with the columns cleaning needs; a missing file or column is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise ImatError(
            f"data.clean.from: audit file not found: {p} (write it with `imat data audit --config CONFIG`)"
        )
    try:
        table = pd.read_csv(p, dtype={"image_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ImatError(f"{p}: not a readable CSV ({exc.__class__.__name__})") from None
    missing = [c for c in AUDIT_COLUMNS if c not in table.columns]
    if missing:
        raise ImatError(f"{p}: not a label audit: no column {', '.join(missing)} (from `imat data audit`)")
    return table


def select_issues(audit: pd.DataFrame, top: int | str) -> pd.DataFrame:
    """The audit rows to act on: cleanlab's issues (``auto``) or the ``top`` lowest label qualities."""
    ranked = audit.sort_values("label_quality", kind="stable")
    if top == "auto":
        return ranked[ranked["is_label_issue"].astype(bool)]
    return ranked.head(int(top))


def plan_cleaning(train: pd.DataFrame, clean: CleanConfig, csv: str | os.PathLike[str]) -> pd.DataFrame:
    """Which training rows change and how: ``image_id, given_index, suggested_index, label_quality``.

    The audit must have judged these very labels: an audited image that is not a training row, or
    whose given label differs from the row's (an audit of another label-noise setting), is an error."""
    audit = read_audit(csv)
    labels = pd.Series(train["label"].to_numpy(), index=train["image_id"].astype(str))
    unknown = audit.loc[~audit["image_id"].isin(labels.index), "image_id"]
    if len(unknown):
        raise ImatError(
            f"{csv}: {len(unknown)} audited image(s) are not training rows of this run (e.g. "
            f"{unknown.iloc[0]!r}): the audit is of another data set"
        )
    differ = labels.loc[audit["image_id"]].to_numpy() != audit["given_index"].to_numpy()
    if differ.any():
        raise ImatError(
            f"{csv}: {int(differ.sum())} of {len(audit)} audited labels differ from this run's training "
            "labels: the audit judged other labels (another data.label_noise?)"
        )
    chosen = select_issues(audit, clean.top)
    return chosen[["image_id", "given_index", "suggested_index", "label_quality"]].reset_index(drop=True)


def apply_cleaning(
    train: pd.DataFrame, clean: CleanConfig, plan: pd.DataFrame
) -> tuple[pd.DataFrame, np.ndarray]:
    """The cleaned training rows and, for each of them, its position in ``train`` (to align extras).

    ``drop`` removes the planned rows, ``relabel`` gives them the suggested class, ``downweight``
    adds a ``weight`` column (``clean.weight`` for them, 1 elsewhere) that the training loader samples by."""
    hit = train["image_id"].astype(str).isin(set(plan["image_id"])).to_numpy()
    keep = np.arange(len(train))
    if clean.action == "drop":
        keep = np.flatnonzero(~hit)
        out = train.iloc[keep].reset_index(drop=True)
    elif clean.action == "relabel":
        suggested = plan.set_index("image_id")["suggested_index"]
        out = train.copy()
        ids = out.loc[hit, "image_id"].astype(str)
        out.loc[hit, "label"] = suggested.loc[ids].to_numpy()
    else:
        out = train.assign(weight=np.where(hit, clean.weight, 1.0))
    log.warning(
        "data.clean: %s %d of %d train labels (%s from the audit)",
        {"drop": "dropped", "relabel": "relabelled", "downweight": "downweighted"}[clean.action],
        int(hit.sum()),
        len(train),
        "cleanlab's issues" if clean.top == "auto" else f"the {clean.top} lowest-quality",
    )
    return out, keep


def cleaning_record(train: pd.DataFrame, clean: CleanConfig, csv: str | os.PathLike[str]) -> dict[str, Any]:
    """Provenance for pool.json and the run's files: which audit (and its hash), what, how many."""
    plan = plan_cleaning(train, clean, csv)
    changed = int((plan["suggested_index"] != plan["given_index"]).sum())
    return {
        "from": str(Path(csv).resolve()),
        "sha256": hashlib.sha256(Path(csv).read_bytes()).hexdigest(),
        "action": clean.action,
        "top": clean.top,
        "weight": clean.weight if clean.action == "downweight" else None,
        "images": len(plan),
        "suggested_other_class": changed,
        "train_images": len(train),
    }
