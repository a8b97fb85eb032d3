"""Training checks for one GPU: the rows `benchmarks/gpu_check.sh` adds to its table.

Each check runs the real engine (nothing downloaded): the loader pins the batches, the engine copies
them non-blocking and normalises on the device, as `imat teachers train` / `imat distill` do on a GPU.
Checks:

- ``teacher_epoch`` fp16 and bf16, channels-last: a timm teacher (ClassificationTask); fp16 steps through
  the GradScaler, bf16 without one;
- ``meal_alternating`` fp16: MEAL's alternating discriminator/student steps (two optimisers, two
  backward passes per step) with the GradScaler, a frozen teacher and a stage block + the logits;
- ``kd_epoch`` bf16: Hinton KD from a frozen teacher (``imat distill`` with ``method: kd``);
- ``torchrun_teachers``, ``torchrun_kd``, ``torchrun_meal``: each task again, launched by
  ``torchrun --nproc_per_node 1`` (launcher, environment, process group and device binding; one rank,
  so no gradient all-reduce);
- ``decode_gpu``: ``data.decode: gpu`` - a teacher epoch on generated JPEG files through the real
  loaders (``recipe_loaders``: workers read bytes, the device decodes, crops, flips and normalises),
  and the device's decode of one batch against the same code on the CPU (nvJPEG vs libjpeg). Needs
  imat.data's packages (albumentations, OpenCV); without them the row says so.

Every check but ``decode_gpu`` runs on synthetic uint8 images held in memory. Each trains ``--epochs`` epochs of ``--steps`` steps and reports the last epoch's images/s (the first
includes cuDNN's autotuning). A row is ok when every loss and weight is finite and the precision
machinery did what it should (a scaler for fp16, channels-last weights). Rows are APPENDED to ``--out``
(columns: check, arch, engine, precision, batch, images_per_s, top1_agreement, top3_agreement, ok,
note); the agreement columns stay empty here.

    python benchmarks/gpu_check_train.py --out benchmarks/results/gpu_check.csv          # on a GPU, ~1 min
    python benchmarks/gpu_check_train.py --out /tmp/check.csv --device cpu --tiny       # CPU smoke test

``GPU_CHECK_DRY_RUN=1`` in the environment (gpu_check.sh --dry-run) means ``--device cpu --tiny``.

Needs torch, timm, pandas and pydantic (imat's configs); without pydantic it installs it offline from
``.whl/`` when that folder holds its wheels (``pip download pydantic -d .whl`` on a connected machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

COLUMNS = [
    "check",
    "arch",
    "engine",
    "precision",
    "batch",
    "images_per_s",
    "top1_agreement",
    "top3_agreement",
    "ok",
    "note",
]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def ensure_pydantic() -> str | None:
    """Import pydantic, installing it offline from .whl/ if needed; None when ok, else why not."""
    try:
        import pydantic  # noqa: F401

        return None
    except ImportError:
        pass
    wheels = REPO / ".whl"
    if not any(wheels.glob("pydantic*.whl")):
        return "pydantic missing and no wheels in .whl/ (pip download pydantic -d .whl)"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--find-links",
        str(wheels),
        "pydantic",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return None if proc.returncode == 0 else f"pip install pydantic from .whl/ failed: {proc.stderr[-200:]}"


class Images:
    """``length`` items cycling over ``unique`` fixed random uint8 CHW images and labels (a torch
    Dataset by protocol; kept in memory so the loader costs nothing)."""

    def __init__(self, unique: int, length: int, size: int, classes: int) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (unique, 3, size, size), dtype=torch.uint8, generator=g)
        self.y = torch.randint(0, classes, (unique,), generator=g)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = i % len(self.y)
        return {"image": self.x[j], "label": int(self.y[j]), "index": i}


def loader(args: argparse.Namespace, device: str) -> Any:
    import torch
    from torch.utils.data import DataLoader

    ds = Images(min(512, args.batch * args.steps), args.batch * args.steps, args.size, args.classes)
    dl = DataLoader(
        ds,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device == "cuda",
        persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    dl.device_normalize = (MEAN, STD)  # uint8 batches, normalised on the device by the engine
    return dl


def recipe(args: argparse.Namespace, device: str, precision: str, preset: str = "medium") -> Any:
    from imat.config.train import AugConfig, TrainConfig

    return TrainConfig(
        aug=AugConfig(preset=preset),
        epochs=args.epochs,
        batch_size=args.batch,
        lr=0.01,
        optimizer="sgd",
        device=device,
        precision=precision,
        channels_last=True,
        max_steps_per_epoch=args.steps,
        ema=False,
    )


def _finite(modules: dict[str, Any]) -> bool:
    import torch

    return all(
        bool(torch.isfinite(v).all())
        for m in modules.values()
        for v in m.state_dict().values()
        if v.is_floating_point()
    )


def _verdict(engine: Any, df: Any, precision: str) -> tuple[bool, str]:
    """ok + a note saying what was checked (or what failed)."""
    import torch

    problems = []
    losses = df[[c for c in df.columns if c.startswith("train_") and "loss" in c]].to_numpy()
    if not bool((losses == losses).all()) or not math.isfinite(float(abs(losses).max())):
        problems.append("non-finite training loss")
    if not _finite(engine.task.modules()):
        problems.append("non-finite weights")
    if precision == "fp16" and engine.amp_dtype == torch.float16:
        if engine.scaler is None or not math.isfinite(engine.scaler.get_scale()):
            problems.append("fp16 without a working GradScaler")
    elif precision == "fp16" and engine.device.type == "cuda":
        problems.append(f"fp16 fell back to {engine.amp_dtype}")
    weight = next(p for p in engine.task.model.parameters() if p.ndim == 4)
    if not weight.is_contiguous(memory_format=torch.channels_last):
        problems.append("weights not channels-last")
    if df["nonfinite_grad_steps"].sum() > 0:
        problems.append(f"{int(df['nonfinite_grad_steps'].sum())} step(s) skipped for inf/NaN gradients")
    if problems:
        return False, "; ".join(problems)
    scale = f", final loss scale {engine.scaler.get_scale():.0f}" if engine.scaler is not None else ""
    if precision == "fp16" and engine.scaler is None:
        scale = f", fp16 ran as {engine.amp_dtype or 'fp32'} (no CUDA)"
    return True, f"{len(df)} epoch(s) x {engine.steps_per_epoch} steps on {engine.device}{scale}"


def teacher_epoch(args: argparse.Namespace, device: str, precision: str, out_dir: Path) -> dict[str, Any]:
    import timm

    from imat.engine import ClassificationTask, Engine

    model = timm.create_model(args.teacher, pretrained=False, num_classes=args.classes)
    engine = Engine(
        ClassificationTask(model, label_smoothing=0.1),
        recipe(args, device, precision),
        out_dir,
        loader(args, device),
        None,
        progress=False,
        tensorboard=False,
    )
    df = engine.fit()
    ok, note = _verdict(engine, df, precision)
    return {"arch": args.teacher, "images_per_s": float(df["images_per_s"].iloc[-1]), "ok": ok, "note": note}


def meal_epoch(args: argparse.Namespace, device: str, precision: str, out_dir: Path) -> dict[str, Any]:
    from distill.methods.meal import MealTask, ResolvedBlocks
    from imat.config.distill import DistillConfig
    from imat.engine import Engine

    _, student, ens = _teacher_and_student(args)
    blocks = [-2, "logits"]
    dcfg = DistillConfig(
        blocks=[{"index": -2, "length": 16, "gamma": 0.05}, {"index": "logits", "gamma": 1.0}],
        adversarial={
            "mode": "alternating",
            "lr": 1e-3,
            "optimizer": "same",
            "weight": 1.0,
            "condition": "none",
        },
    )
    task = MealTask(
        student, ens, dcfg, ResolvedBlocks(blocks, [blocks]), {"mean": MEAN, "std": STD}, args.classes
    )
    engine = Engine(
        task,
        recipe(args, device, precision),
        out_dir,
        loader(args, device),
        None,
        progress=False,
        tensorboard=False,
    )
    assert task.manual_optimization and set(engine.optimizers) == {"main", "disc"}
    df = engine.fit()
    ok, note = _verdict(engine, df, precision)
    return {
        "arch": f"{args.student}<-{args.teacher}",
        "images_per_s": float(df["images_per_s"].iloc[-1]),
        "ok": ok,
        "note": note,
    }


def _teacher_and_student(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    import timm

    from distill.teachers_runtime import FrozenTeacher, TeacherEnsemble

    teacher = timm.create_model(args.teacher, pretrained=False, num_classes=args.classes)
    student = timm.create_model(args.student, pretrained=False, num_classes=args.classes)
    ens = TeacherEnsemble([FrozenTeacher("t0", teacher, args.size, MEAN, STD)], "mean", seed=0)
    return teacher, student, ens


def kd_epoch(args: argparse.Namespace, device: str, precision: str, out_dir: Path) -> dict[str, Any]:
    from distill.methods.kd import KDTask, SoftTargets
    from imat.engine import Engine

    _, student, ens = _teacher_and_student(args)
    task = KDTask(student, SoftTargets(ens, MEAN, STD), alpha=0.9, temperature=4.0)
    engine = Engine(
        task,
        recipe(args, device, precision),
        out_dir,
        loader(args, device),
        None,
        progress=False,
        tensorboard=False,
    )
    df = engine.fit()
    ok, note = _verdict(engine, df, precision)
    return {
        "arch": f"{args.student}<-{args.teacher}",
        "images_per_s": float(df["images_per_s"].iloc[-1]),
        "ok": ok,
        "note": note,
    }


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[str]:
    """Photo-sized JPEGs (500x375 and portrait, quality 90) of smooth colour fields, with PIL only."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (500, 375) if i % 4 else (375, 500)
        coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
        img = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        img = img + rng.integers(-12, 13, img.shape, dtype=np.int16)  # sensor-like texture
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def decode_gpu_epoch(args: argparse.Namespace, device: str, precision: str, out_dir: Path) -> dict[str, Any]:
    """A teacher epoch with ``data.decode: gpu`` on JPEG files, and the device decode vs the CPU's."""
    import pandas as pd
    import timm
    import torch

    try:
        from imat.data import recipe_loaders
        from imat.data.device_decode import ENCODED_KEYS, decode_on_device
    except ImportError as exc:  # albumentations / OpenCV absent on this machine
        return {"arch": args.teacher, "ok": False, "note": f"imat.data unavailable ({exc}): wheels in .whl/"}
    from imat.engine import ClassificationTask, Engine

    n = args.batch * args.steps
    files = write_jpegs(out_dir / "images", min(n, 256))
    df = pd.DataFrame(
        {"path": [files[i % len(files)] for i in range(n)], "label": [i % args.classes for i in range(n)]}
    )
    data_cfg = {"input_size": args.size, "mean": MEAN, "std": STD, "crop_pct": 0.875}
    rec = recipe(args, device, precision, preset="light")
    train, val = recipe_loaders(
        rec,
        data_cfg,
        df,
        df.iloc[: args.batch],
        images=None,
        decoder="pil",
        num_workers=args.workers,
        decode="gpu",
    )
    # nvJPEG against libjpeg on one eval batch: the same crops, a few grey levels apart at most
    batch = next(iter(val))
    rest = {k: v for k, v in batch.items() if k not in ENCODED_KEYS}
    enc = {k: batch[k] for k in ENCODED_KEYS}
    on_device = decode_on_device(
        {**{k: v.to(device) if torch.is_tensor(v) else v for k, v in rest.items()}, **enc},
        torch.device(device),
    )
    on_cpu = decode_on_device({**rest, **{k: batch[k] for k in ENCODED_KEYS}}, torch.device("cpu"))
    diff = float((on_device["image"].cpu().float() - on_cpu["image"].float()).abs().mean())
    model = timm.create_model(args.teacher, pretrained=False, num_classes=args.classes)
    engine = Engine(
        ClassificationTask(model), rec, out_dir / "run", train, None, progress=False, tensorboard=False
    )
    df_fit = engine.fit()
    ok, note = _verdict(engine, df_fit, precision)
    ok = ok and diff < 3.0 and tuple(on_device["image"].shape) == (args.batch, 3, args.size, args.size)
    note = f"{note}; {args.workers} loader workers, light preset; device vs CPU decode: mean |diff| {diff:.2f} grey levels"
    return {
        "arch": args.teacher,
        "images_per_s": float(df_fit["images_per_s"].iloc[-1]),
        "ok": ok,
        "note": note,
    }


