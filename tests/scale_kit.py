"""A tiny run directory for the scale-out tests: coloured squares or a subset of the embedded MNIST
kit, a manifest and a pool of one untrained resnet10t teacher (nothing downloaded), plus a
distill/tune config on the CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import timm
import torch
import yaml

from imat.kit import write_kit
from imat.manifest import ClassMap, save_manifest
from imat.weights import save_weights
from teachers.pool import TeacherEntry, update_pool_entry

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]


def write_squares(
    root: Path, n_train: int, n_val: int, size: int = 32
) -> tuple[Path, list[dict[str, Any]], list[str]]:
    """Coloured squares on noise, 3 classes (source labels 1, 2, 3): images, manifest rows, labels."""
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            label = i % 3
            img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            img[8 : size - 8, 8 : size - 8] = COLOURS[label]
            name = f"{split}_{i}.png"
            cv2.imwrite(str(images / name), img[:, :, ::-1])
            rows.append(
                {
                    "image_id": f"{split}_{i}",
                    "split": split,
                    "path": name,
                    "label": label,
                    "source_label": str(label + 1),
                    "url": "",
                }
            )
    return images, rows, ["1", "2", "3"]


def write_pool(
    run: Path,
    images: Path,
    classes: ClassMap,
    teachers: tuple[tuple[str, str, int], ...] = (("ta", "resnet10t", 32),),
) -> None:
    """RUN/teachers/: one untrained (seeded) timm teacher per ``(name, arch, input_size)`` and pool.json."""
    pool = run / "teachers"
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    n = classes.num_classes
    for i, (name, arch, size) in enumerate(teachers):
        torch.manual_seed(10 + i)
        model = timm.create_model(arch, pretrained=False, num_classes=n)
        meta = {
            "arch": arch,
            "num_classes": n,
            "input_size": size,
            "mean": mean,
            "std": std,
            "crop_pct": 0.875,
            "model_kwargs": {},
            "classes": classes.to_dict(),
        }
        save_weights(pool / name / "best.safetensors", model.state_dict(), meta)
        entry = TeacherEntry(name, arch, n, size, mean, std, 0.875, f"{name}/best.safetensors", pool_dir=pool)
        update_pool_entry(pool, entry, extra={"manifest": "../data/manifest.parquet", "images": str(images)})


def _embedded_kit(root: Path, n_train: int, n_val: int) -> tuple[Path, list[dict[str, Any]], list[str]]:
    """The embedded MNIST kit (`imat data kit mnist5k`), a class-balanced subset, 10 classes."""
    kit = write_kit("mnist5k", root / "kit", seed=0, limit=int((n_train + n_val) / 0.7) + 10)
    rows = []
    for split, n in (("train", n_train), ("val", n_val)):
        entries = json.loads(Path(kit[split]).read_text())["images"][:n]
        for e in entries:
            rows.append(
                {
                    "image_id": e["id"],
                    "split": split,
                    "path": e["id"],
                    "label": int(e["class"]),
                    "source_label": str(e["class"]),
                    "url": e["url"],
                }
            )
    return Path(kit["images"]), rows, [str(c) for c in range(10)]


def make_run(
    root: Path,
    n_train: int = 24,
    n_val: int = 9,
    extra: dict[str, Any] | None = None,
    data: str = "squares",
) -> Path:
    """Write images, RUN_DIR/data/manifest.parquet, RUN_DIR/teachers/pool.json and ROOT/cfg.yaml.

    ``data``: "squares" (3 classes of generated images) or "kit" (the embedded MNIST kit, 10 classes)."""
    images, rows, labels = (_embedded_kit if data == "kit" else write_squares)(root, n_train, n_val)
    root.mkdir(parents=True, exist_ok=True)
    classes = ClassMap.from_labels(labels)
    run = root / "run"
    save_manifest(pd.DataFrame(rows), classes, run / "data")
    write_pool(run, images, classes)
    cfg: dict[str, Any] = {
        "run_dir": str(run),
        "data": {"images": str(images), "num_workers": 0},
        "distill": {
            "method": "kd",
            "student": {
                "arch": "resnet10t",
                "input_size": 32,
                "mean": [0.5, 0.5, 0.5],
                "std": [0.25, 0.25, 0.25],
            },
            "train": {"epochs": 2, "batch_size": 8, "device": "cpu", "lr": 0.05, "aug": {"preset": "none"}},
        },
        "tune": {
            "samples": 2,
            "scheduler": "asha",
            "space": {
                "distill.train.lr": {"type": "loguniform", "low": 0.01, "high": 0.1},
                "distill.temperature": {"type": "choice", "values": [1.0, 4.0]},
            },
        },
    }
    for key, value in (extra or {}).items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
