"""Inference speed: PyTorch eager fp32 / bf16 autocast vs onnxruntime fp32 / int8, plus end-to-end
``imat predict`` from JPEG files, all in one run on this machine's CPU.

The student is a timm ResNet (default resnet18, 224 px). No weights can be downloaded here, so the
backbone is randomly initialised and its classifier is fitted for a few steps on the generated
images (a linear probe): logits are then separated enough for top-1/top-3 agreement to mean
something, though 3rd-vs-4th places stay closer than in a trained network.

    .venv/bin/python benchmarks/bench_inference.py [--arch resnet18] [--size 224] [--images 64]
    python benchmarks/bench_inference.py --providers cpu,cuda,tensorrt   # on a GPU machine

With GPU providers the fp16 model is exported too and every (precision, provider) pair is timed in
the same table, beside PyTorch eager on the GPU (fp32 and fp16 autocast) when CUDA is available.

Prints a Markdown table (images/s and top-1/top-3 agreement with eager fp32 on the same images)."""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch


def make_images(folder: Path, count: int, classes: int, seed: int = 0) -> list[int]:
    """Photo-sized (320x240) JPEGs: smooth colour fields per class with noise and a random shape."""
    rng = np.random.default_rng(seed)
    labels = []
    base = rng.integers(0, 255, (classes, 3))
    for i in range(count):
        c = i % classes
        yy, xx = np.mgrid[0:240, 0:320]
        img = np.zeros((240, 320, 3), np.float32)
        for ch in range(3):
            img[..., ch] = base[c, ch] * (0.6 + 0.4 * np.sin(xx / (20 + 7 * c) + yy / (30 + 3 * ch)))
        img += rng.normal(0, 20, img.shape)
        cx, cy = rng.integers(40, 280), rng.integers(40, 200)
        cv2.circle(
            img,
            (int(cx), int(cy)),
            int(rng.integers(10, 40)),
            tuple(float(v) for v in base[(c + 1) % classes]),
            -1,
        )
        cv2.imwrite(
            str(folder / f"{i:05d}.jpg"),
            np.clip(img, 0, 255).astype(np.uint8),
            [cv2.IMWRITE_JPEG_QUALITY, 90],
        )
        labels.append(c)
    return labels