TASKS = {"teacher": teacher_epoch, "kd": kd_epoch, "meal": meal_epoch}


def torchrun_epoch(
    args: argparse.Namespace, device: str, precision: str, out_dir: Path, task: str = "teacher"
) -> dict[str, Any]:
    """``task``'s epoch in a ``torchrun --nproc_per_node 1`` child (``--worker``), its result as JSON."""
    result = out_dir / "torchrun.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        str(Path(__file__).resolve()),
        "--worker",
        str(result),
        "--task",
        task,
        "--precision",
        precision,
        "--device",
        device,
        *(["--tiny"] if args.tiny else []),
        *_sizes(args),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {
            "arch": args.teacher if task == "teacher" else f"{args.student}<-{args.teacher}",
            "images_per_s": float("nan"),
            "ok": False,
            "note": f"torchrun: {tail[0][:200]}",
        }
    row = json.loads(result.read_text())
    row["note"] = f"torchrun --nproc_per_node 1 (one rank: launcher and device binding); {row['note']}"
    return row


def _sizes(args: argparse.Namespace) -> list[str]:
    keys = ("teacher", "student", "size", "batch", "steps", "epochs", "classes", "workers")
    return [x for k in keys for x in (f"--{k}", str(getattr(args, k)))]


def _torchrun(task: str) -> Any:
    return lambda args, device, precision, out_dir: torchrun_epoch(args, device, precision, out_dir, task)


