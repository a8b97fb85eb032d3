"""GPU acceptance of imat's inference paths on one NVIDIA GPU; ``benchmarks/gpu_check.sh`` runs it.

A ResNet-50 is trained on the GPU for a minute on generated images (no data set or download on that
machine: class-specific colour/frequency patterns with noise and random blobs, so logits come from
training, not random weights), exported with imat's own code (``submit.export.export_fp32``, legacy
exporter; ``submit.quantize``: fp16, and int8 in its TensorRT form, symmetric S8S8), then run through
``submit.runtime`` (preload_dlls, TensorRT precision flags, engine cache, batch profile, IO binding) on
the CUDA and TensorRT providers. Every GPU result is compared with onnxruntime's CPU provider on the
fp32 model, on the same images: top-1/top-3 agreement, model-only images/s, and end-to-end images/s
from JPEG files (``imat predict`` itself when its dependencies, albumentations and OpenCV, are
installed; otherwise PIL decoding + torchvision's resize/crop in DataLoader workers, said in ``note``).

Each engine's ``note`` also gives its top-1/top-3 accuracy on the (labelled) generated images beside
the fp32 reference's, and for TensorRT whether it took the whole graph (a profiled run; a split
engine makes the row not ok).

One row per check, appended to ``--out`` as soon as it is measured (CSV; columns in ``COLUMNS``,
documented in gpu_check.sh), so a hard stop still leaves every finished row.
``--device cpu --providers cpu`` with tiny sizes runs every step on a CPU (the test does)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's submit/ and imat/, wherever this is run from

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
MEAN, STD, CROP = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875


def synth(n: int, classes: int, side: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` generated images (uint8 NCHW, ``side`` px) and labels. The class patterns come from a
    fixed seed (the same for every split); ``seed`` draws the labels, noise and blobs."""
    cls = torch.Generator().manual_seed(1234)
    base = (torch.rand(classes, 3, generator=cls) * 0.8 + 0.1).to(device)
    freq = (torch.rand(classes, 2, generator=cls) * 6 + 1).to(device)
    phase = (torch.rand(classes, generator=cls) * 6.28).to(device)
    blob = torch.rand(classes, 3, generator=cls).to(device)
    g = torch.Generator(device=device).manual_seed(seed)  # generated where it is used: no host work
    labels = torch.randint(0, classes, (n,), generator=g, device=device)
    axis = torch.linspace(0, 1, side, device=device)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    out = torch.empty(n, 3, side, side, dtype=torch.uint8, device=device)
    for start in range(0, n, 256):
        lab = labels[start : start + 256]
        m = len(lab)
        wave = torch.sin(
            6.28 * (freq[lab, 0, None, None] * xx + freq[lab, 1, None, None] * yy) + phase[lab, None, None]
        )
        img = base[lab, :, None, None] * (0.6 + 0.4 * wave[:, None])
        cx, cy, r = torch.rand(3, m, generator=g, device=device)
        dist = (xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2
        mask = (dist < (0.05 + 0.15 * r[:, None, None]) ** 2).float()[:, None]
        img = img * (1 - mask) + blob[lab, :, None, None] * mask
        img = img + 0.12 * torch.randn(img.shape, generator=g, device=device)
        out[start : start + m] = (img.clamp(0, 1) * 255).to(torch.uint8)
    return out, labels


def train(args: argparse.Namespace, device: str) -> torch.nn.Module:
    """``args.arch`` from scratch on generated images: SGD, cosine, bf16 autocast on a GPU."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.arch, num_classes=args.classes, pretrained=False).to(device)
    model = model.to(memory_format=torch.channels_last)
    steps = max(1, args.train_images // args.train_batch) * args.train_epochs
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=steps, pct_start=0.15)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    side = round(args.size / CROP)
    lo = (side - args.size) // 2
    model.train()
    for step in range(steps):
        x, y = synth(args.train_batch, args.classes, side, seed=10_000 + step, device=device)
        x = ((x[:, :, lo : lo + args.size, lo : lo + args.size].float() - mean) / std).contiguous(
            memory_format=torch.channels_last
        )
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    print(
        f"trained {args.arch}: {steps} steps of {args.train_batch}, last loss {loss.item():.3f}", flush=True
    )
    return model.eval().float().cpu().to(memory_format=torch.contiguous_format)


def write_jpegs(folder: Path, images: torch.Tensor) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(images.cpu().numpy()):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(path, quality=90)
        files.append(path)
    return files


def imat_predict_available() -> bool:
    """``imat predict`` needs albumentations, OpenCV, pydantic and pyarrow beside torch."""
    try:
        import albumentations  # noqa: F401
        import cv2  # noqa: F401
        import pyarrow  # noqa: F401
        import pydantic  # noqa: F401
    except ImportError:
        return False
    return True


class TorchvisionFiles(torch.utils.data.Dataset):
    """PIL decode + torchvision resize/centre-crop/normalise: the eval transform of imat.data
    (resize the short side to size/crop_pct, centre crop, normalise) where albumentations is absent."""

    def __init__(self, files: list[Path], size: int) -> None:
        from torchvision import transforms as T

        self.files = files
        self.tf = T.Compose(
            [
                T.Resize(round(size / CROP), interpolation=T.InterpolationMode.BILINEAR),
                T.CenterCrop(size),
                T.ToTensor(),
                T.Normalize(MEAN, STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.tf(im.convert("RGB"))


def preprocess(files: list[Path], size: int, use_imat: bool) -> np.ndarray:
    """The model inputs of ``files`` by the same pipeline the end-to-end rows use."""
    if use_imat:
        from imat.data import build_eval_transform, decode_image

        tf = build_eval_transform(size, MEAN, STD, CROP)
        return np.stack([tf(image=decode_image(f))["image"].numpy() for f in files]).astype(np.float32)
    ds = TorchvisionFiles(files, size)
    return np.stack([ds[i].numpy() for i in range(len(ds))]).astype(np.float32)


def end_to_end(
    model: Path, provider: str, files: list[Path], args: argparse.Namespace, use_imat: bool
) -> tuple[float, np.ndarray]:
    """(images/s, top-3 indices of the first ``len(files)`` rows) over ``args.e2e_repeats`` passes."""
    many = files * args.e2e_repeats
    if use_imat:
        from submit.predict import predict

        predict(
            model,
            model.parent / "val",
            None,
            provider=provider,
            batch_size=args.batch,
            workers=args.workers,
            progress=False,
        )
        links = model.parent / f"e2e_{args.e2e_repeats}"
        if not links.exists():
            links.mkdir()
            for i, f in enumerate(many):
                os.symlink(f, links / f"{i:06d}.jpg")
        start = time.perf_counter()
        frame = predict(
            model, links, None, provider=provider, batch_size=args.batch, workers=args.workers, progress=False
        )
        speed = len(many) / (time.perf_counter() - start)
        top = np.array([[int(v) for v in row] for row in frame["topk_labels"][: len(files)]])
        return speed, top
    from submit.runtime import Runner, create_session
    from submit.verify import topk_indices

    desc = json.loads(model.with_name(model.name + ".json").read_text())
    session, active = create_session(model, provider, description=desc, max_batch=args.batch)
    runner = Runner(session, active, fixed_batch=args.batch)
    loader = torch.utils.data.DataLoader(
        TorchvisionFiles(many, args.size), batch_size=args.batch, num_workers=args.workers, shuffle=False
    )
    next(iter(loader))  # start the workers before the clock
    tops = []
    start = time.perf_counter()
    for x in loader:
        tops.append(topk_indices(runner(x.numpy())[0], 3))
    speed = len(many) / (time.perf_counter() - start)
    return speed, np.concatenate(tops)[: len(files)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="CSV to append the rows to")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--train-images", type=int, default=16384)
    parser.add_argument("--train-epochs", type=int, default=4)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--val-images", type=int, default=512)
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per model-only row")
    parser.add_argument("--e2e-repeats", type=int, default=4, help="passes over the JPEG files end to end")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--providers", default="cuda,tensorrt")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where to train")
    parser.add_argument("--min-top3", type=float, default=0.99, help="agreement an ok row needs")
    parser.add_argument("--trt-fp32", action="store_true", help="also TensorRT on the fp32 model")
    parser.add_argument(
        "--budget-s", type=float, default=400, help="start no new provider check after this many seconds"
    )
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device (use --device cpu --providers cpu to dry-run)")

    from submit.export import ExportWrapper, export_fp32
    from submit.quantize import int8_scheme, to_fp16, to_int8
    from submit.runtime import Runner, create_session
    from submit.verify import agreement, topk_indices

    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="imat-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    written: list[dict[str, Any]] = []

    def row(
        check: str,
        engine: str,
        precision: str,
        speed: float | None,
        agree: dict | None,
        note: str,
        speedless_ok: bool = False,
    ) -> None:
        t3 = None if agree is None else agree["top3_agreement"]
        ok = (
            agree is not None
            and t3 >= args.min_top3
            and (speed is not None or speedless_ok)
            and not note.startswith("FAILED")
        )
        rows.append(
            {
                "check": check,
                "arch": args.arch,
                "engine": engine,
                "precision": precision,
                "batch": args.batch,
                "images_per_s": None if speed is None else round(speed, 1),
                "top1_agreement": None if agree is None else round(agree["top1_agreement"], 4),
                "top3_agreement": None if t3 is None else round(t3, 4),
                "ok": ok,
                "note": note,
            }
        )
        print(
            f"{check:10s} {engine:28s} {precision:5s} {rows[-1]['images_per_s']} img/s top-3 {t3} {note}",
            flush=True,
        )
        flush_rows()

    def flush_rows() -> None:
        """Every row on disk as soon as it exists: gpu_check.sh's hard stop still leaves the table."""
        new = rows[len(written) :]
        if not new:
            return
        args.out.parent.mkdir(parents=True, exist_ok=True)
        header = not args.out.exists() or args.out.stat().st_size == 0
        pd.DataFrame(new, columns=COLUMNS).to_csv(args.out, mode="a", header=header, index=False)
        written.extend(new)

    def accuracy_note(scores: np.ndarray) -> str:
        """Top-1/top-3 accuracy on the labelled images beside the fp32 reference's, in points."""
        top = topk_indices(scores, 3)
        acc1 = float(np.mean(top[:, 0] == val_labels)) * 100
        acc3 = float(np.mean((top == val_labels[:, None]).any(axis=1))) * 100
        return (
            f"top-1 acc {acc1:.2f}% ({acc1 - ref_acc[0]:+.2f} pt vs fp32), "
            f"top-3 acc {acc3:.2f}% ({acc3 - ref_acc[1]:+.2f} pt)"
        )

    model = train(args, args.device)
    side = round(args.size / CROP)
    val_u8, val_y = synth(args.val_images, args.classes, side, seed=1, device="cpu")
    val_labels = val_y.numpy()
    files = write_jpegs(work / "val", val_u8)
    use_imat = imat_predict_available()
    how = "imat predict" if use_imat else "PIL+torchvision decode (albumentations/OpenCV absent)"
    x = preprocess(files, args.size, use_imat)
    cal_u8, _ = synth(args.calibration_images, args.classes, side, seed=2, device="cpu")
    cal = preprocess(write_jpegs(work / "calibration", cal_u8), args.size, use_imat)
    batches = [x[i : i + args.batch] for i in range(0, len(x), args.batch)]
    timed = (batches * math.ceil(args.batches / len(batches)))[: args.batches]
    timed = [b for b in timed if len(b) == args.batch] or timed

    wrapper = ExportWrapper(model).eval()
    paths = {"fp32": work / "fp32.onnx", "fp16": work / "fp16.onnx", "int8": work / "int8.onnx"}
    export_fp32(wrapper, args.size, paths["fp32"], 17, "legacy")
    to_fp16(paths["fp32"], paths["fp16"])
    scheme = to_int8(
        paths["fp32"], paths["int8"], [cal[i : i + 32] for i in range(0, len(cal), 32)], work, "minmax", True,
        int8_scheme("gpu"),
    )  # fmt: skip
    labels = [str(c) for c in range(args.classes)]
    for precision, path in paths.items():
        desc = {
            "format": "imat-onnx/1",
            "arch": args.arch,
            "num_classes": args.classes,
            "input_size": args.size,
            "mean": list(MEAN),
            "std": list(STD),
            "crop_pct": CROP,
            "classes": {"source_labels": labels, "names": [], "label_type": "int"},
            "precision": precision,
            "target": "gpu",
            "int8": scheme.to_dict() if precision == "int8" else None,
            "outputs": ["logits"],
            "softmax_in_graph": False,
            "topk_in_graph": None,
            "input_name": "input",
        }
        path.with_name(path.name + ".json").write_text(json.dumps(desc))
    print(f"exported fp32/fp16/int8 ({scheme.name}) in {time.perf_counter() - started:.0f} s", flush=True)

    cpu_session, _ = create_session(paths["fp32"], "cpu")
    cpu = Runner(cpu_session, "cpu")
    reference = np.concatenate([cpu(b)[0] for b in batches])
    ref_top = topk_indices(reference, 3)
    ref_acc = (
        float(np.mean(ref_top[:, 0] == val_labels)) * 100,
        float(np.mean((ref_top == val_labels[:, None]).any(axis=1))) * 100,
    )
    with torch.inference_mode():
        eager = np.concatenate([model(torch.from_numpy(b)).numpy() for b in batches])
    row(
        "reference",
        "onnxruntime cpu",
        "fp32",
        None,
        agreement(eager, reference),
        f"CPU provider vs PyTorch eager fp32; top-1 acc {ref_acc[0]:.2f}%, top-3 acc {ref_acc[1]:.2f}%",
        speedless_ok=True,
    )

    if args.device == "cuda":
        gpu_model = model.cuda().to(memory_format=torch.channels_last)
        for precision, dtype in (("fp32", None), ("fp16", torch.float16)):

            def run(b: np.ndarray, dtype: Any = dtype) -> np.ndarray:
                xb = torch.from_numpy(b).cuda(non_blocking=True).contiguous(memory_format=torch.channels_last)
                with (
                    torch.inference_mode(),
                    torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None),
                ):
                    return gpu_model(xb).float().cpu().numpy()

            scores = np.concatenate([run(b) for b in batches])
            run(timed[0])
            torch.cuda.synchronize()
            start = time.perf_counter()
            for b in timed:
                run(b)
            speed = sum(len(b) for b in timed) / (time.perf_counter() - start)
            row(
                "model-only",
                "PyTorch eager cuda",
                precision,
                speed,
                agreement(reference, scores),
                f"baseline; {accuracy_note(scores)}",
            )

    for provider in [p.strip() for p in args.providers.split(",") if p.strip()]:
        for precision, path in paths.items():
            if (provider == "cpu" and precision == "fp16") or (
                provider == "tensorrt" and precision == "fp32" and not args.trt_fp32
            ):
                continue  # fp16 is not for the CPU; TensorRT fp32 costs an engine build nobody deploys
            if time.perf_counter() - started > args.budget_s:
                row("model-only", f"onnxruntime {provider}", precision, None, None, "SKIPPED: time budget")
                continue
            desc = json.loads(path.with_name(path.name + ".json").read_text())
            t0 = time.perf_counter()
            try:
                session, active = create_session(path, provider, description=desc, max_batch=args.batch)
                runner = Runner(session, active, fixed_batch=args.batch)
                fallback = getattr(session, "imat_fallback_nodes", None)
                runner(timed[0])  # builds (or loads) the TensorRT engine
                built = time.perf_counter() - t0
                t1 = time.perf_counter()
                runner(
                    timed[0][:37] if len(timed[0]) > 37 else timed[0][:1]
                )  # another batch size: same engine
                odd = time.perf_counter() - t1
                scores = np.concatenate([runner(b)[0] for b in batches])
                start = time.perf_counter()
                for b in timed:
                    runner(b)
                speed = sum(len(b) for b in timed) / (time.perf_counter() - start)
            except Exception as exc:  # a provider failure is a row, not the end of the check
                row(
                    "model-only",
                    f"onnxruntime {provider}",
                    precision,
                    None,
                    None,
                    f"FAILED: {str(exc).splitlines()[0][:200]}",
                )
                continue
            note = (
                f"first run {built:.1f} s (engine build or cache load), other batch size {odd * 1000:.0f} ms; "
                f"{accuracy_note(scores)}"
            )
            if active == "tensorrt":
                note += (
                    "; TensorRT took the whole graph"
                    if fallback == 0
                    else f"; TensorRT left {fallback} node(s) to other providers"
                    if fallback
                    else "; TensorRT placement unknown"
                )
            agree = agreement(reference, scores)
            if active == "tensorrt" and fallback:
                note = f"FAILED: split engine; {note}"  # not the fast path this check stands for
            row("model-only", f"onnxruntime {active}", precision, speed, agree, note)
            try:
                speed, top = end_to_end(path, provider, files, args, use_imat)
                agree = {
                    "top1_agreement": float(np.mean(top[:, 0] == topk_indices(reference, 3)[:, 0])),
                    "top3_agreement": float(
                        np.mean(
                            [set(a) == set(b) for a, b in zip(top, topk_indices(reference, 3), strict=True)]
                        )
                    ),
                }
                row(
                    "end-to-end",
                    f"onnxruntime {active}",
                    precision,
                    speed,
                    agree,
                    f"{how}, {args.workers} workers",
                )
            except Exception as exc:
                row(
                    "end-to-end",
                    f"onnxruntime {provider}",
                    precision,
                    None,
                    None,
                    f"FAILED: {str(exc).splitlines()[0][:200]}",
                )

    table = pd.DataFrame(rows, columns=COLUMNS)
    flush_rows()
    print(
        f"gpu_check: {len(rows)} rows ({int(table['ok'].sum())} ok) appended to {args.out} in {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
