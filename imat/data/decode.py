"""Image decoding: one function, two back-ends, the same answer (HxWx3 RGB uint8) for every file.

Both decoders apply the EXIF orientation (OpenCV does it by default; PIL is told to), drop alpha and
expand grayscale to three channels, so a model sees the same pixels whichever decoder a config picks.
An unreadable, corrupt or missing file raises :class:`ImageDecodeError` (an ImatError naming the file),
which the dataset turns into a skipped sample.

Before any pixel is decoded the image's size is read from its header: an image of more than
``max_pixels`` raises :class:`ImageTooLargeError` (an ImageDecodeError, so it is skipped and counted like
an unreadable one), since a 100 kB PNG can declare 30000x30000 pixels and a full decode of it takes
gigabytes in every loader worker. A JPEG much larger than needed is decoded at 1/2, 1/4 or 1/8 scale
in the DCT (libjpeg's scaling, used by both back-ends): :func:`dct_scale` is that rule, for the loaders
and the downloader alike."""

from __future__ import annotations

import io
import os
import warnings
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imat.errors import ImatError

Decoder = Literal["cv2", "pil"]
DECODERS: tuple[str, ...] = ("cv2", "pil")
# PIL's own warning threshold (a quarter-gigapixel: 256 MB of RGB); its hard refusal is twice that.
DEFAULT_MAX_PIXELS: int = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
DCT_SCALES: tuple[int, ...] = (8, 4, 2, 1)

# OpenCV >= 4.10 decodes straight to RGB, which saves a full-image cvtColor per sample.
_CV2_RGB_FLAG: int | None = getattr(cv2, "IMREAD_COLOR_RGB", None)
_CV2_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


class ImageDecodeError(ImatError):
    """A file that exists in the manifest but cannot be turned into pixels."""


class ImageTooLargeError(ImageDecodeError):
    """An image whose header declares more pixels than the decode limit (a decompression bomb)."""


def dct_scale(width: int, height: int, min_width: int, min_height: int) -> int:
    """The largest JPEG DCT reduction (8, 4, 2 or 1) that keeps the image at least min_width x min_height.

    libjpeg's rule, as PIL's ``Image.draft`` applies it: a 1/s decode is ceil(w/s) x ceil(h/s)."""
    limit = min(width // max(1, min_width), height // max(1, min_height))
    return next(s for s in DCT_SCALES if s <= max(1, limit))


def draft_pil(im: Image.Image, scale: int) -> Image.Image:
    """Ask PIL to decode a JPEG at 1/``scale`` (a :func:`dct_scale` answer); other formats ignore it."""
    if scale > 1 and im.format == "JPEG":
        w, h = im.size
        im.draft("RGB", (-(-w // scale), -(-h // scale)))
    return im


def read_header(data: bytes) -> tuple[str, int, int] | None:
    """``(format, width, height)`` from an encoded image's header without decoding its pixels; None when
    PIL does not know the format (the decoder then has the last word)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return str(im.format or ""), int(im.size[0]), int(im.size[1])
    except Image.DecompressionBombError as exc:  # over twice PIL's limit: too large for any sane max
        raise ImageTooLargeError(str(exc)) from None
    except Exception:  # PIL raises many types for data it cannot parse
        return None


def check_pixels(header: tuple[str, int, int] | None, max_pixels: int | None) -> None:
    """Raise ImageTooLargeError when ``header`` declares more than ``max_pixels`` pixels (None: no limit)."""
    if header is None or max_pixels is None:
        return
    _, width, height = header
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{width}x{height} px, more than {max_pixels}")


def _decode_cv2(data: bytes, path: str, scale: int) -> np.ndarray:
    # Bytes + imdecode (rather than cv2.imread) read non-ASCII paths on every platform and let us tell a
    # missing file (OSError) from undecodable bytes (None).
    buf = np.frombuffer(data, dtype=np.uint8)
    flag = _CV2_REDUCED[scale] if scale > 1 else cv2.IMREAD_COLOR
    if _CV2_RGB_FLAG is not None:
        img = cv2.imdecode(buf, (flag & ~cv2.IMREAD_COLOR) | _CV2_RGB_FLAG)
        if img is None:
            raise ImageDecodeError(f"not a decodable image: {path}")
        return img
    img = cv2.imdecode(buf, flag)
    if img is None:
        raise ImageDecodeError(f"not a decodable image: {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _decode_pil(data: bytes, scale: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(draft_pil(im, scale))
        return np.asarray(im.convert("RGB"))


def decode_image(
    path: str | os.PathLike[str],
    decoder: str = "cv2",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> np.ndarray:
    """Read ``path`` as an HxWx3 RGB uint8 array (C-contiguous).

    ``max_pixels``: a larger image (by its header) raises ImageTooLargeError before any decoding (None:
    no limit). ``min_side``: a JPEG is decoded at the largest DCT reduction (1/2, 1/4, 1/8) whose shorter
    side stays >= min_side (None: full size). Raises ImageDecodeError (one line, naming the file) for a
    missing, unreadable, empty or corrupt file, and ImatError for an unknown decoder name."""
    if decoder not in DECODERS:
        raise ImatError(f"unknown decoder {decoder!r} (choose from {', '.join(DECODERS)})")
    p = os.fspath(path)
    try:
        with open(p, "rb") as fh:
            data = fh.read()
        if not data:
            raise ImageDecodeError(f"empty image file: {p}")
        try:
            header = read_header(data)
            check_pixels(header, max_pixels)
        except ImageTooLargeError as exc:
            raise ImageTooLargeError(f"image too large: {p} ({exc})") from None
        scale = 1
        if min_side and header is not None and header[0] == "JPEG":
            side = min(header[1], header[2])
            scale = dct_scale(side, side, min_side, min_side)
        with warnings.catch_warnings():
            # PIL warns about odd EXIF / huge images; a decode either works or raises below.
            warnings.simplefilter("ignore")
            img = _decode_cv2(data, p, scale) if decoder == "cv2" else _decode_pil(data, scale)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(f"image not found: {p}") from None
    except (OSError, ValueError, UnidentifiedImageError, cv2.error, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot read image {p} ({exc.__class__.__name__}: {exc})") from None
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or min(img.shape[:2]) < 1:
        raise ImageDecodeError(f"unexpected image layout {img.shape} {img.dtype}: {p}")
    return np.ascontiguousarray(img)
