"""Prior correction: re-weight probabilities from the training class distribution to a uniform one.

A classifier trained on a skewed training set is calibrated to that skew; when the test set is
balanced (Furniture 2018: 100 per class; Product 2019: ~45 per class) each class probability ``p`` is
rescaled as the 2018 Furniture winner did (Dowakin's "probability calibration" kernel)::

    p' = q*p / (q*p + r*(1-p))      q = 1/K (test prior), r = the class's training frequency

then the row is renormalised and re-ranked. A class absent from training would get r = 0 and p' = 1,
so when any count is zero every count gets add-one (Laplace) smoothing first."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from imat.errors import ImatError

log = logging.getLogger(__name__)


def train_frequencies(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    """Class frequencies r from per-class training counts (add-one smoothing when a count is 0)."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or not len(c):
        raise ImatError("prior correction needs one training count per class")
    if (c < 0).any():
        raise ImatError("prior correction: negative class counts")
    if (c == 0).any():
        log.warning("%d classes have no training images; smoothing all counts by +1", int((c == 0).sum()))
        c = c + 1.0
    return c / c.sum()


def prior_correct(
    probs: np.ndarray, frequencies: np.ndarray, test_prior: np.ndarray | None = None
) -> np.ndarray:
    """Corrected, renormalised probabilities for (N, K) ``probs`` given train ``frequencies`` (K,).

    ``test_prior`` defaults to uniform (q = 1/K)."""
    p = np.asarray(probs, dtype=np.float64)
    r = np.asarray(frequencies, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != r.shape[0]:
        raise ImatError(
            f"prior correction: probabilities have {p.shape[-1]} classes, frequencies {r.shape[0]}"
        )
    q = np.full_like(r, 1.0 / len(r)) if test_prior is None else np.asarray(test_prior, dtype=np.float64)
    num = q * p
    den = num + r * (1.0 - p)
    corrected = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    total = corrected.sum(axis=1, keepdims=True)
    return np.divide(corrected, total, out=np.full_like(corrected, 1.0 / len(r)), where=total > 0)
