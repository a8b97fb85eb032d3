"""Decompression bombs for tests: PNGs whose header declares a huge size, written in microseconds."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def write_bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """An RGB PNG declaring ``width`` x ``height`` whose data stream holds only its first rows.

    A decoder that trusts the header allocates width*height*3 bytes before it finds the data short: the
    header is all the size check may read."""
    rows = b"".join(b"\x00" + bytes(3 * width) for _ in range(4))
    png = b"\x89PNG\r\n\x1a\n"
    png += _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += _chunk(b"IDAT", zlib.compress(rows, 9))
    png += _chunk(b"IEND", b"")
    path.write_bytes(png)
    return path
