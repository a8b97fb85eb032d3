"""Matplotlib figures of a run, each returned as a base64 PNG (or None when the data is not there)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # reports are made on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def to_png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _numeric(df: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    return [
        c for c in columns if c in df.columns and pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()
    ]


def training_curves(name: str, df: pd.DataFrame) -> str | None:
    """Loss parts, validation accuracy and (for a distillation) discriminator accuracy per epoch."""
    if "epoch" not in df.columns or df.empty:
        return None
    losses = _numeric(
        df, [c for c in df.columns if c.startswith("train_") and c not in ("train_images", "train_time_s")]
    )
    losses += _numeric(df, ["val_loss"])
    accuracy = _numeric(df, ["val_top1", "val_top3"])
    disc = _numeric(df, [c for c in df.columns if "acc" in c and c.startswith(("d_", "disc", "task_d_"))])
    panels = [
        (t, cols)
        for t, cols in (("loss", losses), ("validation accuracy", accuracy), ("discriminator accuracy", disc))
        if cols
    ]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, cols) in zip(axes[0], panels, strict=True):
        for col in cols:
            ax.plot(df["epoch"], df[col], marker="o", ms=3, label=col)
        ax.set_title(f"{name}: {title}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if title == "loss" and (df[cols] > 0).all().all():
            ax.set_yscale("log")
    return to_png(fig)


def accuracy_vs_cost(results: pd.DataFrame) -> str | None:
    """Top-3 error against inference cost (images/s) for teachers, ensemble and students."""
    needed = {"model", "top3_err", "images_per_s"}
    if not needed <= set(results.columns):
        return None
    df = results.dropna(subset=["top3_err", "images_per_s"])
    if df.empty:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.scatter(df["images_per_s"], df["top3_err"] * 100, s=40)
    for _, row in df.iterrows():
        ax.annotate(
            str(row["model"]),
            (row["images_per_s"], row["top3_err"] * 100),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("inference images/s (log)")
    ax.set_ylabel("top-3 error (%)")
    ax.set_title("accuracy against inference cost", fontsize=9)
    ax.grid(alpha=0.3)
    return to_png(fig)


def confusion(truth: np.ndarray, pred: np.ndarray, labels: list[str]) -> str | None:
    """Row-normalised confusion matrix (at most 40 classes shown: the most confused ones)."""
    if len(truth) == 0:
        return None
    index = {lab: i for i, lab in enumerate(labels)}
    k = len(labels)
    mat = np.zeros((k, k), dtype=np.float64)
    for t, p in zip(truth, pred, strict=True):
        if t in index and p in index:
            mat[index[t], index[p]] += 1
    keep = np.arange(k)
    if k > 40:  # fine-grained sets: show the classes with the most errors
        errors = mat.sum(1) - np.diag(mat)
        keep = np.sort(np.argsort(-errors)[:40])
    sub = mat[np.ix_(keep, keep)]
    sub = sub / np.maximum(sub.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    im = ax.imshow(sub, cmap="Blues", vmin=0, vmax=1)
    shown = [labels[i] for i in keep]
    ax.set_xticks(range(len(keep)), shown, rotation=90, fontsize=6)
    ax.set_yticks(range(len(keep)), shown, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (rows normalised)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return to_png(fig)


def per_class_accuracy(truth: np.ndarray, pred: np.ndarray) -> str | None:
    if len(truth) == 0:
        return None
    df = pd.DataFrame({"truth": truth, "hit": truth == pred})
    acc = df.groupby("truth")["hit"].mean().sort_values()
    if len(acc) > 60:  # long tails: the worst and best 30
        acc = pd.concat([acc.head(30), acc.tail(30)])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.18 * len(acc)), 3.2))
    ax.bar(range(len(acc)), acc.to_numpy() * 100)
    ax.set_xticks(range(len(acc)), [str(i) for i in acc.index], rotation=90, fontsize=6)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("per-class accuracy (test, sorted)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return to_png(fig)
