"""Competition-format readers: every input of DESIGN.md becomes manifest rows.

Formats (``data.format``; ``auto`` detects them): ``furniture2018``, ``fashion2018``, ``product2019``
(:mod:`imat.formats.imaterialist`), ``coco`` (:mod:`imat.formats.coco`), ``imagenet``
(:mod:`imat.formats.imagenet`), ``imagefolder`` and ``csv`` (:mod:`imat.formats.tables`).
:mod:`imat.formats.build` turns the config's ``data`` section into the manifest and class map.
"""

from imat.formats.build import build_manifest, read_source, read_split, resolve_path, write_manifest
from imat.formats.common import FORMATS, SplitData
from imat.formats.detect import detect_format

__all__ = [
    "FORMATS",
    "SplitData",
    "build_manifest",
    "detect_format",
    "read_source",
    "read_split",
    "resolve_path",
    "write_manifest",
]
