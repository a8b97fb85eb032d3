"""Image decoding: one function, two back-ends, the same answer (HxWx3 RGB uint8) for every file.

Both decoders apply the EXIF orientation (OpenCV does it by default; PIL is told to), drop alpha and
expand grayscale to three channels, so a model sees the same pixels whichever decoder a config picks.
An unreadable, corrupt or missing file raises :class:`ImageDecodeError` (an ImatError naming the file),
which the dataset turns into a skipped sample."""

from __future__ import annotations

import os
import warnings
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imat.errors import ImatError

Decoder = Literal["cv2", "pil"]
DECODERS: tuple[str, ...] = ("cv2", "pil")

# OpenCV >= 4.10 decodes straight to RGB, which saves a full-image cvtColor per sample.
_CV2_RGB_FLAG: int | None = getattr(cv2, "IMREAD_COLOR_RGB", None)


class ImageDecodeError(ImatError):
    """A file that exists in the manifest but cannot be turned into pixels."""


def _decode_cv2(path: str) -> np.ndarray:
    # np.fromfile + imdecode (rather than cv2.imread) reads non-ASCII paths on every platform and lets
    # us tell a missing file (OSError) from undecodable bytes (None).
    buf = np.fromfile(path, dtype=np.uint8)
    if buf.size == 0:
        raise ImageDecodeError(f"empty image file: {path}")
    if _CV2_RGB_FLAG is not None:
        img = cv2.imdecode(buf, _CV2_RGB_FLAG)
        if img is None:
            raise ImageDecodeError(f"not a decodable image: {path}")
        return img
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        raise ImageDecodeError(f"not a decodable image: {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _decode_pil(path: str) -> np.ndarray:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"))


def decode_image(path: str | os.PathLike[str], decoder: str = "cv2") -> np.ndarray:
    """Read ``path`` as an HxWx3 RGB uint8 array (C-contiguous).

    Raises ImageDecodeError (one line, naming the file) for a missing, unreadable, empty or corrupt
    file, and ImatError for an unknown decoder name."""
    if decoder not in DECODERS:
        raise ImatError(f"unknown decoder {decoder!r} (choose from {', '.join(DECODERS)})")
    p = os.fspath(path)
    try:
        with warnings.catch_warnings():
            # PIL warns about odd EXIF / huge images; a decode either works or raises below.
            warnings.simplefilter("ignore")
            img = _decode_cv2(p) if decoder == "cv2" else _decode_pil(p)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(f"image not found: {p}") from None
    except (OSError, ValueError, UnidentifiedImageError, cv2.error, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot read image {p} ({exc.__class__.__name__}: {exc})") from None
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or min(img.shape[:2]) < 1:
        raise ImageDecodeError(f"unexpected image layout {img.shape} {img.dtype}: {p}")
    return np.ascontiguousarray(img)
