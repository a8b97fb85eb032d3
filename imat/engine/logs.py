"""Per-epoch outputs of a run: ``summary.csv`` (rewritten atomically), TensorBoard scalars, console table.

TensorBoard event files are append-only streams and are the one output not written through
``imat.io`` (they cannot be renamed into place); a killed run may leave a truncated last event, which
TensorBoard tolerates. ``summary.csv`` is the source of truth.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from imat.io import write_csv

log = logging.getLogger("imat.engine")

# Columns shown in the end-of-run console table when present (others stay in summary.csv).
TABLE_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_top1",
    "val_top3",
    "val_top3_err",
    "images_per_s",
    "epoch_time_s",
]


def _tag(key: str) -> str:
    for prefix in ("train", "val", "lr", "grad_norm"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1 :]}"
    return f"epoch/{key}"


class RunLogger:
    """Writes the summary history; only constructed on the main process."""

    def __init__(self, out_dir: str | os.PathLike[str], tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.summary_path = self.out_dir / "summary.csv"
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def write_summary(self, history: list[dict[str, Any]]) -> pd.DataFrame:
        df = history_frame(history)
        write_csv(self.summary_path, df)
        return df

    def epoch(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            return
        step = int(row["epoch"])
        for key, value in row.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(float(value)):
                self._writer.add_scalar(_tag(key), float(value), step)
        self._writer.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def history_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    """The history rows as a DataFrame with a stable column order (epoch first)."""
    df = pd.DataFrame(history)
    if "epoch" in df.columns:
        df = df[["epoch"] + [c for c in df.columns if c != "epoch"]]
    return df


def console_table(df: pd.DataFrame, title: str = "") -> str:
    """A compact fixed-width table of the main columns (all epochs, or the last 20)."""
    if df.empty:
        return f"{title}: no epochs"
    cols = [c for c in TABLE_COLUMNS if c in df.columns]
    cols += [c for c in df.columns if c.startswith("lr_") and c not in cols][:2]
    shown = df[cols].tail(20)
    text = shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    return f"{title}\n{text}" if title else text
