"""ImageNet (ILSVRC2012) layouts: format ``imagenet``. The class index is the sorted wnid order.

What ``data.train`` / ``data.val`` / ``data.test`` may point at:

* a folder of class folders ``<dir>/<wnid>/*.JPEG`` (train, or val re-sorted by valprep.sh): the class
  is the folder name, ``path`` is ``<wnid>/<file>`` relative to that folder;
* a flat validation folder of ``ILSVRC2012_val_*.JPEG``: labels are looked up beside it, in the folder
  itself and up to four parent folders (Kaggle keeps the CSV four levels above ``ILSVRC/Data/CLS-LOC/val``) (and their ``data/`` or ``*devkit*/data/`` sub-folders):
  Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the label is the first token), or
  the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID 1..1000 per line, line n is
  ``ILSVRC2012_val_<n:08d>``) with an ILSVRC2012_ID -> wnid mapping next to it: ``meta.mat`` (read
  with scipy) or a text file ``map_clsloc.txt`` / ``ILSVRC2012_mapping.txt`` whose lines are
  ``wnid ID [words]``, ``ID wnid [words]`` or just ``wnid`` (line n = ID n). A flat test folder
  (``ILSVRC2012_test_*``) needs no labels;
* the label file itself (``LOC_val_solution.csv`` or ``ILSVRC2012_validation_ground_truth.txt``):
  ``path`` is ``<ImageId>.JPEG`` relative to Kaggle's ``ILSVRC/Data/CLS-LOC/val`` when that folder sits
  beside the CSV, else relative to ``data.images``.

The ID order of the devkit is not the sorted-wnid order; everything here keys on wnids, never on the
(duplicated) class names. ``LOC_synset_mapping.txt`` found beside the data gives the class names.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from imat.errors import ImatError
from imat.formats.common import SplitData, is_wnid, make_frame
from imat.formats.tables import list_images, read_header

GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
LOC_SOLUTION = "LOC_val_solution.csv"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
ID_MAPPINGS = ("meta.mat", "map_clsloc.txt", "ILSVRC2012_mapping.txt")
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)")


def find_near(start: Path, names: tuple[str, ...], levels: int = 4) -> Path | None:
    """The first of ``names`` in ``start``, its parents (up to ``levels``), or their data folders."""
    folders = [start, *list(start.parents)[:levels]]
    for folder in folders:
        for sub in (folder, folder / "data", *sorted(folder.glob("*devkit*/data"))):
            for name in names:
                if (sub / name).is_file():
                    return sub / name
    return None


def read_synset_names(path: Path | None) -> dict[str, str]:
    """``LOC_synset_mapping.txt`` (``wnid words``) as wnid -> words; empty when there is none."""
    if path is None:
        return {}
    names: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        wnid, _, words = line.strip().partition(" ")
        if is_wnid(wnid):
            names[wnid] = words.strip()
    return names


def read_id_mapping(path: Path) -> tuple[dict[int, str], dict[str, str]]:
    """ILSVRC2012_ID -> wnid (and wnid -> words) from ``meta.mat`` or a text mapping."""
    if path.suffix == ".mat":
        return _read_meta_mat(path)
    ids: dict[int, str] = {}
    names: dict[str, str] = {}
    lines = [ln.split() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    for n, tokens in enumerate(lines, start=1):
        if len(tokens) >= 2 and is_wnid(tokens[0]) and tokens[1].isdigit():
            ident, wnid, words = int(tokens[1]), tokens[0], tokens[2:]
        elif len(tokens) >= 2 and tokens[0].isdigit() and is_wnid(tokens[1]):
            ident, wnid, words = int(tokens[0]), tokens[1], tokens[2:]
        elif is_wnid(tokens[0]):
            ident, wnid, words = n, tokens[0], tokens[1:]
        else:
            raise ImatError(
                f"file {path}: line {n}: expected 'wnid ID', 'ID wnid' or 'wnid', got {' '.join(tokens)!r}"
            )
        ids[ident] = wnid
        if words:
            names[wnid] = " ".join(words)
    return ids, names


def _read_meta_mat(path: Path) -> tuple[dict[int, str], dict[str, str]]:
    try:
        import scipy.io
    except ImportError:  # pragma: no cover - scipy ships with the toolkit's dependencies
        raise ImatError(f"file {path}: reading meta.mat needs scipy (or give map_clsloc.txt)") from None
    try:
        synsets = scipy.io.loadmat(str(path), squeeze_me=True)["synsets"]
        ids = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets.ravel()}
        words = {str(s["WNID"]): str(s["words"]) for s in synsets.ravel() if "words" in s.dtype.names}
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise ImatError(f"file {path}: not a devkit meta.mat with 'synsets' ({exc})") from None
    return ids, words


def read_ground_truth(path: Path) -> tuple[list[str], dict[str, str]]:
    """The devkit ground truth as one wnid per validation image (line n = image n)."""
    mapping_path = find_near(path.parent, ID_MAPPINGS, levels=1)
    if mapping_path is None:
        raise ImatError(
            f"file {path}: no ILSVRC2012_ID -> wnid mapping beside it (expected {', '.join(ID_MAPPINGS)})"
        )
    mapping, names = read_id_mapping(mapping_path)
    wnids: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        if not text.isdigit():
            raise ImatError(f"file {path}: line {n}: expected an ILSVRC2012_ID, got {text!r}")
        if int(text) not in mapping:
            raise ImatError(f"file {path}: line {n}: ILSVRC2012_ID {text} is not in {mapping_path}")
        wnids.append(mapping[int(text)])
    return wnids, names


def read_loc_solution(path: Path) -> dict[str, str]:
    """Kaggle ``LOC_val_solution.csv`` as ImageId -> wnid (the first token of PredictionString)."""
    header = read_header(path)
    if "ImageId" not in header or "PredictionString" not in header:
        raise ImatError(
            f"file {path}: expected the header ImageId,PredictionString, got {','.join(header)!r}"
        )
    labels: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        for n, row in enumerate(csv.DictReader(fh), start=2):
            image_id = (row.get("ImageId") or "").strip()
            tokens = (row.get("PredictionString") or "").split()
            if not image_id:
                raise ImatError(f"file {path}: line {n}: empty ImageId")
            labels[image_id] = tokens[0] if tokens else ""
    return labels


def _names_near(start: Path) -> dict[str, str]:
    return read_synset_names(find_near(start, (SYNSET_MAPPING,)))


def read_imagenet(path: Path, split: str, labels_required: bool = True) -> SplitData:
    if path.is_dir():
        return _read_folder(path, split, labels_required)
    if path.name.endswith(".csv"):
        labels = read_loc_solution(path)
        kaggle_val = path.parent / "ILSVRC" / "Data" / "CLS-LOC" / "val"
        ids = list(labels)
        df = make_frame(ids, split, [f"{i}.JPEG" for i in ids], [labels[i] for i in ids])
        base = kaggle_val if kaggle_val.is_dir() else None
        return SplitData(df=df, fmt="imagenet", source=path, base=base, names=_names_near(path.parent))
    wnids, names = read_ground_truth(path)
    ids = [f"ILSVRC2012_val_{n:08d}" for n in range(1, len(wnids) + 1)]
    df = make_frame(ids, split, [f"{i}.JPEG" for i in ids], wnids)
    return SplitData(df=df, fmt="imagenet", source=path, names=names or _names_near(path.parent))


def _read_folder(root: Path, split: str, labels_required: bool) -> SplitData:
    rels = list_images(root)
    if not rels:
        raise ImatError(
            f"folder {root}: no images found (expected {root}/<wnid>/<image> or ILSVRC2012_val_*)"
        )
    nested = [r for r in rels if "/" in r]
    if nested:
        flat = [r for r in rels if "/" not in r]
        if flat:
            raise ImatError(
                f"folder {root}: image {flat[0]!r} is not in a wnid folder (expected {root}/<wnid>/<image>)"
            )
        classes = [r.split("/", 1)[0] for r in rels]
        ids = [Path(r).stem for r in rels]
        df = make_frame(ids, split, rels, classes)
        return SplitData(df=df, fmt="imagenet", source=root, base=root, names=_names_near(root))
    ids = [Path(r).stem for r in rels]
    labels, names = _flat_labels(root, ids, labels_required)
    df = make_frame(ids, split, rels, labels)
    return SplitData(df=df, fmt="imagenet", source=root, base=root, names=names or _names_near(root))


def _flat_labels(root: Path, ids: list[str], labels_required: bool) -> tuple[list[str], dict[str, str]]:
    """Labels for a flat validation folder from the label file found beside it."""
    looks_val = any(_VAL_NUMBER.match(i) for i in ids)
    found = find_near(root, (LOC_SOLUTION, GROUND_TRUTH)) if labels_required or looks_val else None
    if found is None:
        if labels_required:
            raise ImatError(
                f"folder {root}: flat validation images but no labels found beside it "
                f"(expected {LOC_SOLUTION} or {GROUND_TRUTH} in it or a parent folder)"
            )
        return [""] * len(ids), {}
    if found.name == LOC_SOLUTION:
        solution = read_loc_solution(found)
        labels = [solution.get(i, "") for i in ids]
        names: dict[str, str] = {}
    else:
        truth, names = read_ground_truth(found)
        numbers = [_VAL_NUMBER.match(i) for i in ids]
        if all(numbers):
            labels = [
                truth[int(m.group(1)) - 1] if 0 < int(m.group(1)) <= len(truth) else "" for m in numbers
            ]
        elif len(ids) == len(truth):
            labels = list(truth)  # sorted file order = ground-truth line order
        elif not labels_required:
            labels = [""] * len(ids)
        else:
            raise ImatError(
                f"folder {root}: {len(ids)} images but {found} has {len(truth)} lines, and the file names "
                "are not ILSVRC2012_val_<n> (cannot match them)"
            )
    if labels_required and "" in labels:
        raise ImatError(f"file {found}: no label for image {ids[labels.index('')]!r} of folder {root}")
    return labels, names
