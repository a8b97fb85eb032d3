"""Synthetic label noise for noisy-label experiments (Product 2019's web labels are noisy; this lets a
clean data set measure how much a method suffers from, or repairs, a known amount of noise)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from imat.errors import ImatError

if TYPE_CHECKING:
    from imat.config import RunConfig
    from imat.config.data import CleanConfig, LabelNoise

log = logging.getLogger(__name__)

NOISE_KINDS: tuple[str, ...] = ("symmetric", "pair")


def apply_label_noise(
    labels: np.ndarray, num_classes: int, fraction: float, kind: str = "symmetric", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly round(fraction * n) labels, chosen uniformly at random; returns (noisy, flipped_mask).

    ``symmetric``: each chosen label becomes a uniformly random *different* class. ``pair``: class c
    becomes (c + 1) % num_classes (the classic pair-flip). Deterministic for a seed; the input is not
    modified. Negative labels (unknown) are never chosen."""
    if kind not in NOISE_KINDS:
        raise ImatError(f"unknown label noise kind {kind!r} (choose from {', '.join(NOISE_KINDS)})")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ImatError(f"label noise fraction must be in [0, 1], got {fraction!r}")
    if int(num_classes) < 2:
        raise ImatError(f"label noise needs at least 2 classes, got {num_classes}")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.size and y.max() >= num_classes:
        raise ImatError(f"label {int(y.max())} is out of range for {num_classes} classes")
    noisy = y.copy()
    mask = np.zeros(len(y), dtype=bool)
    eligible = np.flatnonzero(y >= 0)
    count = int(round(float(fraction) * len(y)))
    if count > len(eligible):
        raise ImatError(f"cannot flip {count} labels: only {len(eligible)} are known")
    if count == 0:
        return noisy, mask
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(eligible, size=count, replace=False))
    if kind == "pair":
        noisy[chosen] = (y[chosen] + 1) % num_classes
    else:
        # an offset in 1..K-1 added modulo K is uniform over the K-1 other classes
        offsets = rng.integers(1, num_classes, size=count)
        noisy[chosen] = (y[chosen] + offsets) % num_classes
    mask[chosen] = True
    return noisy, mask


def labelled_splits(
    df: pd.DataFrame,
    noise: LabelNoise,
    num_classes: int,
    clean: CleanConfig | None = None,
    clean_csv: str | os.PathLike[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray | None]:
    """The manifest's labelled train and val rows, with ``data.label_noise`` applied to train, then
    ``data.clean`` (the audit CSV ``clean_csv``'s verdicts: drop, relabel or a ``weight`` column).

    Returns (train, val, the clean train labels of the returned rows or None without noise); a label
    is wrong exactly where it differs from its clean one (a flip always changes the class). Teachers,
    the student and the label audit all take their rows from here, so for one config they see the
    same noisy (and cleaned) labels. The audit itself passes no ``clean``: it judges the given labels."""
    train = df[(df["split"] == "train") & (df["label"] >= 0)].reset_index(drop=True)
    val = df[(df["split"] == "val") & (df["label"] >= 0)].reset_index(drop=True)
    truth = None
    if noise.fraction > 0 and not train.empty:
        truth = train["label"].to_numpy(dtype=np.int64)
        noisy, flipped = apply_label_noise(truth, num_classes, noise.fraction, noise.kind, noise.seed)
        log.warning(
            "label noise: %d of %d train labels flipped (%s, seed %d)",
            int(flipped.sum()),
            len(noisy),
            noise.kind,
            noise.seed,
        )
        train = train.assign(label=noisy)
    if clean is not None and clean.enabled and clean_csv is not None and not train.empty:
        from imat.data.clean import apply_cleaning, plan_cleaning

        train, kept = apply_cleaning(train, clean, plan_cleaning(train, clean, clean_csv))
        truth = None if truth is None else truth[kept]
    return train, val, truth


def run_splits(
    cfg: RunConfig, df: pd.DataFrame, num_classes: int
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray | None]:
    """:func:`labelled_splits` with a run config's ``data.label_noise`` and ``data.clean``."""
    return labelled_splits(df, cfg.data.label_noise, num_classes, cfg.data.clean, cfg.clean_csv)
