"""Distillation benchmark on CIFAR-10 (JPEG q75): the same ResNet student trained alone (CE), with KD,
MEAL v1, MEAL v2, MEAL v1 without discriminators, and from cached teacher outputs (KD), beside each
teacher and the ensemble; then the same with symmetric label noise (teachers AND students see the
same noisy labels): CE alone vs MEAL. Top-1/top-3 error on the test split (used as validation) and
train seconds per epoch, all with equal epochs and augmentation.

Size knobs make it CPU-sized or full-sized::

    .venv/bin/python benchmarks/bench_distill.py --train-per-class 200 --val-per-class 50 \
        --teacher-epochs 3 --student-epochs 3 --out benchmarks/out/distill_small
    .venv/bin/python benchmarks/bench_distill.py --train-per-class 5000 --val-per-class 1000 \
        --teacher-epochs 30 --student-epochs 30 --teachers resnet34:64,regnetx_016:64 --device cuda ...

Outputs under --out: one run dir per experiment, ``results.csv`` and ``results.md`` (the table for
docs/BENCHMARKS.md). The data set is unpacked to ``data/cifar10-jpeg`` (git-ignored) when missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg-q75.tar.gz"


def unpack(data_dir: Path) -> Path:
    root = data_dir / "cifar10-jpeg"
    if not (root / "train").is_dir():
        data_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(data_dir, filter="data")
    return root


def subset_manifest(
    root: Path, train_per_class: int, val_per_class: int, seed: int
) -> tuple[pd.DataFrame, list[str]]:
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    rows = []
    for split, folder, n in (("train", "train", train_per_class), ("val", "test", val_per_class)):
        for label, name in enumerate(classes):
            files = sorted((root / folder / name).glob("*.jpg"))
            pick = rng.choice(len(files), size=min(n, len(files)), replace=False)
            for i in sorted(pick):
                f = files[i]
                rows.append(
                    {
                        "image_id": f"{folder}/{name}/{f.stem}",
                        "split": split,
                        "path": f"{folder}/{name}/{f.name}",
                        "label": label,
                        "source_label": name,
                        "url": "",
                    }
                )
    return pd.DataFrame(rows), classes


def base_config(run_dir: Path, images: Path, args: argparse.Namespace, noise: float) -> dict:
    teachers = []
    for spec in args.teachers.split(","):
        arch, _, size = spec.partition(":")
        teachers.append(
            {"name": arch.replace("_", "-"), "arch": arch, "input_size": int(size or 32), "crop_pct": 1.0}
        )
    recipe = {
        "batch_size": args.batch_size,
        "optimizer": "sgd",
        "lr": args.lr,
        "weight_decay": 5e-4,
        "schedule": "cosine",
        "warmup_epochs": 0.5,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "device": args.device,
        "aug": {"preset": args.aug, "label_smoothing": args.label_smoothing},
    }
    return {
        "run_dir": str(run_dir),
        "data": {
            "images": str(images),
            "num_workers": args.workers,
            "label_noise": {"fraction": noise, "seed": 0},
        },
        "teachers": {"defaults": {**recipe, "epochs": args.teacher_epochs}, "pool": teachers},
        "distill": {
            "student": {
                "arch": args.student,
                "input_size": 32,
                "crop_pct": 1.0,
                "model_kwargs": json.loads(args.student_kwargs),
            },
            "blocks": [{"index": -2, "length": 16, "gamma": 0.05}, {"index": "logits", "gamma": 1.0}],
            "adversarial": {"lr": 1e-3},
            "temperature": 1.0,
            "train": {**recipe, "epochs": args.student_epochs},
        },
    }


STUDENTS = {
    "ce": ["distill.method=ce"],
    "kd": ["distill.method=kd", "distill.temperature=4", "distill.kd_alpha=0.9"],
    "kd-cached": [
        "distill.method=kd",
        "distill.temperature=4",
        "distill.kd_alpha=0.9",
        "distill.cache.enabled=true",
        "distill.cache.views_per_image=4",
    ],
    "meal": ["distill.method=meal"],
    "meal-noD": ["distill.method=meal", "distill.adversarial.enabled=false"],
    "meal-v2": ["distill.method=meal-v2", "distill.blocks=[{index: logits}]"],
}


def run_experiment(
    tag: str,
    noise: float,
    methods: list[str],
    args: argparse.Namespace,
    images: Path,
    manifest: pd.DataFrame,
    classes: list[str],
) -> list[dict]:
    from distill.train import distill
    from imat.config import apply_override, validate
    from imat.manifest import ClassMap, save_manifest
    from teachers.ensemble import evaluate_probs, pool_probs
    from teachers.pool import load_pool
    from teachers.train import train_pool

    out = Path(args.out) / tag
    cmap = ClassMap(classes, [], "str")
    save_manifest(manifest, cmap, out / "data")
    raw = base_config(out, images, args, noise)
    cfg = validate(raw, tag)
    t0 = time.perf_counter()
    train_pool(cfg, resume=True)
    teacher_time = time.perf_counter() - t0
    rows = []
    entries = load_pool(cfg.pool_dir)
    val = manifest[manifest["split"] == "val"].reset_index(drop=True)
    probs, labels = pool_probs(
        entries, val, str(images), device=args.device if args.device != "auto" else "auto"
    )
    table = evaluate_probs(probs, labels, [e.name for e in entries])
    for _, r in table.iterrows():
        if r["kind"] == "geomean":
            continue
        summ = pd.read_csv(cfg.pool_dir / r["name"] / "summary.csv") if r["kind"] == "teacher" else None
        rows.append(
            {
                "experiment": tag,
                "model": f"teacher {r['name']}" if r["kind"] == "teacher" else "ensemble (mean)",
                "top1_err": 1 - r["top1"],
                "top3_err": 1 - r["top3"],
                "s_per_epoch": float(summ["train_time_s"].mean()) if summ is not None else float("nan"),
            }
        )
    for method in methods:
        import copy

        student_raw = copy.deepcopy(raw)
        student_raw["run_dir"] = str(out / f"student-{method}")
        student_raw["distill"]["pool"] = str(cfg.pool_dir)
        for o in STUDENTS[method]:
            apply_override(student_raw, o)
        scfg = validate(student_raw, method)
        t1 = time.perf_counter()
        summary = distill(scfg, resume=True, progress=False)
        wall = time.perf_counter() - t1
        last = summary.iloc[-1]
        rows.append(
            {
                "experiment": tag,
                "model": f"student {args.student} {method}",
                "top1_err": 1 - float(last["val_top1"]),
                "top3_err": 1 - float(last["val_top3"]),
                "s_per_epoch": float(summary["train_time_s"].mean()),
                "wall_s": wall,
            }
        )
        print(rows[-1], flush=True)
    rows.append({"experiment": tag, "model": "(teacher pool training, total)", "wall_s": teacher_time})
    return rows


def markdown(df: pd.DataFrame) -> str:
    """A GitHub table without the optional `tabulate` dependency."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join("" if pd.isna(r[c]) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out/distill")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--teachers", default="resnet18:32,regnetx_002:32", help="arch:input_size,...")
    p.add_argument("--student", default="resnet10t")
    p.add_argument(
        "--student-kwargs",
        default="{}",
        help="timm create_model kwargs of the student, JSON, e.g. '{\"channels\": [32, 64, 128, 256]}'",
    )
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--student-epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--aug", default="crop", help="augmentation preset of teachers and students")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument(
        "--noise", type=float, default=0.4, help="symmetric label noise of the noisy experiment; 0 skips it"
    )
    p.add_argument("--methods", default="ce,kd,kd-cached,meal,meal-noD,meal-v2")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    images = unpack(ROOT / args.data_dir)
    manifest, classes = subset_manifest(images, args.train_per_class, args.val_per_class, args.seed)
    methods = [m for m in args.methods.split(",") if m]
    start = time.perf_counter()
    rows = run_experiment("clean", 0.0, methods, args, images, manifest, classes)
    if args.noise > 0:
        rows += run_experiment(
            f"noise{int(args.noise * 100)}", args.noise, ["ce", "meal"], args, images, manifest, classes
        )
    df = pd.DataFrame(rows)
    out = Path(args.out)
    from imat.io import write_csv, write_text

    write_csv(out / "results.csv", df)
    shown = df.copy()
    for c in ("top1_err", "top3_err"):
        shown[c] = shown[c].map(lambda v: "" if pd.isna(v) else f"{100 * v:.1f}")
    for c in ("s_per_epoch", "wall_s"):
        if c in shown:
            shown[c] = shown[c].map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
    header = (
        f"CIFAR-10 (JPEG q75), {args.train_per_class}/class train, {args.val_per_class}/class test; teachers "
        f"{args.teachers} x {args.teacher_epochs} ep; student {args.student} {args.student_kwargs} x "
        f"{args.student_epochs} ep; "
        f"{args.precision}{' channels-last' if args.channels_last else ''}, batch {args.batch_size}, lr {args.lr}; "
        f"{platform.machine()} {torch.get_num_threads()} threads, device {args.device}; "
        f"total {time.perf_counter() - start:.0f}s\n\n"
    )
    write_text(out / "results.md", header + markdown(shown) + "\n")
    print(header + markdown(shown))


if __name__ == "__main__":
    main()
