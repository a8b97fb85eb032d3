"""Tell an input's format from its shape: a folder by its layout, a CSV by its header, a JSON file by
its keys. The names are those of ``data.format`` in the config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from imat.errors import ImatError
from imat.formats.common import is_image_file, is_wnid, load_json
from imat.formats.imaterialist import flavour_2018
from imat.formats.tables import read_header

EXPECTED = (
    "expected one of: a JSON file with 'images' (Furniture 2018, Fashion 2018, Product 2019, COCO), "
    "a CSV with a path,label header, LOC_val_solution.csv, ILSVRC2012_validation_ground_truth.txt, "
    "or a folder of images (<class>/<image> or ImageNet <wnid>/<image>)"
)


def detect_format(path: str | os.PathLike[str]) -> str:
    """``furniture2018 | fashion2018 | product2019 | coco | imagenet | imagefolder | csv`` for ``path``."""
    return sniff(Path(path))[0]


def sniff(path: Path) -> tuple[str, Any]:
    """The format and, for JSON, the parsed document (so big files are parsed once)."""
    if not path.exists():
        raise ImatError(f"input not found: {path}")
    if path.is_dir():
        return _folder_format(path), None
    suffix = path.suffix.lower()
    if suffix == ".json":
        doc = load_json(path)
        fmt = json_format(doc)
        if fmt is None:
            keys = ", ".join(list(doc)[:8]) if isinstance(doc, dict) else type(doc).__name__
            raise ImatError(f"file {path}: cannot tell the format from its keys ({keys}); {EXPECTED}")
        return fmt, doc
    if suffix == ".csv":
        header = read_header(path)
        if "path" in header:
            return "csv", None
        if "ImageId" in header and "PredictionString" in header:
            return "imagenet", None
        raise ImatError(
            f"file {path}: cannot tell the format from the CSV header {','.join(header)!r}; {EXPECTED}"
        )
    if path.name.endswith("validation_ground_truth.txt"):
        return "imagenet", None
    raise ImatError(f"file {path}: cannot tell the format; {EXPECTED}")


def json_format(doc: Any) -> str | None:
    """The JSON flavour from the first image and annotation, None when no reader fits."""
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        return None
    images = doc["images"]
    annotations = doc.get("annotations") if isinstance(doc.get("annotations"), list) else []
    image = images[0] if images and isinstance(images[0], dict) else {}
    ann = annotations[0] if annotations and isinstance(annotations[0], dict) else {}
    if "file_name" in image or "category_id" in ann or "categories" in doc:
        return "coco"
    product_id = isinstance(image.get("id"), str) and image["id"].lower().endswith(".jpg")
    if "class" in image or product_id or ("id" in image and "url" in image and "image_id" not in image):
        return "product2019"
    if not images and not annotations:
        return None
    return flavour_2018(doc)


def _folder_format(path: Path) -> str:
    """ImageNet when every class folder is a wnid or the images are ILSVRC2012_*, else ImageFolder."""
    subdirs: list[str] = []
    images: list[str] = []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                subdirs.append(entry.name)
            elif is_image_file(entry.name):
                images.append(entry.name)
    if not subdirs and not images:
        raise ImatError(f"folder {path}: no images found (expected {path}/<class>/<image>)")
    if subdirs and all(is_wnid(d) for d in subdirs):
        return "imagenet"
    if not subdirs and all(name.startswith(("ILSVRC2012_val_", "ILSVRC2012_test_")) for name in images):
        return "imagenet"
    return "imagefolder"
