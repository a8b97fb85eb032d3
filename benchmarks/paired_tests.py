"""Paired statistics for the distillation benchmark: two students judged on the same test images.

Two students evaluated on the same images disagree on few of them; a test that pairs their verdicts per
image (McNemar) sees a difference an unpaired interval on two error rates hides. Seeds are pooled: seed
``s`` of one method is paired with seed ``s`` of the other, every image of every shared seed is one pair.
scipy gives the binomial tail and Student's t quantile; statsmodels' ``mcnemar`` is not in the venv and
has no mid-p, which is the less conservative exact variant (Fagerland et al. 2013)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats


def mcnemar(a_right: np.ndarray, b_right: np.ndarray) -> dict[str, float]:
    """McNemar's exact and mid-p tests of two paired 0/1 verdicts (True: the image is right).

    ``b`` counts images A gets right and B wrong, ``c`` the reverse; under the null each discordant
    image is a fair coin. ``diff_points`` is A's error minus B's, in points (negative: A better)."""
    a = np.asarray(a_right, dtype=bool)
    b_ = np.asarray(b_right, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"paired verdicts need the same shape, got {a.shape} and {b_.shape}")
    n = int(a.size)
    b = int((a & ~b_).sum())
    c = int((~a & b_).sum())
    m = b + c
    if m == 0:
        p_exact = p_mid = 1.0
    else:
        k = min(b, c)
        two_tail = 2.0 * float(stats.binom.cdf(k, m, 0.5))
        p_exact = min(1.0, two_tail)
        p_mid = min(1.0, two_tail - float(stats.binom.pmf(k, m, 0.5)))  # half the observed point
    return {
        "images": n,
        "a_only_right": b,
        "b_only_right": c,
        "diff_points": 100.0 * (c - b) / n if n else float("nan"),
        "p_value": p_mid,
        "p_exact": p_exact,
    }


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t interval over ``values``); half-width NaN with one value."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean()) if x.size else float("nan")
    if x.size < 2:
        return mean, float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, half


def pooled_pairs(
    a: Mapping[int, Mapping[str, bool]], b: Mapping[int, Mapping[str, bool]]
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Pool two methods' per-image verdicts over the seeds both have: ``{seed: {image_id: right}}`` each.

    Only images both evaluated are paired (a run that skipped an unreadable image drops that pair).
    Returns (A's verdicts, B's verdicts, the shared seeds)."""
    seeds = sorted(set(a) & set(b))
    left: list[bool] = []
    right: list[bool] = []
    for s in seeds:
        shared = sorted(set(a[s]) & set(b[s]))
        left += [bool(a[s][i]) for i in shared]
        right += [bool(b[s][i]) for i in shared]
    return np.asarray(left, dtype=bool), np.asarray(right, dtype=bool), seeds


def compare(
    a: str, b: str, verdicts: Mapping[str, Mapping[int, Mapping[str, bool]]]
) -> dict[str, object] | None:
    """One row of the tests table for methods ``a`` and ``b`` (None when they share no seed)."""
    if a not in verdicts or b not in verdicts:
        return None
    left, right, seeds = pooled_pairs(verdicts[a], verdicts[b])
    if not seeds or left.size == 0:
        return None
    # the seeds' own spread, which pooling ignores: a t-interval over the per-seed paired differences
    per_seed = []
    for s in seeds:
        x, y, _ = pooled_pairs({s: verdicts[a][s]}, {s: verdicts[b][s]})
        per_seed.append(100.0 * (y.mean() - x.mean()))
    _, half = t_interval(per_seed)
    return {
        "a": a,
        "b": b,
        "seeds": len(seeds),
        **mcnemar(left, right),
        "diff_t95_over_seeds": half,
        "test": "McNemar mid-p, two-sided, seeds pooled",
    }
