"""Input pipeline per CPU core: decode + the `light`, `medium` and `heavy` presets at 224 px, cv2 and PIL.

    .venv/bin/python benchmarks/bench_loader.py                       # ~5 minutes on 2 quiet cores
    .venv/bin/python benchmarks/bench_loader.py --seconds 0.3 --repeats 1 --out /tmp/loader.csv   # smoke
    .venv/bin/python benchmarks/bench_loader.py --from-csv benchmarks/results/loader_cpu.csv --gpu-rate 3000

Photographs: the real photos the installed dependencies ship (scikit-learn's ``china.jpg`` and
``flower.jpg``, matplotlib's ``grace_hopper.jpg``), cut into varied crops (70-100% of the area, some
mirrored, some portrait) and re-encoded as JPEG quality 90 at two sizes: ``500x375`` (ImageNet's typical
photo) and ``1600x1200`` (a phone photo; upscaled from ~600 px, so smoother and a little faster to decode
than a real 2-megapixel photo). Nothing is downloaded.

Each cell is what one loader worker does: the real ``ImageDataset`` + preset + collate through
``build_loader`` with no worker processes, one torch thread and one OpenCV thread, so its images/s is
the rate of one CPU core. ``draft`` is ``data.draft`` (big JPEGs decoded at 1/2, 1/4 or 1/8 scale in the
DCT, keeping the detail the crops use); ``decode`` rows decode only. A cell is timed over whole passes
until ``--seconds`` have gone by, the median of ``--repeats`` (after one warm-up pass). Rows with
``workers`` > 0 run the same through worker processes (what the node does; their per-core figure
divides by the workers). The CSV is rewritten atomically.

The reading printed at the end (and recomputed from a CSV with ``--from-csv``): CPU cores a GPU needs
to be fed, = GPU images/s / images/s per core, for each preset and photo size with the default
settings (cv2, draft on). ``--gpu-rate`` defaults to 2,470 img/s: ResNet-50 v1.5 training on one A100
80GB in mixed precision, NVIDIA DeepLearningExamples (PyTorch/Classification/ConvNets/resnet50v1.5,
"Training performance: NVIDIA DGX A100"), 1 GPU; use the ``teacher_epoch`` rate of
``benchmarks/gpu_check.sh`` for your own GPU and model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from cpu_info import cpu_model  # noqa: E402  (run as a script or with benchmarks/ on the path)

from imat.data import ImageDataset, build_loader, build_train_transform, decode_image, decode_side  # noqa: E402
from imat.io import write_csv  # noqa: E402

SIZES: dict[str, tuple[int, int]] = {"500x375": (500, 375), "1600x1200": (1600, 1200)}
PRESETS = ("light", "medium", "heavy")
DEFAULT_GPU_RATE = 2470.0
GPU_RATE_SOURCE = "ResNet-50 v1.5 AMP training, 1x A100 80GB (NVIDIA DeepLearningExamples)"
OUT = REPO / "benchmarks" / "results" / "loader_cpu.csv"


def source_photos() -> list[Path]:
    """The photographs shipped inside installed packages (scikit-learn, matplotlib)."""
    found = []
    try:
        import sklearn

        found += sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
    except ImportError:
        pass
    try:
        import matplotlib

        found += [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    except ImportError:
        pass
    found = [p for p in found if p.is_file()]
    if not found:
        sys.exit("bench_loader: no photographs found (needs scikit-learn or matplotlib installed)")
    return found


def make_photos(folder: Path, sources: list[Path], per_size: int, seed: int = 0) -> dict[str, list[str]]:
    """``per_size`` JPEGs (q90) per size class: varied crops of the source photos, some mirrored/portrait."""
    rng = np.random.default_rng(seed)
    photos = [decode_image(p) for p in sources]
    out: dict[str, list[str]] = {}
    for name, (w, h) in SIZES.items():
        files = []
        for i in range(per_size):
            img = photos[i % len(photos)]
            ph, pw = img.shape[:2]
            portrait = i % 4 == 3
            aspect = (h / w) if not portrait else (w / h)  # height / width of the crop
            area = rng.uniform(0.7, 1.0) * ph * pw
            cw = int(min(pw, np.sqrt(area / aspect)))
            ch = int(min(ph, cw * aspect))
            y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
            crop = img[y0 : y0 + ch, x0 : x0 + cw]
            if i % 2:
                crop = crop[:, ::-1]
            size = (h, w) if portrait else (w, h)
            crop = cv2.resize(np.ascontiguousarray(crop), size, interpolation=cv2.INTER_CUBIC)
            path = folder / f"{name}_{i:03d}.jpg"
            cv2.imwrite(str(path), crop[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            files.append(str(path))
        out[name] = files
    return out


def _timed(run_pass, seconds: float, repeats: int) -> float:
    """Median images/s over ``repeats`` timings, each of whole passes until ``seconds`` have gone by."""
    run_pass()  # warm-up: caches, lazy imports, worker start
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            n += run_pass()
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        rates.append(n / elapsed)
    return statistics.median(rates)


def bench_cell(
    paths: list[str],
    decoder: str,
    pipeline: str,
    draft: bool,
    workers: int,
    size: int,
    args: argparse.Namespace,
) -> float:
    if pipeline == "decode":
        side = decode_side(None, size) if draft else None

        def run_pass() -> int:
            for p in paths:
                decode_image(p, decoder, min_side=side)
            return len(paths)

        return _timed(run_pass, args.seconds, args.repeats)
    df = pd.DataFrame({"path": paths, "label": 0})
    side = decode_side(pipeline, size) if draft else None
    ds = ImageDataset(df, None, build_train_transform(pipeline, size), decoder, min_side=side)
    loader = build_loader(ds, batch_size=32, shuffle=True, num_workers=workers, seed=0)

    def run_loader() -> int:
        return sum(len(b["label"]) for b in loader)

    return _timed(run_loader, args.seconds, args.repeats)


def reading(df: pd.DataFrame, gpu_rate: float, gpus: int = 8) -> pd.DataFrame:
    """CPU cores per GPU (and per node of ``gpus``) to feed ``gpu_rate`` img/s per GPU, from the
    one-core rows at the default settings (cv2, draft on)."""
    one = df[(df["workers"] == 0) & (df["decoder"] == "cv2") & (df["draft"].astype(str) == "True")]
    one = one[one["pipeline"].isin(PRESETS)]
    table = one.pivot_table(
        index="pipeline", columns="photo", values="images_per_s_per_core", aggfunc="first"
    )
    table = table.reindex([p for p in PRESETS if p in table.index])
    cores = gpu_rate / table
    lines = cores.copy()
    for col in cores.columns:
        lines[col] = [f"{c:.1f} ({c * gpus:.0f} per {gpus}-GPU node)" for c in cores[col]]
    return lines


def print_reading(df: pd.DataFrame, gpu_rate: float, source: str) -> None:
    print(f"\nCPU cores needed per GPU at {gpu_rate:,.0f} img/s per GPU ({source}); cv2, draft on:")
    print(reading(df, gpu_rate).to_string())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help="CSV to write (default %(default)s)")
    ap.add_argument("--size", type=int, default=224, help="network input size")
    ap.add_argument("--photos", type=int, default=24, help="JPEGs per photo size")
    ap.add_argument("--seconds", type=float, default=1.5, help="timed seconds per repeat of a cell")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decoders", nargs="+", default=["cv2", "pil"], choices=["cv2", "pil"])
    ap.add_argument("--photo-sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument(
        "--workers", type=int, nargs="*", default=[2], help="also time cv2 light/heavy through N workers"
    )
    ap.add_argument("--gpu-rate", type=float, default=DEFAULT_GPU_RATE, help="GPU images/s for the reading")
    ap.add_argument("--gpu-rate-source", default=None, help="where --gpu-rate comes from (printed)")
    ap.add_argument("--from-csv", type=Path, help="only print the reading from this CSV")
    args = ap.parse_args(argv)
    source = args.gpu_rate_source or (GPU_RATE_SOURCE if args.gpu_rate == DEFAULT_GPU_RATE else "--gpu-rate")
    if args.from_csv is not None:
        print_reading(pd.read_csv(args.from_csv), args.gpu_rate, source)
        return 0
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # as in a loader worker
    command = "python benchmarks/bench_loader.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "machine": cpu_model(),
        "cores": os.cpu_count(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "opencv": cv2.__version__,
        "torch": torch.__version__,
        "command": command.strip(),
    }
    print(f"{meta['machine']}, {meta['cores']} cores, opencv {meta['opencv']}, torch {meta['torch']}")
    cells = []
    for photo in args.photo_sizes:
        for decoder in args.decoders:
            cells.append((photo, decoder, "decode", False, 0))
            for preset in PRESETS:
                cells += [(photo, decoder, preset, True, 0), (photo, decoder, preset, False, 0)]
    for w in args.workers:
        if w > 0:
            cells += [(args.photo_sizes[0], "cv2", p, True, w) for p in ("light", "heavy")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = make_photos(Path(tmp), source_photos(), args.photos)
        print(
            f"{'photo':<10} {'decoder':<7} {'pipeline':<8} {'draft':<5} {'workers':>7} {'img/s':>8} {'per core':>8}"
        )
        for photo, decoder, pipeline, draft, workers in cells:
            rate = bench_cell(files[photo], decoder, pipeline, draft, workers, args.size, args)
            per_core = rate / max(workers, 1)
            rows.append(
                {
                    "photo": photo,
                    "decoder": decoder,
                    "pipeline": pipeline,
                    "draft": draft,
                    "workers": workers,
                    "size": args.size,
                    "images_per_s": round(rate, 1),
                    "images_per_s_per_core": round(per_core, 1),
                    "ms_per_image": round(1000.0 / per_core, 2),
                    **meta,
                }
            )
            print(
                f"{photo:<10} {decoder:<7} {pipeline:<8} {str(draft):<5} {workers:>7} {rate:>8.1f} {per_core:>8.1f}",
                flush=True,
            )
    df = pd.DataFrame(rows)
    write_csv(args.out, df)
    print(f"wrote {args.out}")
    print_reading(df, args.gpu_rate, source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
