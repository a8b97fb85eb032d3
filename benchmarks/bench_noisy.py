"""Noisy-label benchmark on CIFAR-10 (JPEG q75): the label audit, and cleaning that feeds training.

For each noise setting (default 40% symmetric and 40% pair-flip, seeded; validation on the clean
test split):

1. the teacher pool trained on the noisy labels;
2. the label audit twice: in-sample (that pool on its own training images) and out-of-sample
   (``--folds`` cross-fitted teachers, the same recipes for ``--audit-epochs``), each scored by
   cleanlab; precision and recall at the number of flips (the worst n_flips labels) and of
   cleanlab's flagged issues;
3. ``data.clean`` from the out-of-sample audit (``--clean-action``, ``--clean-top``) and the pool
   retrained on the cleaned labels;
4. the same student four times: CE on noisy labels, CE on cleaned labels, MEAL with the noisy pool on
   noisy labels, MEAL with the cleaned pool on cleaned labels; beside each pool's teachers and ensemble.

Writes ``RESULTS/noisy_cifar10.csv`` (noise, model, top1_err, top3_err, ratio_to_ce_noisy) and
``RESULTS/audit_cifar10.csv`` (noise, probabilities, precision, recall, ...), plus ``results.md`` under
--out. Every step is resumable: with ``--resume`` finished pools, folds, audits and students are
reused and a killed run continues where it stopped. Tiny proof run (minutes)::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_noisy.py --data-dir DATA --train-per-class 4 --val-per-class 2 \\
        --teacher-epochs 1 --audit-epochs 1 --student-epochs 1 --precision fp32 \\
        --out /tmp/noisy_tiny --results /tmp/noisy_tiny/results

The full-size command is in docs/BENCHMARKS.md ("Noisy labels").
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_distill import split_rows  # noqa: E402  (the CIFAR-10 subset, shared)

STUDENTS = {"ce": {"method": "ce"}, "meal": {"method": "meal"}}


def recipe(args: argparse.Namespace, epochs: int) -> dict[str, Any]:
    """The distillation benchmark's pool and student recipe."""
    return {
        "epochs": epochs,
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


def teacher_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for spec in args.teachers.split(","):
        arch, _, size = spec.partition(":")
        out.append({"name": arch, "arch": arch, "input_size": int(size or 32), "crop_pct": 1.0})
    return out


def run_config(run_dir: Path, images: Path, args: argparse.Namespace, kind: str, fraction: float) -> dict:
    return {
        "run_dir": str(run_dir),
        "data": {
            "images": str(images),
            "num_workers": args.workers,
            "label_noise": {"fraction": fraction, "kind": kind, "seed": args.seed},
        },
        "teachers": {"defaults": recipe(args, args.teacher_epochs), "pool": teacher_specs(args)},
        "audit": {
            "folds": args.folds,
            "seed": args.seed,
            "teachers": {"defaults": recipe(args, args.audit_epochs), "pool": teacher_specs(args)},
        },
        "distill": {
            "student": {
                "arch": args.student,
                "input_size": 32,
                "crop_pct": 1.0,
                "model_kwargs": json.loads(args.student_kwargs),
            },
            "blocks": [{"index": -2, "length": 16, "gamma": 0.05}, {"index": "logits", "gamma": 1.0}],
            "adversarial": {"lr": 1e-3},
            "train": recipe(args, args.student_epochs),
        },
    }


def cached_audit(path: Path, resume: bool, make: Any) -> dict[str, Any]:
    """audit.json of an audit, made by ``make()`` unless a finished one is there and --resume."""
    if resume and path.is_file():
        return json.loads(path.read_text())
    return make().info


def pool_rows(pool_dir: Path, val: pd.DataFrame, images: Path, labels: str, args: argparse.Namespace) -> list:
    """Each teacher's and the mean ensemble's error on the clean validation split (cached)."""
    from imat.io import write_csv
    from teachers.ensemble import evaluate_probs, pool_probs
    from teachers.pool import load_pool

    cache = pool_dir / "bench_eval.csv"
    if args.resume and cache.is_file():
        table = pd.read_csv(cache)
    else:
        entries = load_pool(pool_dir)
        probs, truth = pool_probs(
            entries, val, str(images), device=args.device, num_workers=args.workers, batch_size=256
        )
        table = evaluate_probs(probs, truth, [e.name for e in entries])
        write_csv(cache, table)
    rows = []
    for _, r in table.iterrows():
        if r["kind"] == "geomean":
            continue
        name = f"teacher {r['name']}" if r["kind"] == "teacher" else "ensemble (mean)"
        rows.append(
            {"model": f"{name}, {labels} labels", "top1_err": 1 - r["top1"], "top3_err": 1 - r["top3"]}
        )
    return rows


def run_noise(
    kind: str,
    fraction: float,
    args: argparse.Namespace,
    images: Path,
    manifest: pd.DataFrame,
    classes: list[str],
) -> tuple[list[dict], list[dict]]:
    from distill.audit import audit, crossfit_audit
    from distill.train import distill
    from imat.config import validate
    from imat.manifest import ClassMap, save_manifest
    from teachers.train import train_pool

    tag = f"{kind}{round(fraction * 100)}"
    out = Path(args.out) / tag
    cmap = ClassMap(classes, [], "str")
    noisy_raw = run_config(out / "noisy", images, args, kind, fraction)
    clean_raw = copy.deepcopy(noisy_raw)
    clean_raw["run_dir"] = str(out / "cleaned")
    audit_csv = out / "noisy" / "audit" / "audit.csv"
    clean_raw["data"]["clean"] = {"from": str(audit_csv), "action": args.clean_action, "top": args.clean_top}
    for raw in (noisy_raw, clean_raw):
        if not (Path(raw["run_dir"]) / "data" / "manifest.parquet").is_file():
            save_manifest(manifest, cmap, Path(raw["run_dir"]) / "data")
    noisy = validate(noisy_raw, f"{tag} noisy")
    t0 = time.perf_counter()
    print(f"[{tag}] teachers on noisy labels", flush=True)
    train_pool(noisy, resume=True)
    print(f"[{tag}] label audit: in-sample, then {args.folds}-fold cross-fitted", flush=True)
    inside = cached_audit(
        out / "noisy" / "audit_in_sample" / "audit.json",
        args.resume,
        lambda: audit(noisy.pool_dir, noisy, out_dir=out / "noisy" / "audit_in_sample", device=args.device),
    )
    outside = cached_audit(
        out / "noisy" / "audit" / "audit.json",
        args.resume,
        lambda: crossfit_audit(noisy, device=args.device, num_workers=args.workers),
    )
    audit_rows = []
    for name, info in (("in_sample", inside), ("out_of_sample", outside)):
        audit_rows.append(
            {
                "noise": tag,
                "probabilities": name,
                "precision": info["precision_at_flips"],
                "recall": info["recall_at_flips"],
                "flips": info["flips"],
                "issues": info["issues"],
                "issues_precision": info["issues_precision"],
                "issues_recall": info["issues_recall"],
            }
        )
        print(audit_rows[-1], flush=True)
    cleaned = validate(clean_raw, f"{tag} cleaned")
    print(f"[{tag}] teachers on cleaned labels ({args.clean_action}, top {args.clean_top})", flush=True)
    train_pool(cleaned, resume=True)
    val = manifest[manifest["split"] == "val"].reset_index(drop=True)
    rows = pool_rows(noisy.pool_dir, val, images, "noisy", args)
    rows += pool_rows(cleaned.pool_dir, val, images, "cleaned", args)
    for labels, raw, pool in (("noisy", noisy_raw, noisy.pool_dir), ("cleaned", clean_raw, cleaned.pool_dir)):
        for method, update in STUDENTS.items():
            student_raw = copy.deepcopy(raw)
            student_raw["run_dir"] = str(out / f"student-{method}-{labels}")
            student_raw["distill"].update(update)
            student_raw["distill"]["pool"] = str(pool)
            print(f"[{tag}] student {method.upper()} on {labels} labels", flush=True)
            summary = distill(validate(student_raw, f"{tag} {method} {labels}"), resume=True, progress=False)
            last = summary.iloc[-1]
            rows.append(
                {
                    "model": f"student {args.student} {method.upper()}, {labels} labels",
                    "top1_err": 1 - float(last["val_top1"]),
                    "top3_err": 1 - float(last["val_top3"]),
                }
            )
            print(rows[-1], flush=True)
    ce_noisy = next(r["top1_err"] for r in rows if r["model"].endswith("CE, noisy labels"))
    for r in rows:
        r["noise"] = tag
        r["ratio_to_ce_noisy"] = r["top1_err"] / ce_noisy if ce_noisy > 0 else float("nan")
    print(f"[{tag}] done in {time.perf_counter() - t0:.0f}s", flush=True)
    return rows, audit_rows


def markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            cells.append("" if pd.isna(v) else f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out/noisy", help="run dirs (git-ignored)")
    p.add_argument("--results", default="benchmarks/results", help="where the two CSV tables go")
    p.add_argument("--resume", action="store_true", help="continue an earlier run in --out")
    p.add_argument("--data-dir", required=True, help="ImageFolder DIR/{train,test}/<class>/*.jpg")
    p.add_argument("--train-per-class", type=int, default=5000)
    p.add_argument("--val-per-class", type=int, default=1000)
    p.add_argument("--noise", default="symmetric:0.4,pair:0.4", help="kind:fraction,...")
    p.add_argument("--teachers", default="resnet18:32,regnety_008:32", help="arch:input_size,...")
    p.add_argument("--student", default="resnet10t")
    p.add_argument("--student-kwargs", default='{"channels": [32, 64, 128, 256]}')
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--audit-epochs", type=int, default=15, help="epochs of the cross-fitted audit teachers")
    p.add_argument("--student-epochs", type=int, default=30)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--clean-action", default="drop", choices=["drop", "relabel", "downweight"])
    p.add_argument("--clean-top", default="auto", help="auto (cleanlab's issues) or N")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--aug", default="crop")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.clean_top != "auto":
        args.clean_top = int(args.clean_top)
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.resume:
        raise SystemExit(f"{out} holds an earlier run: pass --resume to continue it, or another --out")
    logging.basicConfig(level=logging.WARNING)
    images = Path(args.data_dir).resolve()
    manifest, classes, _ = split_rows(images, args.train_per_class, 0, 0, args.val_per_class, args.seed)
    manifest["split"] = manifest["split"].replace({"test": "val"})  # validation on the clean test split
    start = time.perf_counter()
    rows, audits = [], []
    for item in args.noise.split(","):
        kind, _, fraction = item.partition(":")
        r, a = run_noise(kind, float(fraction), args, images, manifest, classes)
        rows += r
        audits += a
        # the tables after each noise setting, so a sitting cut short still publishes what finished
        publish(args, rows, audits, time.perf_counter() - start)


def publish(args: argparse.Namespace, rows: list[dict], audits: list[dict], seconds: float) -> None:
    from imat.io import write_csv, write_text

    table = pd.DataFrame(rows)[["noise", "model", "top1_err", "top3_err", "ratio_to_ce_noisy"]]
    audit_table = pd.DataFrame(audits)
    results = Path(args.results)
    write_csv(results / "noisy_cifar10.csv", table)
    write_csv(results / "audit_cifar10.csv", audit_table)
    header = (
        f"CIFAR-10 (JPEG q75), {args.train_per_class}/class train, {args.val_per_class}/class clean test as "
        f"validation; noise {args.noise}; teachers {args.teachers} x {args.teacher_epochs} ep, audit "
        f"{args.folds}-fold x {args.audit_epochs} ep; clean {args.clean_action} top {args.clean_top}; student "
        f"{args.student} {args.student_kwargs} x {args.student_epochs} ep; {args.precision}"
        f"{' channels-last' if args.channels_last else ''}, batch {args.batch_size}, lr {args.lr}, aug "
        f"{args.aug}, label smoothing {args.label_smoothing}; {platform.machine()} {torch.get_num_threads()} "
        f"threads, device {args.device}; total {seconds:.0f}s\n\n"
    )
    text = header + markdown(table) + "\n\n" + markdown(audit_table) + "\n"
    write_text(Path(args.out) / "results.md", text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
