"""Fetch a URL-only competition's images into one folder, safely, concurrently and resumably.

iMaterialist Furniture/Fashion 2018 and Product 2019 ship URLs, not images. Public solutions
fetched them with a thread or process pool, skipped files already on disk so a run could be
repeated, normalised every image to RGB JPEG on the fly and afterwards deleted the "image not
available" placeholders that dead servers answer with HTTP 200 (docs: competitions.md section 5).
This module does all of that in one pass:

* **Concurrency**: a ``ThreadPoolExecutor`` (default 32 workers; the work is network bound) sharing
  one ``requests.Session`` whose connection pool is sized to the workers so connections are reused
  instead of re-opened per image.
* **Robust HTTP**: connect/read timeouts, retries with exponential backoff and jitter on connection
  errors, timeouts, truncated bodies and 5xx/429 (``Retry-After`` honoured, capped); never on 4xx
  such as 404/403 (a dead link stays dead). Only ``http``, ``https`` and ``file`` URLs are fetched.
* **Bounded**: at most ``max_bytes`` are read per image (streamed, stopped early); a body shorter
  than its ``Content-Length`` or an image that does not decode fully is a failure, never a file.
* **Normalised**: decoded with PIL, EXIF orientation applied, converted to RGB (palette, alpha
  composited on white, CMYK, 16-bit grey), optionally shrunk so the longer side is <= ``max_side``
  (JPEG DCT-domain draft first, so big JPEGs are cheap to shrink), re-encoded as JPEG and written
  atomically through :mod:`imat.io`.
* **Placeholders**: see :class:`PlaceholderRegistry`.
* **Safe paths**: whatever ``image_id``/``path`` contain, the file lands directly inside the output
  folder (see :func:`safe_file_name` and :func:`safe_target`).
* **Resumable**: a target that exists is complete (writes are atomic), so it is skipped without a
  request. ``download_status.csv`` (written atomically, periodically and at the end) holds one row
  per image; a second run fetches only what is missing, i.e. retries the failures.

Entry point: :func:`download` (a DataFrame of ``image_id, path, url`` in, a :class:`DownloadReport`
out). The CLI wrapper is :mod:`imat.commands.download`.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import threading
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import requests
from PIL import Image, ImageOps
from requests.adapters import HTTPAdapter
from tqdm.auto import tqdm

from imat import __version__
from imat.errors import ImatError
from imat.io import write_bytes, write_csv

STATUS_FILE = "download_status.csv"
STATUS_COLUMNS = [
    "image_id",
    "path",
    "url",
    "status",
    "reason",
    "detail",
    "bytes",
    "download_bytes",
    "width",
    "height",
    "seconds",
    "sha1",
]
ALLOWED_SCHEMES = ("http", "https", "file")
# A browser-like agent: some image hosts answer 403 to library defaults (competitions.md section 5).
USER_AGENT = f"Mozilla/5.0 (X11; Linux x86_64) imat-downloader/{__version__}"
MAX_NAME_BYTES = 200  # well under the 255-byte limit of common file systems, room for a temp prefix
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._\-]")


@dataclass
class DownloadConfig:
    """Every knob of a download run (the CLI flags map one to one)."""

    workers: int = 32
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 3  # extra attempts after the first, for transient failures only
    backoff: float = 0.5  # first retry waits about this many seconds, doubling each time (+ jitter)
    backoff_max: float = 30.0
    max_bytes: int = 20 * 1024 * 1024
    max_side: int | None = None  # shrink so the longer side is <= this (None: keep the size)
    quality: int = 90
    min_side: int = 16  # a side below this marks a placeholder (1x1 pixels, spacer GIFs); 28 px digits pass
    placeholder_repeats: int = 3  # this many distinct URLs with identical bytes -> placeholder; 0: off
    max_pixels: int = 100_000_000  # decompression-bomb guard
    status_every: float = 30.0  # seconds between periodic status-table writes
    limit: int | None = None  # only the first N rows (trying a few)
    skip_failed: bool = False  # keep previous failures instead of retrying them
    progress: bool = True
    user_agent: str = USER_AGENT

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ImatError(f"workers must be >= 1, got {self.workers}")
        if self.retries < 0:
            raise ImatError(f"retries must be >= 0, got {self.retries}")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ImatError("timeouts must be > 0")
        if self.max_bytes < 1:
            raise ImatError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.max_side is not None and self.max_side < 1:
            raise ImatError(f"max_side must be >= 1, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ImatError(f"quality must be in 1..100, got {self.quality}")
        if self.limit is not None and self.limit < 0:
            raise ImatError(f"limit must be >= 0, got {self.limit}")


class FetchError(Exception):
    """A failed image: ``reason`` is a short category (grouped in the summary), ``detail`` the specifics."""

    def __init__(self, reason: str, detail: str = "", retryable: bool = False, retry_after: float = 0.0):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = " ".join(str(detail).split())[:300]
        self.retryable = retryable
        self.retry_after = retry_after


# ---------------------------------------------------------------------------------------------- paths


def safe_file_name(name: Any, image_id: Any = None) -> str:
    """A plain file name (no directory part) derived from ``name`` (or ``<image_id>.jpg`` if empty).

    Characters outside ``[A-Za-z0-9._-]`` (path separators of any OS, NUL and control characters,
    spaces, drive colons) become ``_`` and leading dots are removed, so ``../../evil``, ``/etc/x``,
    ``..\\\\x`` or ``a\\x00b`` can only ever name a file directly inside the output folder. A name that
    had to change, or is longer than ``MAX_NAME_BYTES``, gets a short hash of the original appended so
    two different unsafe names cannot collide with each other or with an honest one. Honest names
    (``123.jpg``, Product 2019's ``abc123.jpg``) pass through unchanged, so the manifest still finds them.
    """
    raw = "" if name is None or (isinstance(name, float) and name != name) else str(name)
    if raw == "":
        if image_id is None or str(image_id) == "":
            raise ValueError("no path and no image_id")
        raw = f"{image_id}.jpg"
    clean = _UNSAFE_CHARS.sub("_", raw).lstrip(".")
    if clean == raw and len(clean.encode()) <= MAX_NAME_BYTES:
        return clean
    digest = hashlib.sha1(raw.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    stem, dot, ext = clean.rpartition(".")
    if not dot or not stem or not (ext.isascii() and ext.isalnum() and len(ext) <= 5):
        stem, ext = clean, ""
    stem = stem[: MAX_NAME_BYTES - 20] or "_"
    return f"{stem}-{digest}.{ext}" if ext else f"{stem}-{digest}"


def safe_target(out_dir: Path, name: str) -> Path:
    """``out_dir / name`` after checking, with symlinks resolved, that it is directly inside ``out_dir``.

    :func:`safe_file_name` already removes separators; this is the second, independent check (it also
    catches a symlink planted in the folder that points elsewhere). Raises FetchError("unsafe path")."""
    root = out_dir.resolve()
    target = root / name
    if "/" in name or "\\" in name or "\x00" in name or name in ("", ".", ".."):
        raise FetchError("unsafe path", repr(name))
    resolved = target.resolve()
    if resolved.parent != root or not resolved.is_relative_to(root):
        raise FetchError("unsafe path", f"{name!r} resolves to {resolved}")
    return target


# ---------------------------------------------------------------------------------------------- fetch


def make_session(cfg: DownloadConfig) -> requests.Session:
    """One Session shared by all workers, its pool sized so every worker can hold a connection."""
    session = requests.Session()
    # Retries are ours (they also cover truncated bodies and 429 with Retry-After), not urllib3's.
    adapter = HTTPAdapter(pool_connections=cfg.workers, pool_maxsize=cfg.workers, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.8"})
    session.max_redirects = 5
    return session


def _connection_reason(exc: BaseException) -> str:
    text = str(exc).lower()
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if any(
        s in text for s in ("name or service not known", "nameresolution", "failed to resolve", "getaddrinfo")
    ):
        return "dns"
    if "refused" in text:
        return "connection refused"
    return "connection error"


def _retry_after(value: str | None, cap: float) -> float:
    try:
        return min(max(float(value), 0.0), cap) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP date: fall back to our own backoff


def _fetch_file(url: str, max_bytes: int) -> bytes:
    parsed = urllib.parse.urlsplit(url)
    if parsed.netloc not in ("", "localhost"):
        raise FetchError("unsupported scheme", f"file URL with host {parsed.netloc!r}")
    path = Path(urllib.request.url2pathname(parsed.path))
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise FetchError("not found", str(path)) from exc
    except OSError as exc:
        raise FetchError("file error", f"{path}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise FetchError("too large", f"more than {max_bytes} bytes")
    return data


def _fetch_http_once(session: requests.Session, url: str, cfg: DownloadConfig) -> bytes:
    try:
        resp = session.get(url, stream=True, timeout=(cfg.connect_timeout, cfg.read_timeout))
    except requests.exceptions.Timeout as exc:
        raise FetchError("timeout", str(exc), retryable=True) from exc
    except requests.exceptions.InvalidSchema as exc:  # e.g. a redirect to ftp:// or javascript:
        raise FetchError("unsupported scheme", str(exc)) from exc
    except requests.exceptions.TooManyRedirects as exc:
        raise FetchError("too many redirects", str(exc)) from exc
    except requests.exceptions.ConnectionError as exc:
        raise FetchError(_connection_reason(exc), str(exc), retryable=True) from exc
    except requests.exceptions.RequestException as exc:  # invalid URL and friends
        raise FetchError("bad url", str(exc)) from exc
    with resp:
        if resp.status_code != 200:
            transient = resp.status_code == 429 or resp.status_code >= 500
            wait = _retry_after(resp.headers.get("Retry-After"), cfg.backoff_max) if transient else 0.0
            raise FetchError(f"http {resp.status_code}", resp.reason or "", transient, wait)
        declared = resp.headers.get("Content-Length")
        declared_n = int(declared) if declared and declared.isdigit() else None
        if declared_n is not None and declared_n > cfg.max_bytes:
            raise FetchError("too large", f"Content-Length {declared_n} > {cfg.max_bytes}")
        chunks: list[bytes] = []
        total = 0
        try:
            for chunk in resp.iter_content(chunk_size=64 * 1024):
                total += len(chunk)
                if total > cfg.max_bytes:
                    raise FetchError("too large", f"more than {cfg.max_bytes} bytes")
                chunks.append(chunk)
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
            raise FetchError("truncated", str(exc), retryable=True) from exc
        except requests.exceptions.ConnectionError as exc:  # a read timeout mid-body lands here
            raise FetchError(_connection_reason(exc), str(exc), retryable=True) from exc
        encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
        if declared_n is not None and not encoded and total < declared_n:
            raise FetchError("truncated", f"{total} of {declared_n} bytes", retryable=True)
        return b"".join(chunks)


def fetch_bytes(
    session: requests.Session, url: Any, cfg: DownloadConfig, sleep: Callable[[float], None] = time.sleep
) -> bytes:
    """The body of ``url`` (http/https/file), retried with backoff on transient failures.

    Raises FetchError with a short ``reason`` when it cannot be had."""
    if url is None or (isinstance(url, float) and url != url) or str(url).strip() == "":
        raise FetchError("no url")
    url = str(url).strip()
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise FetchError("unsupported scheme", scheme or url[:40])
    if scheme == "file":
        return _fetch_file(url, cfg.max_bytes)
    attempt = 0
    while True:
        try:
            return _fetch_http_once(session, url, cfg)
        except FetchError as exc:
            if not exc.retryable or attempt >= cfg.retries:
                raise
            delay = min(cfg.backoff * 2**attempt, cfg.backoff_max) * (0.5 + random.random())
            sleep(max(delay, exc.retry_after))
            attempt += 1


# --------------------------------------------------------------------------------------------- decode


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Product photos with transparent backgrounds: white, as a shop page shows them, not black.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        top = float(arr.max()) or 1.0
        return Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype("uint8"), "L").convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def encode_image(data: bytes, cfg: DownloadConfig) -> tuple[bytes, int, int, int, int]:
    """Decode ``data``, normalise it to RGB, shrink to ``max_side`` and encode as JPEG.

    Returns ``(jpeg_bytes, width, height, source_width, source_height)``. Raises FetchError for an
    undecodable or truncated image, a decompression bomb, or a placeholder-sized one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            src_w, src_h = im.size
            if src_w * src_h > cfg.max_pixels:
                raise FetchError("too many pixels", f"{src_w}x{src_h}")
            if min(src_w, src_h) < cfg.min_side:
                raise FetchError("placeholder: tiny", f"{src_w}x{src_h}")
            if cfg.max_side and im.format == "JPEG" and max(src_w, src_h) > cfg.max_side:
                # DCT scaling: decode at 1/2, 1/4 or 1/8 while staying >= max_side (much less work).
                scale = cfg.max_side / max(src_w, src_h)
                im.draft("RGB", (max(1, int(src_w * scale)), max(1, int(src_h * scale))))
            im.load()  # decodes everything: a truncated image raises here
            im = ImageOps.exif_transpose(im) or im
            im = _to_rgb(im)
            if cfg.max_side and max(im.size) > cfg.max_side:
                im.thumbnail((cfg.max_side, cfg.max_side), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            im.save(out, format="JPEG", quality=cfg.quality)
    except FetchError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FetchError("too many pixels", str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise FetchError("not an image", "unidentified image data") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        text = str(exc)
        reason = "truncated" if "truncated" in text.lower() else "decode error"
        raise FetchError(reason, text) from exc
    return out.getvalue(), im.size[0], im.size[1], src_w, src_h


# ------------------------------------------------------------------------------------- placeholders


@dataclass
class _HashEntry:
    urls: set[str] = field(default_factory=set)
    written: dict[int, Path] = field(default_factory=dict)  # row index -> file written for it
    flagged: bool = False


class PlaceholderRegistry:
    """Detects the "image not available" picture that dead servers answer with HTTP 200.

    Such a picture is ordinary-sized, so the tiny-dimension check misses it; what gives it away is that
    the *same bytes* come back for many *different* URLs. We hash every fetched body (SHA-1 of the raw
    bytes). The first ``threshold - 1`` distinct URLs with a given hash are indistinguishable from a
    legitimately re-used photo and are written; when the ``threshold``-th distinct URL arrives, the hash
    is flagged: every file already written with it is deleted and its row becomes ``failed / placeholder:
    repeated``, and every later body with that hash fails the same way without being written. Repeats of
    the same URL (the same image listed twice) do not count. The flagged hashes and the ok rows' hashes
    are kept in the status table so a resumed run still knows them (a retried placeholder is not written
    again just because the counter restarted).

    Thread-safety: :meth:`claim` and :meth:`confirm` are called under one lock. A worker claims the hash
    before writing and confirms after; if the hash got flagged in between, confirm says so and the worker
    deletes its own file. So a file is always either in ``written`` (deleted by the flagger) or deleted
    by its writer - never left behind.

    Limits: identical bytes are what is detected; a placeholder re-encoded per request (a different
    JPEG each time) or one that differs by a timestamp is not. ``placeholder_repeats=0`` turns it off
    for data sets that legitimately reuse one photo at many URLs.
    """

    def __init__(self, threshold: int, lock: threading.RLock | None = None) -> None:
        self.threshold = threshold
        self._entries: dict[str, _HashEntry] = {}
        # Reentrant and shareable: the driver holds it around confirm + "mark ok", so an eviction can
        # never slip in between and leave a row saying ok for a deleted file.
        self._lock = lock or threading.RLock()

    def seed(
        self, sha1: str, url: str, flagged: bool = False, index: int | None = None, path: Path | None = None
    ) -> None:
        """Remember a hash from a previous run (``index``/``path``: a file of this run's rows)."""
        if not self.threshold or not sha1:
            return
        with self._lock:
            entry = self._entries.setdefault(sha1, _HashEntry())
            entry.urls.add(url)
            entry.flagged = entry.flagged or flagged
            if index is not None and path is not None and not entry.flagged:
                entry.written[index] = path

    def claim(self, sha1: str, url: str) -> tuple[bool, dict[int, Path]]:
        """Register ``url`` under ``sha1``. Returns ``(is_placeholder, victims)``: victims are the rows
        and files written earlier with this hash that must now be deleted and marked as placeholders."""
        if not self.threshold:
            return False, {}
        with self._lock:
            entry = self._entries.setdefault(sha1, _HashEntry())
            entry.urls.add(url)
            if entry.flagged:
                return True, {}
            if len(entry.urls) >= self.threshold:
                entry.flagged = True
                victims, entry.written = entry.written, {}
                return True, victims
            return False, {}

    def confirm(self, sha1: str, index: int, path: Path) -> bool:
        """After writing: True if the file may stay, False if the hash was flagged meanwhile."""
        if not self.threshold:
            return True
        with self._lock:
            entry = self._entries[sha1]
            if entry.flagged:
                return False
            entry.written[index] = path
            return True

    def flagged(self) -> set[str]:
        with self._lock:
            return {h for h, e in self._entries.items() if e.flagged}


# ------------------------------------------------------------------------------------------- driver


@dataclass
class DownloadReport:
    """What a run did: the full status table (all rows known in the folder), this run's rows, time."""

    status: pd.DataFrame  # every image ever recorded in the folder's status table
    run: pd.DataFrame  # only the rows of this run
    seconds: float
    out_dir: Path

    @property
    def counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.run["status"].value_counts().items()}

    def summary(self) -> pd.DataFrame:
        """Counts by status and by failure reason (one table, ``kind`` says which)."""
        run = self.run
        rows = [
            {"kind": "status", "name": s, "count": int((run["status"] == s).sum())}
            for s in ("ok", "skipped", "failed")
        ]
        failed = run[run["status"] == "failed"]
        for reason, n in failed["reason"].value_counts().sort_index().items():
            rows.append({"kind": "failed", "name": str(reason), "count": int(n)})
        return pd.DataFrame(rows, columns=["kind", "name", "count"])

    def rates(self) -> dict[str, float]:
        ok = self.run[self.run["status"] == "ok"]
        secs = max(self.seconds, 1e-9)
        down_mb = float(pd.to_numeric(ok["download_bytes"]).sum()) / 1e6
        return {
            "seconds": self.seconds,
            "fetched": float(len(ok)),
            "images_per_s": len(ok) / secs,
            "downloaded_mb": down_mb,
            "written_mb": float(pd.to_numeric(ok["bytes"]).sum()) / 1e6,
            "mb_per_s": down_mb / secs,
        }

    def format(self) -> str:
        """A small plain-text table for the terminal."""
        lines = [f"{'status':<10} {'reason':<24} {'count':>8}"]
        for row in self.summary().itertuples():
            if row.kind == "status":
                lines.append(f"{row.name:<10} {'':<24} {row.count:>8}")
            else:
                lines.append(f"{'':<10} {row.name:<24} {row.count:>8}")
        r = self.rates()
        lines.append(
            f"{len(self.run)} images in {r['seconds']:.1f} s: {r['images_per_s']:.1f} images/s fetched, "
            f"{r['downloaded_mb']:.1f} MB downloaded ({r['mb_per_s']:.1f} MB/s), {r['written_mb']:.1f} MB written"
        )
        lines.append(f"status table: {self.out_dir / STATUS_FILE}")
        return "\n".join(lines)


def read_status(out_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The folder's status table, or an empty one (an unreadable table is ignored: files on disk rule)."""
    path = Path(out_dir) / STATUS_FILE
    if not path.is_file():
        return pd.DataFrame(columns=STATUS_COLUMNS)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError):
        return pd.DataFrame(columns=STATUS_COLUMNS)
    for col in STATUS_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    return df[STATUS_COLUMNS]


def _blank(image_id: str, path: str, url: str) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "path": path,
        "url": url,
        "status": "failed",
        "reason": "",
        "detail": "",
        "bytes": 0,
        "download_bytes": 0,
        "width": 0,
        "height": 0,
        "seconds": 0.0,
        "sha1": "",
    }


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def _int(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


class _Run:
    """The state of one run: rows, the shared session, the placeholder registry, the status writer."""

    def __init__(self, out_dir: Path, cfg: DownloadConfig, previous: pd.DataFrame) -> None:
        self.out_dir = out_dir
        self.cfg = cfg
        self.records: dict[int, dict[str, Any]] = {}  # this run's rows, by 0-based row number
        # Rows of earlier runs for images not in this run (another split in the same folder, rows
        # beyond --limit): kept in the table, and evictable if their bytes turn out to be a placeholder.
        self.carried: dict[int, dict[str, Any]] = {}  # negative keys
        self.lock = threading.RLock()
        self.registry = PlaceholderRegistry(cfg.placeholder_repeats, self.lock)
        self.session = make_session(cfg)
        self.previous = previous

    def _fail(self, index: int, reason: str, detail: str = "") -> None:
        with self.lock:
            rec = self.records[index] if index >= 0 else self.carried[index]
            rec.update(status="failed", reason=reason, detail=detail, bytes=0, width=0, height=0)

    def work(self, index: int, target: Path) -> None:
        """Fetch, check, encode and write one image; the outcome goes into ``self.records[index]``."""
        rec = self.records[index]
        url = rec["url"]
        start = time.perf_counter()
        try:
            data = fetch_bytes(self.session, url, self.cfg)
            sha1 = hashlib.sha1(data).hexdigest()
            rec["download_bytes"], rec["sha1"] = len(data), sha1
            is_placeholder, victims = self.registry.claim(sha1, url)
            self._evict(victims)
            if is_placeholder:
                raise FetchError(
                    "placeholder: repeated", f"same bytes as {self.cfg.placeholder_repeats - 1}+ other URLs"
                )
            jpeg, w, h, _, _ = encode_image(data, self.cfg)
            write_bytes(target, jpeg)
            with self.lock:  # confirm + mark ok atomically (see PlaceholderRegistry)
                kept = self.registry.confirm(sha1, index, target)
                if kept:
                    rec.update(status="ok", reason="", detail="", bytes=len(jpeg), width=w, height=h)
            if not kept:
                target.unlink(missing_ok=True)
                raise FetchError("placeholder: repeated", "flagged while writing")
        except FetchError as exc:
            self._fail(index, exc.reason, exc.detail)
        except Exception as exc:  # noqa: BLE001 - one bad image must never stop a 200k-image run
            self._fail(index, "error", f"{type(exc).__name__}: {exc}")
        finally:
            rec["seconds"] = round(time.perf_counter() - start, 4)

    def _evict(self, victims: dict[int, Path]) -> None:
        for idx, path in victims.items():
            path.unlink(missing_ok=True)
            self._fail(idx, "placeholder: repeated", "content later seen at other URLs")

    def table(self) -> pd.DataFrame:
        with self.lock:
            run = pd.DataFrame([dict(r) for r in self.records.values()], columns=STATUS_COLUMNS)
        return run

    def write_status(self) -> pd.DataFrame:
        """Carried rows of earlier runs + this run's rows, written atomically."""
        with self.lock:
            rows = [dict(r) for r in self.carried.values()] + [dict(r) for r in self.records.values()]
        full = pd.DataFrame(rows, columns=STATUS_COLUMNS)
        write_csv(self.out_dir / STATUS_FILE, full)
        return full

    def carry(self, previous: pd.DataFrame, current_ids: set[str]) -> None:
        """Keep earlier rows of images not in this run; seed the registry with every known hash."""
        for n, row in enumerate(previous.to_dict("records")):
            sha1, url = row["sha1"], row["url"]
            if row["reason"] == "placeholder: repeated":
                self.registry.seed(sha1, url, flagged=True)
            if row["image_id"] in current_ids:
                continue
            key = -(n + 1)
            self.carried[key] = row
            if row["status"] in ("ok", "skipped") and sha1 and row["path"]:
                try:
                    target = safe_target(self.out_dir, row["path"])
                except FetchError:
                    continue
                if target.exists():
                    self.registry.seed(sha1, url, index=key, path=target)


def download(
    df: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    cfg: DownloadConfig | None = None,
    **overrides: Any,
) -> DownloadReport:
    """Fetch the images of ``df`` (columns ``image_id``, ``url`` and optionally ``path``) into ``out_dir``.

    ``overrides`` are DownloadConfig fields (``download(df, d, workers=8)``). Every row ends as
    ``ok`` (fetched and written), ``skipped`` (its file already existed: no request was made) or
    ``failed`` (``reason`` says why; its file is absent so the next run retries it). Returns the
    report; the status table is also at ``out_dir/download_status.csv``.
    """
    cfg = cfg or DownloadConfig()
    if overrides:
        cfg = DownloadConfig(**{**cfg.__dict__, **overrides})
    for col in ("image_id", "url"):
        if col not in df.columns:
            raise ImatError(
                f"download: the table has no {col!r} column (columns: {', '.join(map(str, df.columns))})"
            )
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImatError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    if cfg.limit is not None:
        df = df.head(cfg.limit)

    previous = read_status(out)
    prev_by_id = {r.image_id: r for r in previous.itertuples(index=False)} if len(previous) else {}
    run = _Run(out, cfg, previous)
    run.carry(previous, {_text(x) for x in df["image_id"]})

    todo: list[tuple[int, Path]] = []
    seen_targets: dict[str, int] = {}
    paths = df["path"] if "path" in df.columns else pd.Series([""] * len(df), index=df.index)
    for index, (image_id, path, url) in enumerate(zip(df["image_id"], paths, df["url"], strict=True)):
        image_id, url = _text(image_id), _text(url).strip()
        rec = _blank(image_id, _text(path), url)
        run.records[index] = rec
        try:
            name = safe_file_name(_text(path), image_id)
            rec["path"] = name
            target = safe_target(out, name)
        except ValueError:
            rec.update(reason="unsafe path", detail="no path and no image_id")
            continue
        except FetchError as exc:
            rec.update(reason=exc.reason, detail=exc.detail)
            continue
        if name in seen_targets:
            rec.update(reason="duplicate path", detail=f"same file as row {seen_targets[name]}")
            continue
        seen_targets[name] = index
        prev = prev_by_id.get(image_id)
        if target.exists():
            rec.update(status="skipped", reason="exists", bytes=target.stat().st_size)
            if prev is not None and prev.path == name and _int(prev.width):
                rec.update(width=_int(prev.width), height=_int(prev.height), sha1=prev.sha1)
                rec["download_bytes"] = _int(prev.download_bytes)
            else:
                try:
                    with Image.open(target) as im:  # header only: cheap
                        rec["width"], rec["height"] = im.size
                except Exception:  # noqa: BLE001 - a foreign file in the folder; leave it alone
                    pass
            # An existing file still counts towards its hash: if this run meets the same bytes at more
            # URLs, it is a placeholder and goes too.
            run.registry.seed(rec["sha1"], url, index=index, path=target)
            continue
        if cfg.skip_failed and prev is not None and prev.status == "failed":
            rec.update(reason=prev.reason, detail=prev.detail)
            continue
        todo.append((index, target))

    start = time.perf_counter()
    if todo:
        bar = tqdm(total=len(todo), unit="img", desc="download", disable=not cfg.progress)
        last_write = time.monotonic()
        n_ok = n_failed = 0
        pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="imat-dl")
        try:
            futures = {pool.submit(run.work, i, t): i for i, t in todo}
            for fut in as_completed(futures):
                fut.result()
                if run.records[futures[fut]]["status"] == "ok":
                    n_ok += 1
                else:
                    n_failed += 1
                bar.update(1)
                bar.set_postfix(ok=n_ok, failed=n_failed, refresh=False)
                if time.monotonic() - last_write >= cfg.status_every:
                    run.write_status()
                    last_write = time.monotonic()
        except BaseException:
            # Ctrl-C or a bug: drop what has not started, let the running ones finish (each is bounded
            # by its timeouts), record everything, then re-raise. The next run retries the rest.
            pool.shutdown(wait=True, cancel_futures=True)
            with run.lock:
                for i, _ in todo:
                    rec = run.records[i]
                    if rec["status"] == "failed" and not rec["reason"]:
                        rec.update(reason="interrupted")
            run.write_status()
            raise
        finally:
            pool.shutdown(wait=True)
            bar.close()
    seconds = time.perf_counter() - start
    run.session.close()
    full = run.write_status()
    table = run.table()
    table["bytes"] = pd.to_numeric(table["bytes"])
    return DownloadReport(status=full, run=table, seconds=seconds, out_dir=out)