CHECKS = [
    ("teacher_epoch", "fp16", teacher_epoch),
    ("teacher_epoch", "bf16", teacher_epoch),
    ("meal_alternating", "fp16", meal_epoch),
    ("kd_epoch", "bf16", kd_epoch),
    ("torchrun_teachers", "bf16", _torchrun("teacher")),
    ("torchrun_kd", "bf16", _torchrun("kd")),
    ("torchrun_meal", "fp16", _torchrun("meal")),
    ("decode_gpu", "bf16", decode_gpu_epoch),
]


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new or empty)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="CSV to append rows to (gpu_check.sh's table)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument(
        "--tiny", action="store_true", help="small model and images: a CPU smoke test of the script"
    )
    p.add_argument(
        "--teacher", default=None, help="timm arch of the teacher (default resnet50; tiny: resnet10t)"
    )
    p.add_argument("--student", default=None, help="timm arch of the MEAL student (default resnet18)")
    p.add_argument("--size", type=int, default=None, help="image size (default 224; tiny: 32)")
    p.add_argument("--batch", type=int, default=None, help="per-step batch (default 128; tiny: 4)")
    p.add_argument("--steps", type=int, default=None, help="steps per epoch (default 40; tiny: 2)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default 4; tiny: 0)")
    p.add_argument("--timeout", type=int, default=300, help="seconds for the torchrun child")
    p.add_argument("--only", nargs="*", help="run only these checks (names as in the table)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # torchrun child: write JSON here
    p.add_argument("--task", default="teacher", choices=sorted(TASKS), help=argparse.SUPPRESS)
    p.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if os.environ.get("GPU_CHECK_DRY_RUN") == "1":  # gpu_check.sh --dry-run: the CPU at toy sizes
        args.device, args.tiny = "cpu", True
    tiny = {"teacher": "resnet10t", "student": "resnet10t", "size": 32, "batch": 4, "steps": 2, "workers": 0}
    full = {
        "teacher": "resnet50",
        "student": "resnet18",
        "size": 224,
        "batch": 128,
        "steps": 40,
        "workers": 4,
    }
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker is None and args.out is None:
        p.error("--out is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    missing = ensure_pydantic()
    engine_name = f"imat.engine {args.device}"
    if args.worker is not None:  # the torchrun child: one check, result as JSON
        with tempfile.TemporaryDirectory() as tmp:
            row = TASKS[args.task](args, args.device, args.precision, Path(tmp))
        args.worker.write_text(json.dumps(row))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            missing = missing or "no CUDA device"
    rows = []
    for name, precision, fn in CHECKS:
        if args.only and name not in args.only:
            continue
        base = {"check": name, "engine": engine_name, "precision": precision, "batch": args.batch}
        if missing:
            rows.append({**base, "arch": args.teacher, "ok": False, "note": missing})
            continue
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="imat-gpu-check-") as tmp:
                row = fn(args, args.device, precision, Path(tmp))
        except Exception as exc:  # a failed check is a row saying why, the next one still runs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            row = {"arch": args.teacher, "ok": False, "note": f"{type(exc).__name__}: {first[:200]}"}
        row["note"] = f"{row.get('note', '')} ({time.perf_counter() - t0:.0f} s)".strip()
        ips = row.get("images_per_s")
        row["images_per_s"] = "" if ips is None or not math.isfinite(ips) else round(ips, 1)
        rows.append({**base, **row})
        print(
            f"{name} {precision}: {'ok' if row['ok'] else 'FAILED'} {row['images_per_s']} img/s; {row['note']}"
        )
    append_rows(args.out, rows)
    print(f"{len(rows)} row(s) appended to {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
