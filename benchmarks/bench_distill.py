"""Distillation benchmark on CIFAR-10: can a small ResNet student reach its pool's ensemble, and does MEAL
beat knowledge distillation when both get the same tuning, data and optimizer steps?

The protocol:

- **Splits.** From CIFAR-10's training images, per class and disjoint: ``--train-per-class`` labelled
  training images, ``--val-per-class`` validation images and ``--extra-per-class`` unlabelled images. The
  validation split makes every choice: the teachers' best epoch, the accuracies the weighted teacher draw
  uses, every sweep, every student's best epoch. The 10,000-image test split only reports.
- **Teachers** (``--teachers``) trained with ``--label-smoothing`` (default none: label smoothing is known
  to weaken distillation). One pool serves every student.
- **Equal tuning.** CE, KD and MEAL each get one ASHA sweep of the same budget (``--tune-samples`` trials,
  ``--tune-epochs`` epochs, the same ``--tune-per-class`` subset): the student lr for all, temperature and
  hard-label weight for KD and MEAL, the discriminators and the stage block's gamma for MEAL.
- **Students** (``--methods``, ``--seeds`` each; every method's seed 0 before any seed 1): ``ce``, ``kd``,
  ``meal``, ``meal-no-d`` (MEAL's winner without discriminators), ``kd+unlabelled`` and
  ``meal+unlabelled`` (the extra images, one epoch covers them: more steps), and ``kd+unlabelled-matched``
  and ``meal+unlabelled-matched`` (the extra images at the labelled-only students' optimizer steps), so
  "more images" and "more steps" are told apart. Each student's figure is its best validation epoch's
  weights evaluated on the test split; its per-image predictions are kept (``RUN/preds/*.npz``).
- **Statistics.** Means over seeds with a Student-t interval; McNemar mid-p tests pairing the students'
  per-image verdicts on the test split (seeds pooled) for MEAL vs KD, MEAL vs MEAL without
  discriminators, and every distilled student vs CE.

Tables (``--publish NAME``: ``benchmarks/results/NAME*.csv``; default ``RUN/results/``), written as each
stage finishes: ``NAME.csv`` one row per trained model, ``NAME_means.csv`` per method, ``NAME_tests.csv``
one row per paired comparison, ``NAME_tune.csv`` every sweep's trials. ``--data-dir`` is an ImageFolder
``DIR/{train,test}/<class>/*.jpg`` (``imat data kit cifar10`` prepares it); ``--out`` is the run
directory, outside the checkout.

    .venv/bin/python benchmarks/bench_distill.py --data-dir DATA --out RUN --resume \\
        --publish distill_cifar10_v3                                   # full size, ~10-15 h on 2 cores
    .venv/bin/python benchmarks/bench_distill.py --data-dir DATA --out /tmp/d3 --smoke   # minutes
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from cpu_info import cpu_model
from distill_tables import STUDENT, finish_table, method_means, paired_table, verdict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# --- data ----------------------------------------------------------------------------------------------


def _row(path: Path, root: Path, split: str, label: int, name: str) -> dict:
    rel = path.relative_to(root)
    return {
        "image_id": str(rel.with_suffix("")),
        "split": split,
        "path": str(rel),
        "label": label,
        "source_label": name,
        "url": "",
    }


def split_rows(
    root: Path, train: int, val: int, extra: int, test: int, seed: int
) -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    """(manifest of train, val and test rows; class names; unlabelled extra rows).

    Per class, one seeded permutation of ``root/train/<class>`` is cut into ``train``, then ``val``, then
    ``extra`` images, so the three are disjoint by construction; ``test`` images per class (0: all) come
    from ``root/test``. Too few images for the cut is an error, not a silently smaller split."""
    classes = (
        sorted(p.name for p in (root / "train").iterdir() if p.is_dir()) if (root / "train").is_dir() else []
    )
    if not classes or not (root / "test").is_dir():
        raise SystemExit(
            f"--data-dir {root}: expected an ImageFolder {root}/{{train,test}}/<class>/*.jpg "
            "(prepare it with `imat data kit cifar10 --from ARCHIVE --out DIR`)"
        )
    test_classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
    if test_classes != classes:
        raise SystemExit(f"--data-dir {root}: test/ has classes {test_classes}, train/ has {classes}")
    rng = np.random.default_rng(seed)
    rows, unlabelled = [], []
    for label, name in enumerate(classes):
        files = sorted((root / "train" / name).glob("*.jpg"))
        if len(files) < train + val + extra:
            raise SystemExit(
                f"--data-dir {root}: class {name} has {len(files)} training images, the splits need "
                f"{train} + {val} + {extra}"
            )
        order = rng.permutation(len(files))
        cuts = {"train": order[:train], "val": order[train : train + val]}
        for split, idx in cuts.items():
            rows += [_row(files[i], root, split, label, name) for i in sorted(idx)]
        unlabelled += [
            _row(files[i], root, "extra", -1, "") for i in sorted(order[train + val : train + val + extra])
        ]
        tests = sorted((root / "test" / name).glob("*.jpg"))
        if test:
            tests = [
                tests[i] for i in sorted(rng.choice(len(tests), size=min(test, len(tests)), replace=False))
            ]
        rows += [_row(f, root, "test", label, name) for f in tests]
    return pd.DataFrame(rows), classes, pd.DataFrame(unlabelled)


def prepare_data(args: argparse.Namespace) -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    """Writes the pool's manifest (train/val/test) and ``extra.parquet`` (absolute paths) under --out."""
    from imat.io import write_json, write_parquet
    from imat.manifest import ClassMap, save_manifest

    manifest, classes, extra = split_rows(
        args.data_path,
        args.train_per_class,
        args.val_per_class,
        args.extra_per_class,
        args.test_per_class,
        args.seed,
    )
    save_manifest(manifest, ClassMap(classes, [], "str"), args.out_path / "pool" / "data")
    if not extra.empty:
        write_parquet(extra_path(args), extra.assign(path=[str(args.data_path / p) for p in extra["path"]]))
    counts = manifest["split"].value_counts().to_dict() | {"extra": len(extra)}
    write_json(args.out_path / "splits.json", {k: int(v) for k, v in counts.items()})
    return manifest, classes, extra


