"""COCO-style classification files (iNaturalist, Herbarium, ...): format ``coco``.

::

    {"images": [{"id": 1, "file_name": "train/cat/1.jpg"}],
     "annotations": [{"image_id": 1, "category_id": 3}],
     "categories": [{"id": 3, "name": "cat"}]}

``path`` is ``file_name`` (relative to ``data.images``), ``image_id`` is ``id`` as text and
``source_label`` the ``category_id``. ``categories`` (optional) gives the class names. An image may
carry several annotations only when they agree on the category (this is a single-label toolkit).
The test file has only ``images`` (or an empty ``annotations`` list).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imat.errors import ImatError
from imat.formats.common import SplitData, check_unique, first_url, label_text, make_frame, pick, records


def read_coco(path: Path, split: str, doc: Any) -> SplitData:
    images = records(doc, "images", path)
    annotations = records(doc, "annotations", path, required=False)
    categories = records(doc, "categories", path, required=False)
    ids: list[str] = []
    paths: list[str] = []
    urls: list[str] = []
    for i, image in enumerate(images):
        where = f"images[{i}]"
        ids.append(label_text(pick(image, ("id",), path, where)))
        name = str(pick(image, ("file_name",), path, where))
        if not name:
            raise ImatError(f"file {path}: {where} has an empty 'file_name'")
        paths.append(name)
        urls.append(first_url(image.get("coco_url", image.get("url"))))
    check_unique(ids, path, "image id")
    known = set(ids)
    labels: dict[str, str] = {}
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        image_id = label_text(pick(ann, ("image_id",), path, where))
        if image_id not in known:
            raise ImatError(f"file {path}: {where} refers to image id {image_id!r}, which is not in 'images'")
        label = label_text(pick(ann, ("category_id",), path, where))
        if labels.get(image_id, label) != label:
            raise ImatError(
                f"file {path}: image id {image_id!r} has annotations with different category_id "
                f"({labels[image_id]} and {label}); imat reads single-label classification files"
            )
        labels[image_id] = label
    names = {}
    for i, cat in enumerate(categories):
        cid = label_text(pick(cat, ("id",), path, f"categories[{i}]"))
        names[cid] = str(cat.get("name", cid))
    df = make_frame(ids, split, paths, [labels.get(x, "") for x in ids], urls)
    return SplitData(df=df, fmt="coco", source=path, names=names)
