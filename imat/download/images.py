"""Decode, normalise to RGB, shrink and re-encode as JPEG; detect placeholder images."""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from imat.data.decode import dct_scale, draft_pil
from imat.download.settings import DownloadConfig, FetchError


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
                draft_pil(im, dct_scale(src_w, src_h, int(src_w * scale), int(src_h * scale)))
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
