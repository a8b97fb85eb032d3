"""File names and targets that always land directly inside the output folder, whatever the ids contain."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from imat.download.settings import FetchError

MAX_NAME_BYTES = 200  # well under the 255-byte limit of common file systems, room for a temp prefix
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._\-]")


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
