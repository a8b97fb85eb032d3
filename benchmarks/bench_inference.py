"""CPU inference speed of a trained student, side by side in one run: PyTorch eager fp32 and bf16,
onnxruntime fp32, int8 U8S8 (what ``imat export --precision int8`` writes for the CPU) and int8 S8S8
(the symmetric TensorRT form, run on the CPU provider for comparison), plus end-to-end ``imat predict``
from JPEG files, for each architecture (default ResNet-50 and ResNet-18 at 224 px).

The models are trained, not random: agreement between fp32 and int8 only means something on a network
whose logits came from training. By default each arch is trained here, from scratch with imat's own
``imat distill`` (method ``ce``) on the embedded MNIST kit (no download), its digits written as
320x320 JPEG files (photo-sized decoding for the end-to-end row); ``--ckpt ARCH=best.safetensors``
takes a real trained student instead, with ``--images`` (folder or manifest) as its validation images.

    python benchmarks/bench_inference.py                      # full size: see docs/BENCHMARKS.md
    python benchmarks/bench_inference.py --archs resnet18 --size 64 --train-images 60 --train-epochs 1 \\
        --val-images 32 --batch 8 --batches 1 --out /tmp/inference.csv    # a seconds-long smoke run

Writes ``benchmarks/results/inference_cpu.csv`` (``--out``): arch, engine, batch, images_per_s,
vs_eager_fp32, top1_agreement, top3_agreement (with eager fp32 on the same validation images), and
prints it as a Markdown table with each model's top-1 accuracy."""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["arch", "engine", "batch", "images_per_s", "vs_eager_fp32", "top1_agreement", "top3_agreement"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def kit_images(work: Path, train: int, val: int, side: int = 320) -> tuple[Path, pd.DataFrame, list[str]]:
    """The embedded MNIST kit's digits as ``side`` px RGB JPEGs (tinted per class so the three channels
    differ) and a manifest frame (train/val rows, labels 0..9)."""
    import json

    from imat.kit import write_kit

    kit = write_kit("mnist5k", work / "kit", seed=0, limit=int((train + val) / 0.7) + 20)
    images = work / "jpeg"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in (("train", train), ("val", val)):
        for e in json.loads(Path(kit[split]).read_text())["images"][:n]:
            gray = cv2.imread(str(Path(kit["images"]) / e["id"]), cv2.IMREAD_GRAYSCALE)
            big = cv2.resize(gray, (side, side), interpolation=cv2.INTER_CUBIC).astype(np.float32)
            c = int(e["class"])
            tint = np.array([0.5 + 0.05 * c, 1.0 - 0.04 * c, 0.7 + 0.03 * (c % 3)], np.float32)
            bgr = np.clip(big[..., None] * tint[None, None, ::-1], 0, 255).astype(np.uint8)
            name = f"{split}_{Path(e['id']).stem}.jpg"
            cv2.imwrite(str(images / name), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
            rows.append(
                {
                    "image_id": name,
                    "split": split,
                    "path": name,
                    "label": c,
                    "source_label": str(c),
                    "url": "",
                }
            )
    return images, pd.DataFrame(rows), [str(c) for c in range(10)]


def train_student(work: Path, arch: str, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """``imat distill`` (plain CE) of ``arch`` on the kit JPEGs; returns (best.safetensors, the run's
    manifest, the images folder)."""
    import yaml

    from imat.app.cli import main as imat
    from imat.manifest import ClassMap, save_manifest

    images, df, labels = kit_images(work, args.train_images, args.val_images)
    run = work / f"run_{arch}"
    save_manifest(df, ClassMap.from_labels(labels), run / "data")
    cfg = {
        "run_dir": str(run),
        "data": {"images": str(images), "num_workers": 1},
        "distill": {
            "method": "ce",
            "student": {"arch": arch, "input_size": args.size, "mean": MEAN, "std": STD},
            "train": {
                "epochs": args.train_epochs,
                "batch_size": 32,
                "device": "cpu",
                "lr": 0.1,
                "warmup_epochs": 0.5,
                "aug": {"preset": "none"},
            },
        },
    }
    (work / f"{arch}.yaml").write_text(yaml.safe_dump(cfg))
    if imat(["distill", str(work / f"{arch}.yaml"), "--quiet"]) != 0:
        raise SystemExit(f"training {arch} failed")
    return run / "student" / "best.safetensors", run / "data" / "manifest.parquet", images


def timed(fn: Any, batches: list[np.ndarray]) -> float:
    """Images per second of ``fn`` over ``batches`` after one warm-up call."""
    fn(batches[0])
    start = time.perf_counter()
    for b in batches:
        fn(b)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def bench_arch(
    arch: str, ckpt: Path, source: Path, root: str | None, work: Path, args: argparse.Namespace
) -> list[dict]:
    """The rows of one arch: five engines on the same batches, then ``imat predict`` end to end."""
    from imat.app.cli import main as imat
    from imat.config.stages import ExportConfig
    from submit.export import export_model, known_labels, load_batches
    from submit.inputs import read_images
    from submit.model import load_checkpoint
    from submit.predict import read_predictions
    from submit.runtime import Runner, create_session
    from submit.verify import accuracy_change, agreement

    model, _, prep, classes = load_checkpoint(ckpt)
    rows = read_images(source, root, "val")
    if len(rows) > args.val_images:
        rows = rows.sample(n=args.val_images, random_state=0).sort_index().reset_index(drop=True)
    batches, kept = load_batches(rows, prep, batch_size=args.batch, workers=1)
    labels = known_labels(rows.iloc[kept].reset_index(drop=True), classes)
    timed_batches = (batches * (-(-args.batches // len(batches))))[: args.batches]
    full = [b for b in timed_batches if len(b) == args.batch] or timed_batches

    models: dict[str, Path] = {}
    for name, precision, target in (
        ("fp32", "fp32", "cpu"),
        ("u8s8", "int8", "cpu"),
        ("s8s8", "int8", "gpu"),
    ):
        models[name] = work / f"{arch}_{name}.onnx"
        cfg = ExportConfig(
            precision=precision,
            target=target,
            min_top3_agreement=0.0,
            max_accuracy_drop=100.0,  # measured and published, not gated
            float_fallback=False,
            calibration_images=args.calibration_images,
            verify_images=args.val_images,
        )
        export_model(ckpt, models[name], rows, rows, cfg=cfg, workers=1)

    def eager(b: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(b)).float().numpy()

    cl_model = load_checkpoint(ckpt)[0].to(memory_format=torch.channels_last)

    def bf16(b: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(b).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return cl_model(x).float().numpy()

    engines: dict[str, Any] = {
        "PyTorch eager fp32": eager,
        "PyTorch eager bf16 autocast, channels-last": bf16,
    }
    names = {"fp32": "onnxruntime fp32", "u8s8": "onnxruntime int8 U8S8", "s8s8": "onnxruntime int8 S8S8"}
    for key, path in models.items():
        session, active = create_session(path, "cpu", threads=args.threads, warn_target=False)
        engines[names[key]] = lambda b, r=Runner(session, active): r(b)[0]

    reference = np.concatenate([eager(b) for b in batches])
    out, base = [], None
    for engine, fn in engines.items():
        scores = np.concatenate([fn(b) for b in batches])
        agree = agreement(reference, scores, k=3)
        acc = accuracy_change(reference, scores, labels, k=3)
        speed = timed(fn, full)
        base = base or speed
        out.append(
            {
                "arch": arch,
                "engine": engine,
                "batch": args.batch,
                "images_per_s": round(speed, 2),
                "vs_eager_fp32": round(speed / base, 2),
                "top1_agreement": round(agree["top1_agreement"], 4),
                "top3_agreement": round(agree["top3_agreement"], 4),
                "_top1_accuracy": None if acc is None else acc["candidate_top1_accuracy"],
            }
        )

    # End to end: `imat predict` (the CLI, as a user runs it) from the JPEG files with the U8S8 model.
    e2e_dir = work / f"e2e_{arch}"
    e2e_dir.mkdir(exist_ok=True)
    files = [Path(p) for p in rows["path"].iloc[kept]]
    reps = -(-args.batches * args.batch // len(files))
    for r in range(reps):  # the timed set: as many files as the model-only rows timed, links to the val JPEGs
        for f in files:
            link = e2e_dir / f"{r}_{f.name}"
            if not link.exists():
                link.symlink_to(f.resolve())
    pred = work / f"pred_{arch}.parquet"
    cmd = ["predict", str(models["u8s8"]), str(e2e_dir), "--out", str(pred), "--provider", "cpu"]
    cmd += ["--batch-size", str(args.batch), "--no-progress", "--workers", str(args.workers)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    imat(cmd)  # warm-up: file cache, onnxruntime's first session
    start = time.perf_counter()
    if imat(cmd) != 0:
        raise SystemExit(f"imat predict failed on {arch}")
    speed = len(files) * reps / (time.perf_counter() - start)
    df, _ = read_predictions(pred)
    first = df[df["image_id"].str.startswith("0_")].copy()
    first["name"] = first["image_id"].str[2:]
    order = {f.name: i for i, f in enumerate(files)}
    ref_top = np.argsort(-reference, axis=1, kind="stable")[:, :3]
    got = {row.name: [classes.to_index(str(x)) for x in row.topk_labels] for row in first.itertuples()}
    same1 = np.mean([got[n][0] == ref_top[i, 0] for n, i in order.items()])
    same3 = np.mean([set(got[n]) == set(ref_top[i]) for n, i in order.items()])
    hits = [labels[i] >= 0 and got[n][0] == labels[i] for n, i in order.items()]
    out.append(
        {
            "arch": arch,
            "engine": "imat predict end-to-end (JPEG files, int8 U8S8)",
            "batch": args.batch,
            "images_per_s": round(speed, 2),
            "vs_eager_fp32": round(speed / base, 2),
            "top1_agreement": round(float(same1), 4),
            "top3_agreement": round(float(same3), 4),
            "_top1_accuracy": float(np.mean(hits)) if (labels >= 0).any() else None,
        }
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet50,resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per engine")
    parser.add_argument("--val-images", type=int, default=256, help="images for agreement and accuracy")
    parser.add_argument("--calibration-images", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=1200)
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--ckpt", action="append", default=[], metavar="ARCH=PATH", help="a trained student")
    parser.add_argument("--images", help="with --ckpt: its validation images (folder or manifest)")
    parser.add_argument("--images-root", help="root of the manifest's relative paths")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--workers", type=int, default=2, help="imat predict decoding workers")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "inference_cpu.csv")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    given = dict(item.split("=", 1) for item in args.ckpt)
    if given and not args.images:
        parser.error("--ckpt needs --images (the student's validation images)")

    from imat.io import write_csv

    work = Path(tempfile.mkdtemp(prefix="imat-bench-inference-"))
    rows: list[dict] = []
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        if arch in given:
            ckpt, source, root = Path(given[arch]), Path(args.images), args.images_root
        else:
            print(
                f"training {arch} on the MNIST kit ({args.train_images} images, {args.train_epochs} epochs)"
            )
            ckpt, source, images = train_student(work, arch, args)
            root = str(images)
        rows.extend(bench_arch(arch, ckpt, source, root, work, args))
    table = pd.DataFrame(rows)
    write_csv(args.out, table[COLUMNS])
    print(
        f"\n{args.size} px, batch {args.batch}, {args.batches} timed batches; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {platform.processor() or platform.machine()}; {args.out}\n"
    )
    print("| arch | engine | images/s | vs eager fp32 | top-1 agreement | top-3 agreement | top-1 accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        acc = "" if r["_top1_accuracy"] is None else f"{r['_top1_accuracy']:.3f}"
        print(
            f"| {r['arch']} | {r['engine']} | {r['images_per_s']:.1f} | {r['vs_eager_fp32']:.2f}x | "
            f"{r['top1_agreement']:.3f} | {r['top3_agreement']:.3f} | {acc} |"
        )


if __name__ == "__main__":
    main()
