"""The one exception type users see: a one-line message naming the file, key or value at fault."""

from __future__ import annotations

import os
from pathlib import Path


class ImatError(Exception):
    """Bad input or a failed precondition. The CLI prints ``imat: error: <message>`` and exits 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message is cut by log collectors and hard to grep.
        super().__init__(" ".join(str(message).split()))


def require_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """Return ``path`` as a Path, or raise ImatError when it is missing or not a readable file."""
    p = Path(path)
    if not p.exists():
        raise ImatError(f"{what} not found: {p}")
    if not p.is_file():
        raise ImatError(f"{what} is not a file: {p}")
    if not os.access(p, os.R_OK):
        raise ImatError(f"{what} is not readable: {p}")
    return p


def require_dir(path: str | os.PathLike[str], what: str = "folder") -> Path:
    """Return ``path`` as a Path, or raise ImatError when it is not an existing directory."""
    p = Path(path)
    if not p.is_dir():
        raise ImatError(f"{what} not found: {p}")
    return p
