"""The distillation benchmark's tables: one row per model, the means over seeds, the discriminators'
ablation and the issue's aim, each with the ±95% interval of the error rates behind it. Kept apart from
``bench_distill.py`` (the stages that train) so the arithmetic is small enough to read and test."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def ci95(p: float | pd.Series, n: int) -> float | pd.Series:
    """±95% normal-approximation half-width of an error rate ``p`` measured on ``n`` images."""
    return 1.96 * np.sqrt(p * (1 - p) / n)


def diff_ci95(pa: float, pb: float, n: int) -> float:
    """±95% half-width of the unpaired difference of two error rates on ``n`` images each."""
    return 1.96 * math.sqrt(pa * (1 - pa) / n + pb * (1 - pb) / n)


def finish_table(rows: list[dict], val_images: int) -> pd.DataFrame:
    """Adds ratio_to_ce and gap_closed (top-1) and the ±95% binomial half-width of each top-1 error.

    CE is the mean over CE rows (it needs no teachers). A student's gap is to the ensemble of its own
    ``pool`` (rows of several trained pools can share a table); without one, to the ensembles' mean."""
    df = pd.DataFrame(rows)
    students_ = df["model"].astype(str).str.startswith("student ")
    ce = df.loc[df["model"] == "student ce", "top1_err"].mean()
    pool = df["pool"] if "pool" in df else pd.Series(float("nan"), index=df.index)
    ens = df["model"] == "ensemble_mean"
    by_pool = df.loc[ens, "top1_err"].groupby(pool[ens]).mean()
    ens_err = pool.map(by_pool).fillna(df.loc[ens, "top1_err"].mean())
    df["ratio_to_ce"] = df["top1_err"] / ce if math.isfinite(ce) else float("nan")
    gap = ce - ens_err  # no gap (or an ensemble worse than CE) leaves nothing to close: undefined
    df["gap_closed"] = ((ce - df["top1_err"]) / gap).where(gap > 0)
    df.loc[~students_, ["ratio_to_ce", "gap_closed"]] = float("nan")
    df["top1_ci95"] = ci95(df["top1_err"], val_images)
    first = ["model", "method", "seed", "top1_err", "top3_err", "ratio_to_ce", "gap_closed"]
    return df[first + [c for c in df.columns if c not in first]]


def method_means(df: pd.DataFrame, val_images: int) -> pd.DataFrame:
    """One row per student method of a ``finish_table`` table: top-1/top-3 error averaged over its
    seeds, with the seeds' spread, and the ±95% interval of one evaluation (the seeds share the
    validation images, so averaging them does not shrink that part of the noise). Ratio to CE and gap
    closed are linear in the error, so their mean over seeds is the mean error's."""
    st = df[df["model"].astype(str).str.startswith("student ")]
    if st.empty:
        return pd.DataFrame()
    out = (
        st.groupby("model", sort=False)
        .agg(
            method=("method", "first"),
            seeds=("seed", "nunique"),
            top1_err=("top1_err", "mean"),
            top1_err_min=("top1_err", "min"),
            top1_err_max=("top1_err", "max"),
            top3_err=("top3_err", "mean"),
            ratio_to_ce=("ratio_to_ce", "mean"),
            gap_closed=("gap_closed", "mean"),
            **({"pools": ("pool", "nunique")} if "pool" in st else {}),
        )
        .reset_index()
    )
    out["top1_ci95"] = ci95(out["top1_err"], val_images)
    return out


def aim_check(means: pd.DataFrame, val_images: int) -> str:
    """The issue's aim for the best MEAL student (lowest mean top-1 error; the ablations without
    discriminators are not MEAL): at most 0.85x CE's error, below KD, at least 75% of the CE-to-ensemble
    gap closed."""
    if means.empty:
        return ""
    method = means["method"].astype(str)
    meal = means[method.str.startswith("meal") & ~method.str.contains("no discriminators")]
    kd = means.loc[means["model"] == "student kd", "top1_err"]
    if meal.empty or kd.empty:
        return ""
    best = meal.loc[meal["top1_err"].idxmin()]
    pb, pk = float(best["top1_err"]), float(kd.iloc[0])
    half = diff_ci95(pb, pk, val_images)

    def mark(ok: bool) -> str:
        return "reached" if ok else "NOT reached"

    return (
        f"aim, best MEAL = {best['model']} ({best['seeds']} seed(s), top-1 error {100 * pb:.2f}%): "
        f"ratio to CE {best['ratio_to_ce']:.3f} (<= 0.85: {mark(best['ratio_to_ce'] <= 0.85)}); "
        f"KD - best {100 * (pk - pb):+.2f} points, ±{100 * half:.2f} at 95% (below KD: {mark(pb < pk)}"
        f"{', outside the interval' if pk - pb > half else ', inside the interval'}); "
        f"gap closed {100 * best['gap_closed']:.0f}% (>= 75%: {mark(best['gap_closed'] >= 0.75)})"
    )


def discriminator_ablation(df: pd.DataFrame, val_images: int) -> str:
    """MEAL with minus without discriminators (defaults, and tuned), each with the ±95% interval of an
    unpaired difference of two error rates on the same validation images."""
    lines = []
    for with_d, label in (("meal", "defaults"), ("meal-tuned", "tuned")):
        a = df.loc[df["model"] == f"student {with_d}", "top1_err"]
        b = df.loc[df["model"] == f"student {with_d}-noD", "top1_err"]
        if a.empty or b.empty:
            continue
        pa, pb = float(a.mean()), float(b.mean())
        half = diff_ci95(pa, pb, val_images)
        lines.append(
            f"discriminator ablation ({label}): top-1 error with - without = {100 * (pa - pb):+.2f} points "
            f"(±{100 * half:.2f} at 95%)"
        )
    return "\n".join(lines)
