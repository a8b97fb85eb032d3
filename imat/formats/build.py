"""From the config's ``data`` section to the manifest: read each split, build the class map, map labels.

Paths. Every manifest ``path`` is either relative to ``data.images`` or absolute:

* URL/JSON formats (Furniture, Fashion, Product, COCO, the ImageNet label files): the file name as the
  competition names it (``<image_id>.jpg``, ``id``, ``file_name``), relative to ``data.images``;
* CSV: as written, relative to ``data.images`` when set, else to the CSV's folder;
* folder formats (ImageFolder, ImageNet folders): relative to ``data.images`` when the folder lies
  inside it, else absolute.

``resolve_path(df, images_root)`` joins a relative path onto ``images_root`` and keeps absolute ones, so
``resolve_path(manifest, cfg.data.images)`` gives every image's file. ``read_split`` alone returns paths
relative to its own folder for folder formats (resolve them against that folder).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from imat.errors import ImatError
from imat.formats.coco import read_coco
from imat.formats.common import FORMATS, SplitData, load_json, require_labels
from imat.formats.detect import sniff
from imat.formats.imagenet import read_imagenet
from imat.formats.imaterialist import read_imat2018, read_product2019
from imat.formats.tables import read_imagefolder, read_table
from imat.manifest import SPLITS, ClassMap, normalise, save_manifest

if TYPE_CHECKING:
    from imat.config import RunConfig

FOLDER_FORMATS = ("imagefolder",)
JSON_FORMATS = ("furniture2018", "fashion2018", "product2019", "coco")


def read_source(
    path: str | os.PathLike[str],
    split: str,
    fmt: str = "auto",
    images: str | os.PathLike[str] | None = None,
    labels_required: bool | None = None,
) -> SplitData:
    """Read one split with its format (detected when ``fmt`` is ``auto``). Labels are required for
    train and val unless ``labels_required`` says otherwise (inspection reads anything)."""
    p = Path(path)
    need = split != "test" if labels_required is None else labels_required
    doc: Any = None
    if fmt == "auto":
        fmt, doc = sniff(p)
    elif fmt not in FORMATS:
        raise ImatError(f"data.format: unknown format {fmt!r} (expected auto or one of {', '.join(FORMATS)})")
    elif not p.exists():
        raise ImatError(f"input not found: {p}")
    if fmt in JSON_FORMATS and doc is None:
        if p.is_dir():
            raise ImatError(f"folder {p}: format {fmt} needs a JSON file")
        doc = load_json(p)
    if fmt == "imagefolder" and not p.is_dir():
        raise ImatError(f"file {p}: format imagefolder needs a folder of <class>/<image>")
    images_root = Path(images) if images is not None else None
    if fmt in ("furniture2018", "fashion2018"):
        data = read_imat2018(p, split, doc, fmt)
    elif fmt == "product2019":
        data = read_product2019(p, split, doc)
    elif fmt == "coco":
        data = read_coco(p, split, doc)
    elif fmt == "imagenet":
        data = read_imagenet(p, split, need)
    elif fmt == "imagefolder":
        data = read_imagefolder(p, split, need)
    else:
        data = read_table(p, split, need, images_root)
    if need:
        require_labels(data, "label (category_id)" if fmt == "coco" else "label")
    return data


def read_split(path: str | os.PathLike[str], split: str, fmt: str = "auto") -> pd.DataFrame:
    """One split's manifest rows (label -1: the class map comes later). ``path`` is relative to the
    images folder for JSON formats and to ``path`` itself for folder formats."""
    return read_source(path, split, fmt).df


def rebase_paths(data: SplitData, images: Path | None) -> pd.Series:
    """The rows' paths relative to ``images`` where the source lies inside it, else absolute."""
    paths = data.df["path"].astype(str)
    if data.base is None:
        return paths
    base = Path(os.path.abspath(data.base))
    if images is not None:
        root = Path(os.path.abspath(images))
        if base == root:
            return paths
        if base.is_relative_to(root):
            prefix = base.relative_to(root).as_posix()
            return paths.map(lambda p: p if os.path.isabs(p) else f"{prefix}/{p}")
    return paths.map(lambda p: p if os.path.isabs(p) else str(base / p))


def _check_single_label(data: SplitData) -> None:
    if data.multi_label:
        multi = data.df["source_label"].str.contains(" ", regex=False)
        row = data.df.loc[multi].iloc[0]
        count = len(str(row["source_label"]).split())
        raise ImatError(
            f"file {data.source}: multi-label annotations (image {row['image_id']!r} has {count} labels); "
            "imat trains single-label classifiers, so train/val need one label per image"
        )


def build_manifest(data_cfg: Any) -> tuple[pd.DataFrame, ClassMap]:
    """Read ``data.train``/``val``/``test`` into one manifest and its class map.

    The class map comes from the train labels (from val when there is no train file); a val label the
    train split never shows is an error, as is a multi-label (Fashion) file used for train/val. Test
    rows keep their ``source_label`` when the file has one but always get label -1."""
    images = Path(data_cfg.images) if getattr(data_cfg, "images", None) else None
    fmt = getattr(data_cfg, "format", "auto")
    parts: dict[str, SplitData] = {}
    for split in SPLITS:
        path = getattr(data_cfg, split, None)
        if path:
            parts[split] = read_source(path, split, fmt, images)
    if not parts:
        raise ImatError("data: none of data.train, data.val, data.test is set")
    for split in ("train", "val"):
        if split in parts:
            _check_single_label(parts[split])
    names: dict[str, str] = {}
    for data in parts.values():
        names.update(data.names)
    reference = parts.get("train") or parts.get("val")
    labels = reference.df["source_label"] if reference is not None else []
    classes = ClassMap.from_labels(labels, names=names or None)
    index = {s: i for i, s in enumerate(classes.source_labels)}
    frames = []
    for split, data in parts.items():
        df = data.df.copy()
        df["path"] = rebase_paths(data, images)
        if split == "test":
            df["label"] = -1
        else:
            mapped = df["source_label"].map(index)
            unknown = mapped.isna()
            if unknown.any():
                row = df.loc[unknown].iloc[0]
                raise ImatError(
                    f"file {data.source}: {split} label {row['source_label']!r} (image {row['image_id']!r}) "
                    f"is not among the {classes.num_classes} classes of the train split"
                )
            df["label"] = mapped.astype("int64")
        frames.append(df)
    return normalise(pd.concat(frames, ignore_index=True)), classes


def write_manifest(cfg: RunConfig) -> Path:
    """Build the manifest of ``cfg.data`` and write ``RUN_DIR/data/manifest.parquet`` + ``classes.json``."""
    df, classes = build_manifest(cfg.data)
    return save_manifest(df, classes, cfg.manifest_path.parent)


def resolve_path(df: pd.DataFrame, images_root: str | os.PathLike[str] | None) -> pd.Series:
    """Each row's image file: absolute ``path`` as is, relative ones joined onto ``images_root``.

    A relative path with no ``images_root`` is an error naming the row (set ``data.images`` or
    ``--images``)."""
    paths = df["path"].astype(str)
    if images_root is None:
        relative = ~paths.map(os.path.isabs)
        if relative.any():
            raise ImatError(
                f"image path {paths[relative].iloc[0]!r} is relative but no images folder was given "
                "(set data.images or --images)"
            )
        return paths
    root = os.path.abspath(images_root)
    return paths.map(lambda p: p if os.path.isabs(p) else os.path.join(root, p))