def extra_path(args: argparse.Namespace) -> Path:
    return args.out_path / "extra.parquet"


def base_config(run_dir: Path, args: argparse.Namespace) -> dict:
    """The run config every stage shares; its teacher part must not change between sittings (resume)."""
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
    }
    return {
        "run_dir": str(run_dir),
        "data": {"images": str(args.data_path), "num_workers": args.workers},
        "teachers": {
            "defaults": {
                **recipe,
                "epochs": args.teacher_epochs,
                "aug": {"preset": args.aug, "label_smoothing": args.label_smoothing},
            },
            "pool": teachers,
        },
        "distill": {
            "pool": str(args.out_path / "pool" / "teachers"),
            "student": {
                "arch": args.student,
                "input_size": 32,
                "crop_pct": 1.0,
                "model_kwargs": json.loads(args.student_kwargs),
            },
            # stage 1 (8x8 at 32 px) pooled to 64: a stage block whose map has positions to spare, scored
            # with the product's defaults (max over channels, block temperature); the sweep tunes its gamma
            "blocks": [{"index": 1, "length": 64, "gamma": 0.05}, {"index": "logits", "gamma": 1.0}],
            "temperature": 1.0,
            "train": {**recipe, "epochs": args.student_epochs, "aug": {"preset": args.aug}},
        },
    }


# --- methods and sweeps --------------------------------------------------------------------------------


@dataclass
class Method:
    """A student: the sweep whose winner it uses (``tune``), its own overrides, and its data."""

    key: str
    tune: str
    overrides: list[str] = field(default_factory=list)
    unlabelled: bool = False
    step_matched: bool = False  # with unlabelled: capped at the labelled-only students' steps per epoch


METHODS = {
    m.key: m
    for m in (
        Method("ce", "ce"),
        Method("kd", "kd"),
        Method("meal", "meal"),
        Method("meal-no-d", "meal", ["distill.adversarial.enabled=false"]),
        Method("kd+unlabelled", "kd", unlabelled=True),
        Method("meal+unlabelled", "meal", unlabelled=True),
        Method("kd+unlabelled-matched", "kd", unlabelled=True, step_matched=True),
        Method("meal+unlabelled-matched", "meal", unlabelled=True, step_matched=True),
    )
}

