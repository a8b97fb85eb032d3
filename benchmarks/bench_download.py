"""Downloader throughput against a local HTTP server: images/s for a few worker counts and resize settings.

The server runs in its own process (so it does not share the client's GIL) and serves generated
~500x375 JPEGs, about the size of a typical iMaterialist product photo. Nothing leaves the machine, so
this measures the client's own ceiling (HTTP handling, decode, RGB conversion, resize, JPEG encode,
atomic write), not a real network.

    .venv/bin/python benchmarks/bench_download.py [--images 300] [--workers 32 8]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imat.download import DownloadConfig, download, encode_image  # noqa: E402


def make_jpeg(seed: int, size=(500, 375)) -> bytes:
    """A photo-like JPEG: smooth colour gradients plus mild noise (compresses like a real photo)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            127 + 100 * np.sin(x / rng.uniform(20, 80) + rng.uniform(0, 6)),
            127 + 100 * np.cos(y / rng.uniform(20, 80) + rng.uniform(0, 6)),
            127 + 100 * np.sin((x + y) / rng.uniform(30, 90)),
        ],
        axis=-1,
    )
    arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def serve(images: list[bytes], port_q: mp.Queue, stop: mp.Event) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real image CDNs do

        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            body = images[int(self.path.rsplit("/", 1)[1].split(".")[0])]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    port_q.put(httpd.server_address[1])
    import threading

    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    stop.wait(600)
    httpd.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--workers", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--max-side", type=int, nargs="+", default=[0, 256], help="0: keep the size")
    args = ap.parse_args()

    images = [make_jpeg(i) for i in range(args.images)]
    mean_kb = sum(map(len, images)) / len(images) / 1024
    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=serve, args=(images, port_q, stop), daemon=True)
    proc.start()
    port = port_q.get(timeout=60)
    df = pd.DataFrame(
        {
            "image_id": [str(i) for i in range(len(images))],
            "path": [f"{i}.jpg" for i in range(len(images))],
            "url": [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(len(images))],
        }
    )
    print(
        f"{len(images)} JPEGs 500x375, mean {mean_kb:.0f} KiB; {os.cpu_count()} CPUs; "
        f"Python {platform.python_version()}; server in a separate process"
    )
    # CPU part alone (decode, convert, resize, encode) on one thread: the per-image floor.
    rows = []
    for side in args.max_side:
        cfg = DownloadConfig(max_side=side or None, progress=False)
        t0 = time.perf_counter()
        for data in images[:100]:
            encode_image(data, cfg)
        secs = time.perf_counter() - t0
        rows.append(
            (
                "decode+encode only, 1 thread",
                "-",
                side or "keep",
                min(100, len(images)) / secs,
                float("nan"),
                secs,
            )
        )
    try:
        for side in args.max_side:
            for workers in args.workers:
                out = Path(tempfile.mkdtemp(prefix="imat-bench-dl-"))
                try:
                    cfg = DownloadConfig(workers=workers, max_side=side or None, progress=False)
                    rep = download(df, out, cfg)
                    r = rep.rates()
                    assert rep.counts.get("ok") == len(images), rep.counts
                    rows.append(
                        ("download", workers, side or "keep", r["images_per_s"], r["mb_per_s"], r["seconds"])
                    )
                    # Resume: every file exists, nothing is requested.
                    t0 = time.perf_counter()
                    rep2 = download(df, out, cfg)
                    assert rep2.counts == {"skipped": len(images)}
                    dt = time.perf_counter() - t0
                    rows.append(("resume (all skipped)", workers, side or "keep", len(images) / dt, 0.0, dt))
                finally:
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        stop.set()
        proc.join(10)
    print(f"{'run':<30} {'workers':>7} {'max_side':>8} {'images/s':>9} {'MB/s':>6} {'seconds':>8}")
    for name, w, side, ips, mbs, secs in rows:
        mb = "-" if mbs != mbs else f"{mbs:.1f}"
        print(f"{name:<30} {w!s:>7} {side!s:>8} {ips:>9.1f} {mb:>6} {secs:>8.2f}")


if __name__ == "__main__":
    main()
