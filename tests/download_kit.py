"""A local HTTP server for the downloader tests: good images in every mode, dead links, slow, truncated,
flaky and oversize responses, each path's requests counted; and the tests' small helpers."""

from __future__ import annotations

import collections
import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
from PIL import Image

from imat.download import DownloadConfig


def img_bytes(mode: str, size=(64, 48), fmt="PNG", seed=0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode in ("RGB", "CMYK"):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        im = im.convert(mode)
    elif mode == "RGBA":
        arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        arr[:, : w // 2, 3] = 0  # left half fully transparent
        im = Image.fromarray(arr, "RGBA")
    elif mode == "L":
        im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    elif mode == "P":
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").quantize(16)
    elif mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        raise ValueError(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


GOOD_JPEG = img_bytes("RGB", fmt="JPEG", seed=1)
GOOD_PNG = img_bytes("RGB", seed=2)
RGBA_PNG = img_bytes("RGBA", seed=3)
GRAY_PNG = img_bytes("L", seed=4)
PALETTE_GIF = img_bytes("P", fmt="GIF", seed=5)
CMYK_JPEG = img_bytes("CMYK", fmt="JPEG", seed=6)
TINY_PNG = img_bytes("RGB", size=(1, 1), seed=7)
NOT_AVAILABLE = img_bytes("RGB", size=(120, 90), fmt="JPEG", seed=8)  # the "image not available" picture
BIG_PNG = img_bytes("RGB", size=(300, 300), seed=9)  # ~270 kB of noise, above the test's max_bytes
FLAKY_PNG = img_bytes("RGB", seed=10)
LOCAL_PNG = img_bytes("RGB", seed=11)
MAX_BYTES = 100_000
assert len(BIG_PNG) > MAX_BYTES > len(GOOD_PNG)


class Server:
    """A ThreadingHTTPServer on 127.0.0.1:0 in a daemon thread that counts requests per path."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.flaky_left = {"/flaky503": 1}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", length: int | None = None, ctype="image/png"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - http.server's name
                path = self.path.split("?")[0]
                with server.lock:
                    server.counts[path] += 1
                static = {
                    "/good.jpg": GOOD_JPEG,
                    "/good.png": GOOD_PNG,
                    "/rgba.png": RGBA_PNG,
                    "/gray.png": GRAY_PNG,
                    "/palette.gif": PALETTE_GIF,
                    "/cmyk.jpg": CMYK_JPEG,
                    "/tiny.png": TINY_PNG,
                    "/big.png": BIG_PNG,
                    "/cut.jpg": GOOD_JPEG[: len(GOOD_JPEG) // 2],  # honest length, broken image
                }
                if path in static:
                    body = static[path]
                    return self._send(200, body, len(body))
                if path.startswith("/na/"):
                    return self._send(200, NOT_AVAILABLE, len(NOT_AVAILABLE), "image/jpeg")
                if path.startswith("/img/"):  # distinct images by number, for the resume test
                    body = img_bytes("RGB", seed=100 + int(path.rsplit("/", 1)[1]))
                    return self._send(200, body, len(body))
                if path == "/big-nolength.png":  # no Content-Length: the cap must stop the stream
                    return self._send(200, BIG_PNG, None)
                if path == "/truncated.png":  # promises more than it sends, then hangs up
                    return self._send(200, GOOD_PNG[:200], len(GOOD_PNG))
                if path == "/slow.png":
                    time.sleep(1.0)
                    return self._send(200, GOOD_PNG, len(GOOD_PNG))
                if path == "/always500":
                    return self._send(500, b"oops", 4, "text/plain")
                if path == "/flaky503":
                    with server.lock:
                        left = server.flaky_left[path]
                        server.flaky_left[path] = left - 1
                    if left > 0:
                        return self._send(503, b"busy", 4, "text/plain")
                    return self._send(200, FLAKY_PNG, len(FLAKY_PNG))
                if path == "/forbidden":
                    return self._send(403, b"no", 2, "text/plain")
                return self._send(404, b"not found", 9, "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        # Bounded: even if a test forgets to stop it, the server shuts itself down.
        self.timer = threading.Timer(90.0, self.httpd.shutdown)
        self.timer.daemon = True
        self.timer.start()

    def url(self, path: str) -> str:
        return self.base + path

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def stop(self) -> None:
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@contextlib.contextmanager
def serving() -> Iterator[Server]:
    srv = Server()
    try:
        yield srv
    finally:
        srv.stop()


def closed_port() -> int:
    """A local port nothing listens on (bound, then released): a refused connection."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fast_cfg(**kw) -> DownloadConfig:
    """Short timeouts, one quick retry and the test's size cap, so dead and slow links fail in well under a second."""
    base = dict(
        workers=8,
        connect_timeout=1.0,
        read_timeout=0.3,
        retries=1,
        backoff=0.01,
        max_bytes=MAX_BYTES,
        progress=False,
    )
    base.update(kw)
    return DownloadConfig(**base)


def frame(rows: list[tuple[str, str]]) -> pd.DataFrame:
    """A download table from (image_id, url) pairs."""
    return pd.DataFrame(
        {"image_id": [r[0] for r in rows], "path": [f"{r[0]}.jpg" for r in rows], "url": [r[1] for r in rows]}
    )


def by_id(report) -> dict[str, dict]:
    """This run's status rows keyed by image_id."""
    return {r["image_id"]: r for r in report.run.to_dict("records")}
