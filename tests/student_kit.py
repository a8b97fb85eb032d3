"""Fake student runs: an engine output folder (summary.csv, best.safetensors with the engine's metadata)
for tests where which student wins matters and the training does not."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from imat.weights import save_weights

CLASSES = {"source_labels": ["0", "1", "2"], "names": [], "label_type": "int"}


def fake_run(
    run_dir: Path,
    top1: list[float],
    top3: list[float],
    *,
    method: str = "meal",
    arch: str = "resnet10t",
    kind: str = "student",
    classes: dict | None = None,
    validation: bool = True,
) -> Path:
    """An engine output folder: per-epoch validation accuracy, best.safetensors at the best top-1 epoch
    (the engine's rule: strictly better than every earlier epoch)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    best, is_best = 0, []
    for i, acc in enumerate(top1):
        is_best.append(i == 0 or acc > top1[best])
        best = i if is_best[-1] else best
    summary = pd.DataFrame({"epoch": range(1, len(top1) + 1), "train_loss": 1.0, "is_best": is_best})
    metrics: dict[str, float] = {"train_loss": 1.0}
    if validation:
        summary["val_top1"], summary["val_top3"] = top1, top3
        metrics |= {"val_top1": top1[best], "val_top3": top3[best]}
    summary.to_csv(run_dir / "summary.csv", index=False)
    meta = {
        "kind": kind,
        "method": method,
        "arch": arch,
        "num_classes": 3,
        "classes": classes or CLASSES,
        "epoch": best + 1,
        "best_metric": "top1",
        "metrics": metrics,
    }
    save_weights(run_dir / "best.safetensors", {"w": torch.zeros(2)}, meta)
    return run_dir