# every sweep's shared knobs; KD's hard-label share is 1 - kd_alpha, MEAL's a weight beside the soft loss:
# the choices match (alpha 0.5/0.75/0.9/1.0 = hard weight 1/0.33/0.11/0 of the soft loss)
LR = {"distill.train.lr": {"type": "loguniform", "low": 0.02, "high": 0.3}}
TEMPERATURE = {"distill.temperature": {"type": "choice", "values": [1.0, 2.0, 4.0, 8.0]}}
SPACES: dict[str, dict] = {
    "ce": {**LR},
    "kd": {**LR, **TEMPERATURE, "distill.kd_alpha": {"type": "choice", "values": [0.5, 0.75, 0.9, 1.0]}},
    "meal": {
        **LR,
        **TEMPERATURE,
        "distill.hard_label_weight": {"type": "choice", "values": [0.0, 0.1, 0.33, 1.0]},
        "distill.adversarial.lr": {"type": "loguniform", "low": 1e-3, "high": 3e-2},
        "distill.adversarial.weight": {"type": "choice", "values": [0.03, 0.1, 0.3, 1.0]},
        "distill.adversarial.spectral_norm": {"type": "choice", "values": [False, True]},
        "distill.blocks.0.gamma": {"type": "loguniform", "low": 0.01, "high": 0.3},
    },
}
PAIRS = [  # (a, b) of the paired tests: a's error minus b's
    ("meal", "kd"),
    ("meal", "meal-no-d"),
    ("meal+unlabelled", "kd+unlabelled"),
    ("meal+unlabelled-matched", "kd+unlabelled-matched"),
    ("kd+unlabelled", "kd+unlabelled-matched"),  # more steps, same images
    ("meal+unlabelled", "meal+unlabelled-matched"),
    ("kd+unlabelled-matched", "kd"),  # more images, same steps
    ("meal+unlabelled-matched", "meal"),
    *((m, "ce") for m in METHODS if m != "ce"),
]


def winner_path(args: argparse.Namespace, sweep: str) -> Path:
    return args.out_path / f"tune-{sweep}" / "winner.json"


def tuned_overrides(args: argparse.Namespace, sweep: str) -> list[str]:
    """The sweep's winner as overrides (none before the sweep ran)."""
    path = winner_path(args, sweep)
    if not path.is_file():
        return []
    return [f"{k}={json.dumps(v)}" for k, v in json.loads(path.read_text()).items()]


