"""The distillation benchmark's tables: one row per model, the means over seeds with a t-interval, the
paired tests and the verdict against the acceptance thresholds. Rows are selected by their ``method``
key (ce, kd, meal, ...), never by a display label. Kept apart from ``bench_distill.py`` (the stages that
train) so the arithmetic is small enough to read and test."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd
from paired_tests import compare, t_interval

STUDENT = "student"  # the ``kind`` of a student row (teachers: teacher, the pool's ensemble: ensemble)


def finish_table(rows: list[dict]) -> pd.DataFrame:
    """Adds ratio_to_ce and gap_closed (top-1, test split) to the student rows.

    CE is the mean over the ``ce`` rows; the gap is CE's error minus the ensemble's (one pool serves every
    student). ``gap_closed = (CE - student) / (CE - ensemble)``, undefined without a gap."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    students_ = df["kind"] == STUDENT
    ce = df.loc[students_ & (df["method"] == "ce"), "top1_err"].mean()
    ens = df.loc[df["kind"] == "ensemble", "top1_err"].mean()
    df["ratio_to_ce"] = (df["top1_err"] / ce).where(students_) if math.isfinite(ce) else float("nan")
    gap = ce - ens
    df["gap_closed"] = ((ce - df["top1_err"]) / gap).where(students_) if gap > 0 else float("nan")
    first = ["model", "kind", "method", "seed", "top1_err", "top3_err", "ratio_to_ce", "gap_closed"]
    return df[first + [c for c in df.columns if c not in first]]


def method_means(df: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """One row per student method: the mean test error over its seeds with the half-width of the
    Student-t interval over those seeds (the noise that seeds carry; the per-image noise is what the
    paired tests judge), plus ratio to CE and gap closed of the mean."""
    if df.empty or "kind" not in df:
        return pd.DataFrame()
    st = df[df["kind"] == STUDENT]
    rows = []
    for method, g in st.groupby("method", sort=False):
        mean, half = t_interval(g["top1_err"].tolist(), level)
        rows.append(
            {
                "method": method,
                "seeds": int(g["seed"].nunique()),
                "top1_err": mean,
                "top1_err_t95": half,
                "top1_err_min": float(g["top1_err"].min()),
                "top1_err_max": float(g["top1_err"].max()),
                "top3_err": float(g["top3_err"].mean()),
                "ratio_to_ce": float(g["ratio_to_ce"].mean()),
                "gap_closed": float(g["gap_closed"].mean()),
                "steps": float(g["steps"].mean()) if "steps" in g else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def paired_table(
    pairs: Sequence[tuple[str, str]], verdicts: Mapping[str, Mapping[int, Mapping[str, bool]]]
) -> pd.DataFrame:
    """One row per comparison ``(a, b)`` whose methods both have per-image verdicts on a shared seed."""
    rows = [r for a, b in pairs if (r := compare(a, b, verdicts)) is not None]
    return pd.DataFrame(rows)


def verdict(
    means: pd.DataFrame,
    tests: pd.DataFrame,
    meal: str,
    kd: str,
    *,
    aim_ratio: float,
    aim_gap: float,
    alpha: float,
) -> str:
    """The acceptance check of MEAL method ``meal`` against KD method ``kd`` (same data): its mean error
    at most ``aim_ratio`` x CE's, at least ``aim_gap`` of the CE-to-ensemble gap closed, and below KD with
    the paired test's p-value under ``alpha``. Empty when a row is missing."""
    if means.empty or tests.empty:
        return ""
    by = means.set_index("method")
    if meal not in by.index or kd not in by.index:
        return ""
    m = by.loc[meal]
    hit = tests[(tests["a"] == meal) & (tests["b"] == kd)]
    if hit.empty:
        return ""
    t = hit.iloc[0]

    def mark(ok: bool) -> str:
        return "reached" if ok else "NOT reached"

    below = t["diff_points"] < 0 and t["p_value"] < alpha
    return (
        f"{meal} ({int(m['seeds'])} seeds, top-1 error {100 * m['top1_err']:.2f}%): ratio to CE "
        f"{m['ratio_to_ce']:.3f} (<= {aim_ratio}: {mark(m['ratio_to_ce'] <= aim_ratio)}); gap closed "
        f"{100 * m['gap_closed']:.0f}% (>= {100 * aim_gap:.0f}%: {mark(m['gap_closed'] >= aim_gap)}); "
        f"vs {kd} {t['diff_points']:+.2f} points, paired p = {t['p_value']:.3g} "
        f"(below {kd} at p < {alpha}: {mark(bool(below))})"
    )
