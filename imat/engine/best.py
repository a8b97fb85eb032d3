"""The best epoch: which metric decides it and ``best.safetensors`` (the weights meant for sharing,
the EMA's when EMA is on, with the run's meta). Mixed into :class:`imat.engine.loop.Engine`.
"""

from __future__ import annotations

import math
from typing import Any

from imat.weights import save_weights

HIGHER_IS_BETTER = {"top1": True, "top3": True, "loss": False}


class BestMixin:
    """Needs the engine's ``cfg``, ``val_loader``, ``ema``, ``task``, ``meta``, ``best_path`` and
    ``best_value`` / ``best_epoch``."""

    def _metric_of(self, row: dict[str, Any]) -> float | None:
        key = f"val_{self.cfg.best_metric}" if self.val_loader is not None else "train_loss"
        value = row.get(key)
        return None if value is None or not math.isfinite(float(value)) else float(value)

    def _update_best(self, row: dict[str, Any]) -> bool:
        value = self._metric_of(row)
        if value is None:  # nothing measurable (e.g. no labelled validation): keep the latest weights
            if self.best_value is None:
                self.best_epoch = int(row["epoch"])
                return True
            return False
        higher = HIGHER_IS_BETTER[self.cfg.best_metric] if self.val_loader is not None else False
        if self.best_value is None or (value > self.best_value if higher else value < self.best_value):
            self.best_value, self.best_epoch = value, int(row["epoch"])
            return True
        return False

    def _save_best(self, row: dict[str, Any]) -> None:
        model = self.ema.module if self.ema is not None else self.task.model
        metrics = {k: row[k] for k in ("val_loss", "val_top1", "val_top3", "train_loss") if k in row}
        meta = {
            **self.meta,
            "epoch": int(row["epoch"]),
            "best_metric": self.cfg.best_metric,
            "metrics": metrics,
        }
        if self.ema is not None:
            meta["ema"] = True
        save_weights(self.best_path, model.state_dict(), meta)