def sweep_config(args: argparse.Namespace, sweep: str, manifest: pd.DataFrame, classes: list[str]) -> dict:
    """One sweep's run config: the same subset, trials, epochs and scheduler for every method, so the
    tuning budget is equal; the winner is the lowest validation error (the validation split, never test)."""
    from imat.manifest import ClassMap, save_manifest

    run = args.out_path / f"tune-{sweep}"
    train = manifest[manifest["split"] == "train"].groupby("label").head(args.tune_per_class)
    val = manifest[manifest["split"] == "val"].groupby("label").head(max(1, args.tune_per_class // 5))
    save_manifest(pd.concat([train, val]), ClassMap(classes, [], "str"), run / "data")
    raw = base_config(run, args)
    raw["distill"]["method"] = sweep
    raw["distill"]["train"]["epochs"] = args.tune_epochs
    raw["distill"]["train"]["seed"] = args.seed
    raw["tune"] = {
        "samples": args.tune_samples,
        "scheduler": "asha",
        "metric": "val_top1_err",
        "grace_period": max(1, args.tune_epochs // 4),
        "cpus_per_trial": args.cpus,
        "space": SPACES[sweep],
    }
    return raw


def stage_tune(
    args: argparse.Namespace, manifest: pd.DataFrame, classes: list[str], publish: Callable
) -> None:
    from distill.tune import tune_distill
    from imat.config import validate
    from imat.io import write_csv, write_json

    for sweep in args.sweeps:
        if winner_path(args, sweep).is_file() and args.resume:
            print(f"tune-{sweep}: winner already chosen; skipped (--resume)", flush=True)
            continue
        cfg = validate(sweep_config(args, sweep, manifest, classes), f"bench-tune-{sweep}")
        t0 = time.perf_counter()
        np.random.seed(args.seed)  # Tune's random search draws from numpy's global generator: seeded sweeps
        outcome = tune_distill(cfg, num_cpus=args.cpus, verbose=0)
        trials = outcome.trials.assign(method=sweep, sweep_wall_s=time.perf_counter() - t0)
        write_csv(args.out_path / f"tune-{sweep}" / "trials_table.csv", trials)
        write_json(winner_path(args, sweep), outcome.best_config)
        print(trials.to_string(index=False), flush=True)
        publish()


def sweep_tables(args: argparse.Namespace) -> pd.DataFrame:
    parts = [
        pd.read_csv(p) for s in SPACES if (p := args.out_path / f"tune-{s}" / "trials_table.csv").is_file()
    ]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# --- evaluation on the test split ----------------------------------------------------------------------


def save_preds(path: Path, image_ids: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict:
    """Keeps a model's per-image top-3 on the test split (``.npz``: image_id, label, top3) and returns
    its top-1/top-3 errors. The paired tests read these files."""
    from imat.io import write_with

    top3 = np.argsort(-probs, axis=1)[:, :3].astype(np.int16)
    keep = labels >= 0
    right1 = top3[:, 0] == labels
    right3 = (top3 == labels[:, None]).any(axis=1)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, image_id=image_ids.astype(str), label=labels, top3=top3)

    write_with(path, write)
    return {
        "top1_err": float(1 - right1[keep].mean()),
        "top3_err": float(1 - right3[keep].mean()),
        "test_images": int(keep.sum()),
    }


def read_verdicts(path: Path) -> dict[str, bool]:
    """``{image_id: top-1 right}`` of one model's predictions file."""
    with np.load(path, allow_pickle=False) as z:
        right = z["top3"][:, 0] == z["label"]
        return dict(zip(z["image_id"].tolist(), right.tolist(), strict=True))


def test_rows(args: argparse.Namespace) -> pd.DataFrame:
    from imat.manifest import load_manifest

    df, _ = load_manifest(args.out_path / "pool" / "data" / "manifest.parquet")
    return df[(df["split"] == "test") & (df["label"] >= 0)].reset_index(drop=True)


def evaluate_weights(args: argparse.Namespace, weights: Path, preds: Path) -> dict:
    """A student's saved weights on the test split, through the pool's evaluation code (its own input
    size, mean/std and crop from the weights' metadata)."""
    from imat.weights import read_meta
    from teachers.ensemble import pool_probs
    from teachers.pool import TeacherEntry

    meta = read_meta(weights)
    entry = TeacherEntry(
        name="student",
        arch=meta["arch"],
        num_classes=int(meta["num_classes"]),
        input_size=int(meta["input_size"]),
        mean=list(meta["mean"]),
        std=list(meta["std"]),
        crop_pct=float(meta.get("crop_pct", 1.0)),
        weights=str(weights),
        model_kwargs=dict(meta.get("model_kwargs") or {}),
    )
    rows = test_rows(args)
    probs, labels = pool_probs([entry], rows, str(args.data_path), device=args.device, batch_size=256)
    return save_preds(preds, rows["image_id"].to_numpy(), labels, probs[0])


# --- stages --------------------------------------------------------------------------------------------


def pool_id(pool_dir: Path) -> str:
    """A short name for a trained pool: the SHA-256 of its teachers' weights (content, not path)."""
    from distill.cache import file_sha256

    h = hashlib.sha256()
    for w in sorted(pool_dir.glob("*/best.safetensors")):
        h.update(f"{w.parent.name}|{file_sha256(w)}\n".encode())
    return h.hexdigest()[:8]


def stage_teachers(args: argparse.Namespace) -> list[dict]:
    """Trains the pool (best epoch on the validation split), records its validation evaluation (the
    weighted draw's accuracies, the greedy selection) and reports each teacher and the ensemble on test."""
    from imat.config import validate
    from teachers.ensemble import ensemble_probs, pool_probs
    from teachers.evaluate import evaluate_pool
    from teachers.pool import load_pool
    from teachers.train import train_pool

    cfg = validate(base_config(args.out_path / "pool", args), "bench-pool")
    t0 = time.perf_counter()
    train_pool(cfg, resume=True)
    wall = time.perf_counter() - t0
    args.pool = pool_id(cfg.pool_dir)
    evaluate_pool(
        cfg.pool_dir, split="val", batch_size=256, device=args.device, metric="top1", progress=False
    )
    entries = load_pool(cfg.pool_dir)
    rows_df = test_rows(args)
    probs, labels = pool_probs(entries, rows_df, str(args.data_path), device=args.device, batch_size=256)
    ids = rows_df["image_id"].to_numpy()
    preds = args.out_path / "preds"
    rows = []
    for t, e in enumerate(entries):
        summ = pd.read_csv(cfg.pool_dir / e.name / "summary.csv")
        res = save_preds(preds / f"teacher-{e.name}.npz", ids, labels, probs[t])
        rows.append(
            {
                "model": f"teacher {e.name}",
                "kind": "teacher",
                "method": "teacher",
                "seed": 0,
                **res,
                "val_top1_err": 1 - float(e.val_top1) if e.val_top1 is not None else float("nan"),
                "best_epoch": int(summ.loc[summ["val_top1"].idxmax(), "epoch"]),
                "epochs": len(summ),
                "wall_s": float(summ["epoch_time_s"].sum()),
                "s_per_epoch": float(summ["train_time_s"].median()),
            }
        )
    res = save_preds(preds / "ensemble.npz", ids, labels, ensemble_probs(probs, "mean"))
    rows.append({"model": "ensemble_mean", "kind": "ensemble", "method": "ensemble", "seed": 0, **res})
    print(f"pool {args.pool}: trained/resumed in {wall:.0f}s this sitting", flush=True)
    return rows


def labelled_steps(args: argparse.Namespace, manifest: pd.DataFrame) -> int:
    """Optimizer steps per epoch of a labelled-only student: the engine's loader drops the last partial
    batch when there is more than one batch (imat.data.recipe)."""
    n = int((manifest["split"] == "train").sum())
    return n // args.batch_size if n > args.batch_size else 1


def student_config(args: argparse.Namespace, m: Method, seed: int, steps: int) -> dict:
    from imat.config import apply_override

    raw = copy.deepcopy(base_config(student_dir(args, m.key, seed), args))
    overrides = [f"distill.method={m.tune}", *tuned_overrides(args, m.tune), *m.overrides]
    if m.unlabelled:
        overrides.append(f"distill.extra_images={extra_path(args)}")
    if m.step_matched:
        overrides.append(f"distill.train.max_steps_per_epoch={steps}")
    for o in [*overrides, f"distill.train.seed={seed}"]:
        apply_override(raw, o)
    return raw


def student_dir(args: argparse.Namespace, key: str, seed: int) -> Path:
    return args.out_path / "students" / f"{key}-s{seed}"


def student_row(args: argparse.Namespace, m: Method, seed: int, summary: pd.DataFrame, res: dict) -> dict:
    best = summary.loc[summary["val_top1"].idxmax()]
    d_cols = [c for c in summary.columns if c.startswith("d_acc_b")]
    # the engine's own step count; a summary without it: one step per batch of the epoch's images
    estimate = int(np.ceil(summary["train_images"].astype(float) / args.batch_size).sum())
    steps = int(summary["global_step"].iloc[-1]) if "global_step" in summary else estimate
    return {
        "model": f"student {m.key}",
        "kind": STUDENT,
        "method": m.key,
        "seed": seed,
        **res,
        "val_top1_err": 1 - float(best["val_top1"]),
        "best_epoch": int(best["epoch"]),
        "epochs": len(summary),
        "steps": steps,
        "train_images": int(summary["train_images"].sum()),
        "wall_s": float(summary["epoch_time_s"].sum()),
        "s_per_epoch": float(summary["train_time_s"].median()),
        "d_acc_last": float(summary[d_cols].iloc[-1].max()) if d_cols else float("nan"),
        "adversarial": str(summary["adversarial"].iloc[-1]) if "adversarial" in summary else "",
        "overrides": " ".join(tuned_overrides(args, m.tune) + m.overrides),
    }


def stage_students(
    args: argparse.Namespace, manifest: pd.DataFrame, publish: Callable[[list[dict]], object]
) -> list[dict]:
    """Trains the ``--methods`` students (every method's seed 0 before any seed 1, so a sitting cut short
    still compares them all); a finished student (its predictions file written) is read back."""
    from distill.train import distill
    from imat.config import validate

    steps = labelled_steps(args, manifest)
    rows: list[dict] = []
    for seed, key in sorted((s, k) for k in args.methods for s in range(args.seeds)):
        m = METHODS[key]
        run = student_dir(args, key, seed)
        preds = args.out_path / "preds" / f"{key}-s{seed}.npz"
        done = run / "student" / "summary.csv"
        if done.is_file() and not args.resume:
            raise SystemExit(f"{done} exists: pass --resume to continue or reuse it")
        if preds.is_file() and done.is_file():
            summary = pd.read_csv(done)
            res = {k: v for k, v in _preds_errors(preds).items()}
        else:
            cfg = validate(student_config(args, m, seed, steps), f"bench-{key}")
            summary = distill(cfg, resume=True, progress=False)
            res = evaluate_weights(args, run / "student" / "best.safetensors", preds)
        rows.append(student_row(args, m, seed, summary, res))
        print({k: rows[-1][k] for k in ("method", "seed", "top1_err", "val_top1_err", "steps")}, flush=True)
        publish(rows)
    return rows


def _preds_errors(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        top3, label = z["top3"], z["label"]
    keep = label >= 0
    return {
        "top1_err": float(1 - (top3[keep, 0] == label[keep]).mean()),
        "top3_err": float(1 - (top3[keep] == label[keep, None]).any(axis=1).mean()),
        "test_images": int(keep.sum()),
    }


def verdicts(args: argparse.Namespace) -> dict[str, dict[int, dict[str, bool]]]:
    """Every finished student's per-image top-1 verdicts, ``{method: {seed: {image_id: right}}}``."""
    out: dict[str, dict[int, dict[str, bool]]] = {}
    for key in args.methods:
        for seed in range(args.seeds):
            p = args.out_path / "preds" / f"{key}-s{seed}.npz"
            if p.is_file():
                out.setdefault(key, {})[seed] = read_verdicts(p)
    return out


# --- the run -------------------------------------------------------------------------------------------

SMOKE = dict(
    train_per_class=8, val_per_class=4, extra_per_class=8, test_per_class=4, teachers="resnet10t:32",
    teacher_epochs=1, student_epochs=2, batch_size=16, tune_samples=2, tune_epochs=1, tune_per_class=4,
    seeds=2, precision="fp32", channels_last=False,
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="ImageFolder DIR/{train,test}/<class>/*.jpg")
    p.add_argument("--out", required=True, help="run directory (outside the checkout)")
    p.add_argument("--resume", action="store_true", help="continue the runs under --out")
    p.add_argument("--smoke", action="store_true", help="the whole protocol on tiny subsets, minutes")
    p.add_argument("--stages", default="teachers,tune,students")
    p.add_argument("--train-per-class", type=int, default=2500)
    p.add_argument("--val-per-class", type=int, default=500, help="carved from the training images")
    p.add_argument("--extra-per-class", type=int, default=2000, help="unlabelled training images per class")
    p.add_argument("--test-per-class", type=int, default=0, help="0: the whole test split")
    p.add_argument(
        "--teachers", default="resnet18:32,resnet10t:32,regnety_008:32", help="arch:input_size,..."
    )
    p.add_argument("--student", default="resnet10t")
    p.add_argument("--student-kwargs", default='{"channels": [16, 32, 64, 128]}', help="timm kwargs, JSON")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--student-epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="teachers' lr (the students' is swept)")
    p.add_argument("--aug", default="crop", help="augmentation preset of teachers and students")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="teachers' label smoothing")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--cpus", type=int, default=2, help="CPUs per sweep trial (and Ray's cap)")
    p.add_argument("--methods", default=",".join(METHODS), help="students to train, comma-separated")
    p.add_argument("--seeds", type=int, default=3, help="seeds per student method")
    p.add_argument("--tune-samples", type=int, default=16, help="trials per sweep (every method the same)")
    p.add_argument("--tune-epochs", type=int, default=8)
    p.add_argument("--tune-per-class", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="the splits' and the sweeps' seed")
    p.add_argument(
        "--aim-ratio", type=float, default=0.85, help="acceptance: MEAL's error at most this x CE's"
    )
    p.add_argument(
        "--aim-gap", type=float, default=0.75, help="acceptance: share of the CE-ensemble gap closed"
    )
    p.add_argument("--alpha", type=float, default=0.05, help="acceptance: paired test level for 'below KD'")
    p.add_argument("--publish", default="", help="write benchmarks/results/NAME*.csv (default: RUN/results/)")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    args.out_path = Path(args.out).resolve()
    args.data_path = Path(args.data_dir).resolve()
    if args.out_path == ROOT or ROOT in args.out_path.parents:
        p.exit(2, f"--out {args.out_path}: keep the run directory outside the checkout {ROOT}\n")
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.exit(2, f"--methods: unknown {unknown}; known: {', '.join(METHODS)}\n")
    args.sweeps = [s for s in SPACES if any(METHODS[m].tune == s for m in args.methods)]
    args.pool = ""
    return args


def main(argv: list[str] | None = None) -> int:
    from imat.io import write_csv

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    stages = [s for s in args.stages.split(",") if s]
    start = time.perf_counter()
    manifest, classes, _ = prepare_data(args)
    context = {"machine": cpu_model(), "precision": args.precision, "threads": torch.get_num_threads()}
    base = RESULTS / args.publish if args.publish else args.out_path / "results" / "distill"
    pool_rows: list[dict] = []
    student_rows: list[dict] = []

    def publish(rows: list[dict] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        nonlocal student_rows
        if rows is not None:
            student_rows = list(rows)
        df = finish_table([{**r, "pool": args.pool, **context} for r in pool_rows + student_rows])
        means = method_means(df)
        tests = paired_table(PAIRS, verdicts(args))
        for suffix, table in (("", df), ("_means", means), ("_tests", tests), ("_tune", sweep_tables(args))):
            if not table.empty:
                write_csv(f"{base}{suffix}.csv", table)
        return df, means, tests

    if "teachers" in stages or "students" in stages:
        pool_rows = stage_teachers(args)
        publish()
    if "tune" in stages:
        stage_tune(args, manifest, classes, publish)
    if "students" in stages:
        missing = [s for s in {METHODS[m].tune for m in args.methods} if not winner_path(args, s).is_file()]
        if missing:
            raise SystemExit(
                f"students: no sweep winner for {missing} under {args.out_path}: run the tune stage"
            )
        stage_students(args, manifest, publish)
    df, means, tests = publish()
    print(
        f"CIFAR-10, {args.train_per_class}/class train, {args.val_per_class}/class val (choices), "
        f"{args.extra_per_class}/class unlabelled, test split reports; teachers {args.teachers} x "
        f"{args.teacher_epochs} ep (label smoothing {args.label_smoothing}); student {args.student} "
        f"{args.student_kwargs} x {args.student_epochs} ep; {args.precision}; {context['machine']}, "
        f"{context['threads']} threads; this sitting {time.perf_counter() - start:.0f}s"
    )
    print(df.to_string(index=False))
    if not means.empty:
        print(means.to_string(index=False))
    if not tests.empty:
        print(tests.to_string(index=False))
    for meal, kd in (("meal", "kd"), ("meal+unlabelled", "kd+unlabelled")):
        line = verdict(
            means, tests, meal, kd, aim_ratio=args.aim_ratio, aim_gap=args.aim_gap, alpha=args.alpha
        )
        if line:
            print("acceptance:", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