def timed(fn, batches: list[np.ndarray], repeats: int) -> float:
    """Images per second of ``fn`` over ``batches`` (one warm-up pass, then ``repeats`` timed passes)."""
    fn(batches[0])
    n = 0
    start = time.perf_counter()
    for _ in range(repeats):
        for b in batches:
            fn(b)
            n += len(b)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch1-images", type=int, default=16, help="images timed one at a time")
    parser.add_argument(
        "--providers", default="cpu", help="comma list of onnxruntime providers: cpu, cuda, tensorrt"
    )
    args = parser.parse_args()
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    gpu = any(p != "cpu" for p in providers)

    import timm

    from imat.config.stages import ExportConfig
    from imat.data import build_eval_transform, decode_image
    from imat.manifest import ClassMap
    from imat.weights import save_weights
    from submit.export import export_model
    from submit.inputs import read_images
    from submit.predict import predict
    from submit.runtime import Runner, create_session
    from submit.verify import agreement

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="imat-bench-"))
    (work / "images").mkdir()
    labels = make_images(work / "images", args.images, args.classes)
    cfg = timm.data.resolve_data_config({}, model=timm.create_model(args.arch, pretrained=False))
    mean, std, crop = tuple(cfg["mean"]), tuple(cfg["std"]), 0.875
    tf = build_eval_transform(args.size, mean, std, crop)
    x = torch.stack([tf(image=decode_image(p))["image"] for p in sorted((work / "images").glob("*.jpg"))])

    model = timm.create_model(args.arch, num_classes=args.classes, pretrained=False).eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    head = model.get_classifier()
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    y = torch.tensor(labels)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    classes = ClassMap.from_labels(range(args.classes))
    meta = {
        "arch": args.arch,
        "num_classes": args.classes,
        "input_size": args.size,
        "mean": list(mean),
        "std": list(std),
        "crop_pct": crop,
        "model_kwargs": {},
        "classes": classes.to_dict(),
    }
    ckpt = save_weights(work / "best.safetensors", model.state_dict(), meta)
    rows = read_images(work / "images")
    onnx_paths = {}
    for precision in ("fp32", "int8", *(["fp16"] if gpu else [])):
        onnx_paths[precision] = work / f"student_{precision}.onnx"
        export_model(
            ckpt,
            onnx_paths[precision],
            rows,
            cfg=ExportConfig(precision=precision, min_top3_agreement=0.0, calibration_images=args.images),
        )

    xs = x.numpy()
    big = [xs[i : i + 32] for i in range(0, len(xs), 32)]
    small = [xs[i : i + 1] for i in range(min(args.batch1_images, len(xs)))]

    def eager(b: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(b)).float().numpy()

    def bf16(b: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(torch.from_numpy(b)).float().numpy()

    engines = {"PyTorch eager fp32": eager, "PyTorch eager bf16 autocast": bf16}
    if gpu and torch.cuda.is_available():
        cuda_model = timm.create_model(args.arch, num_classes=args.classes, pretrained=False).eval().cuda()
        cuda_model.load_state_dict(model.state_dict())

        def cuda_eager(b: np.ndarray, half: bool = False) -> np.ndarray:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=half):
                return cuda_model(torch.from_numpy(b).cuda()).float().cpu().numpy()

        engines["PyTorch eager fp32 (cuda)"] = cuda_eager
        engines["PyTorch eager fp16 autocast (cuda)"] = lambda b: cuda_eager(b, half=True)
    for provider in providers:
        for precision, path in onnx_paths.items():
            if precision == "fp16" and provider == "cpu":
                continue  # fp16 is for GPUs; onnxruntime's CPU kernels upcast it
            try:
                session, active = create_session(path, provider)
            except Exception as exc:  # a provider that cannot take this model: say so in the table
                print(f"onnxruntime {precision} on {provider}: {str(exc).splitlines()[0][:200]}")
                continue
            engines[f"onnxruntime {precision} ({active})"] = lambda b, r=Runner(session, active): r(b)[0]

    reference = np.concatenate([eager(b) for b in big])
    results = []
    for name, fn in engines.items():
        scores = np.concatenate([fn(b) for b in big])
        agree = agreement(reference, scores, k=3)
        results.append(
            (
                name,
                timed(fn, small, args.repeats),
                timed(fn, big, args.repeats),
                agree["top1_agreement"],
                agree["top3_agreement"],
            )
        )

    e2e = []
    for provider in providers:
        for precision, path in onnx_paths.items():
            if precision == "fp16" and provider == "cpu":
                continue
            kwargs = {"batch_size": 32, "workers": 1, "provider": provider, "progress": False}
            try:
                predict(path, work / "images", None, **kwargs)  # warm caches (and build TensorRT engines)
            except Exception as exc:
                print(f"imat predict {precision} on {provider}: {str(exc).splitlines()[0][:200]}")
                continue
            start = time.perf_counter()
            predict(path, work / "images", work / f"pred_{precision}_{provider}.parquet", **kwargs)
            e2e.append((f"{precision}, {provider}", args.images / (time.perf_counter() - start)))

    print(
        f"\n{args.arch} at {args.size} px, {args.classes} classes, {args.images} images; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {platform.processor() or platform.machine()}\n"
    )
    print("| engine | batch 1 images/s | batch 32 images/s | top-1 agreement | top-3 agreement |")
    print("|---|---|---|---|---|")
    for name, b1, b32, t1, t3 in results:
        print(f"| {name} | {b1:.1f} | {b32:.1f} | {t1:.3f} | {t3:.3f} |")
    print("\n| end-to-end `imat predict` (JPEG decode + resize/crop in 1 worker, batch 32) | images/s |")
    print("|---|---|")
    for what, ips in e2e:
        print(f"| onnxruntime {what} | {ips:.1f} |")


if __name__ == "__main__":
    main()
