"""Data loader throughput: JPEG decode (cv2 vs PIL) and the full `heavy` preset through build_loader.

    .venv/bin/python benchmarks/bench_loader.py [--images 200] [--size 224] [--repeats 3] [--workers 0 1 2]

Generates synthetic photo-like JPEGs (smooth colour fields plus texture, ~500x375, quality 90) in a
temporary folder, then measures (a) decode only, images/s per decoder, and (b) decode + heavy
augmentation + collate through the real loader, images/s in total and per worker. Each figure is the
median of ``--repeats`` passes (the first loader pass, which starts the workers, is not timed)."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from imat.data import ImageDataset, build_loader, build_train_transform, decode_image


def make_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """Photo-like JPEGs: low-frequency colour fields (compress like real photos, unlike white noise)."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        w, h = (500, 375) if i % 4 else (375, 500)  # some portrait images too
        coarse = rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)
        img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        img += rng.integers(-12, 13, (h, w, 3), dtype=np.int16)  # sensor-like texture
        cv2.circle(
            img,
            (int(rng.integers(0, w)), int(rng.integers(0, h))),
            int(rng.integers(20, 120)),
            tuple(int(c) for c in rng.integers(0, 255, 3)),
            -1,
        )
        name = f"{i:04d}.jpg"
        cv2.imwrite(str(folder / name), np.clip(img, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
        names.append(name)
    return names


def bench_decode(paths: list[str], decoder: str, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for p in paths:
            decode_image(p, decoder)
        rates.append(len(paths) / (time.perf_counter() - t))
    return statistics.median(rates)


def bench_loader(df: pd.DataFrame, root: Path, decoder: str, workers: int, size: int, repeats: int) -> float:
    ds = ImageDataset(df, root, build_train_transform("heavy", size), decoder)
    loader = build_loader(ds, batch_size=32, shuffle=True, num_workers=workers, seed=0)
    for _ in loader:  # warm-up pass: starts (persistent) workers, fills caches
        pass
    rates = []
    for _ in range(repeats):
        t, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["label"])
        rates.append(n / (time.perf_counter() - t))
    del loader
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)  # the main process only collates; keep it off the workers' cores
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, opencv {cv2.__version__}, "
        f"{os.cpu_count()} CPU cores, {args.images} JPEGs ~500x375"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = make_images(root, args.images)
        paths = [str(root / n) for n in names]
        df = pd.DataFrame({"path": names, "label": 0})
        print("\n(a) decode only, images/s (median of repeats)")
        print(f"{'decoder':<8} {'img/s':>8}")
        for decoder in ("cv2", "pil"):
            print(f"{decoder:<8} {bench_decode(paths, decoder, args.repeats):>8.1f}", flush=True)
        print(f"\n(b) decode + heavy preset @ {args.size}px + collate through build_loader (batch 32)")
        print(f"{'decoder':<8} {'workers':>7} {'img/s':>8} {'img/s/worker':>13}")
        for decoder in ("cv2", "pil"):
            for w in args.workers:
                rate = bench_loader(df, root, decoder, w, args.size, args.repeats)
                per = rate / max(w, 1)
                print(f"{decoder:<8} {w:>7} {rate:>8.1f} {per:>13.1f}", flush=True)


if __name__ == "__main__":
    main()
