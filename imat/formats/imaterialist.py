"""iMaterialist readers: Furniture 2018, Fashion 2018 (both key spellings) and Product 2019.

Furniture 2018 (``furniture2018``)::

    {"images": [{"url": ["https://..."], "image_id": 1}],
     "annotations": [{"image_id": 1, "label_id": 37}]}

Fashion 2018 (``fashion2018``): the real files spell ``imageId``/``labelId``, give ``url`` as a string
and ``labelId`` as a list of strings (multi-label); the documentation spelled ``image_id``/``label_id``
with ``url`` a list. Both spellings are read by the same code, so a Furniture-shaped file whose
``label_id`` values are lists is read as Fashion. ``source_label`` keeps the whole label list joined by
spaces; imat trains single-label classifiers, so ``build_manifest`` refuses a multi-label file for
train/val (a file where every image has exactly one label is fine).

In both, images and annotations are parallel lists joined on the image id; the test file has only
``images``. The image file is ``<image_id>.jpg`` under ``data.images`` (where ``imat data download``
puts it) and the first URL is kept in ``url``.

Product 2019 (``product2019``)::

    {"images": [{"id": "0a1b...f9.jpg", "url": "http://...", "class": 1412}]}

``id`` already ends in ``.jpg`` and is both the image id (submissions keep the ``.jpg``) and the file
name under ``data.images``; ``class`` is 0..2018 and is absent from the test file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imat.errors import ImatError
from imat.formats.common import (
    SplitData,
    check_unique,
    first_url,
    label_text,
    make_frame,
    pick,
    records,
)

IMAGE_ID_KEYS = ("image_id", "imageId")
LABEL_KEYS = ("label_id", "labelId")


def _label_list(value: Any, path: Path, where: str) -> list[str]:
    """One label (Furniture) or a list of labels (Fashion) as a list of label texts."""
    if isinstance(value, list):
        return [label_text(v) for v in value if label_text(v) != ""]
    if isinstance(value, dict):
        raise ImatError(f"file {path}: {where} label must be a number, string or list, got an object")
    text = label_text(value)
    return [text] if text else []


def read_imat2018(path: Path, split: str, doc: Any, fmt: str = "furniture2018") -> SplitData:
    """Furniture 2018 or Fashion 2018 (either spelling): images joined with annotations on image id."""
    images = records(doc, "images", path)
    annotations = records(doc, "annotations", path, required=False)
    ids: list[str] = []
    urls: list[str] = []
    for i, image in enumerate(images):
        ids.append(label_text(pick(image, IMAGE_ID_KEYS, path, f"images[{i}]")))
        urls.append(first_url(image.get("url", image.get("urls"))))
    check_unique(ids, path, "image id")
    known = set(ids)
    labels: dict[str, list[str]] = {}
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        image_id = label_text(pick(ann, IMAGE_ID_KEYS, path, where))
        if image_id not in known:
            raise ImatError(f"file {path}: {where} refers to image id {image_id!r}, which is not in 'images'")
        label = _label_list(pick(ann, LABEL_KEYS, path, where), path, where)
        if image_id in labels and labels[image_id] != label:
            raise ImatError(f"file {path}: image id {image_id!r} has two different annotations")
        labels[image_id] = label
    source = [" ".join(labels.get(image_id, [])) for image_id in ids]
    multi = any(len(v) > 1 for v in labels.values())
    df = make_frame(ids, split, [f"{image_id}.jpg" for image_id in ids], source, urls)
    return SplitData(df=df, fmt=flavour_2018(doc) or fmt, source=path, multi_label=multi)


def flavour_2018(doc: Any) -> str | None:
    """``fashion2018`` or ``furniture2018`` from the first image/annotation's keys, None if neither.

    Fashion: camelCase ``imageId``/``labelId`` or a list-valued label. Furniture: ``image_id`` (its
    ``url`` is a list, but a test file with ``image_id`` and a string URL reads the same way)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        return None
    firsts = [x for x in (doc["images"][:1] + list(doc.get("annotations") or [])[:1]) if isinstance(x, dict)]
    if any("imageId" in x or "labelId" in x for x in firsts):
        return "fashion2018"
    if any(isinstance(x.get("label_id"), list) for x in firsts):
        return "fashion2018"
    if any("image_id" in x for x in firsts[:1]):
        return "furniture2018"
    return None


def read_product2019(path: Path, split: str, doc: Any) -> SplitData:
    """Product 2019: ``images[]`` with ``id`` (the file name, ``.jpg`` included), ``url``, ``class``."""
    images = records(doc, "images", path)
    ids: list[str] = []
    urls: list[str] = []
    source: list[str] = []
    for i, image in enumerate(images):
        image_id = label_text(pick(image, ("id",), path, f"images[{i}]"))
        if not image_id:
            raise ImatError(f"file {path}: images[{i}] has an empty 'id'")
        ids.append(image_id)
        urls.append(first_url(image.get("url")))
        source.append(label_text(image.get("class")))
    check_unique(ids, path, "id")
    df = make_frame(ids, split, ids, source, urls)
    return SplitData(df=df, fmt="product2019", source=path)
