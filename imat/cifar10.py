"""CIFAR-10 prepared from files a user can obtain: ``imat data kit cifar10 --from SOURCE --out DIR``.

SOURCE is one of:

- the official python archive, ``cifar-10-python.tar.gz`` (``cifar-10-batches-py/data_batch_1..5``,
  ``test_batch``, ``batches.meta``). Its batches are pickles, so they are read with an unpickler that
  rebuilds only what a batch holds (dicts, lists, bytes, ints, numpy uint8 arrays) and refuses any other
  global: a crafted archive cannot run code. The images are written as JPEG (``quality``, default 75);
- a ``.tar.gz`` / ``.tar`` of an ImageFolder: ``[PREFIX/]{train,test}/<class>/<image>``, e.g. a
  ``cifar10-jpeg/`` folder of JPEGs;
- such an ImageFolder on disk.

DIR receives ``train/<class>/<image>``, ``test/<class>/<image>`` and ``kit.json`` (source, classes,
counts, skipped files): the ImageFolder layout ``configs/cifar10.yaml`` and the benchmarks read (CIFAR's
test split, which has labels, serves as validation). Images that cannot be read, or are larger than
``MAX_PIXELS``, are skipped and counted. DIR is built beside itself and renamed into place, so an
interrupted run leaves no half-written folder; DIR must be new, empty or an earlier ``cifar10`` kit.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from imat.errors import ImatError
from imat.io import write_json

KIT_NAME = "cifar10"
KIT_MARKER = "kit.json"
SPLITS = ("train", "test")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_PIXELS = 100_000_000  # decompression-bomb guard, as the downloader's
MAX_MEMBER_BYTES = 256 * 1024 * 1024  # a CIFAR batch is 30 MB; refuse anything far larger
PICKLE_BATCHES = {f"data_batch_{i}": "train" for i in range(1, 6)} | {"test_batch": "test"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --- the official python archive -------------------------------------------------------------------


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch pickle needs: numpy's array reconstruction, under the module names
    numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) write."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Rebuilds builtin containers and numpy arrays; any other global is refused before it is loaded."""

    def __init__(self, file: io.BufferedIOBase, where: str) -> None:
        super().__init__(file, encoding="bytes")  # the archive was written by Python 2's cPickle
        self.where = where
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise ImatError(f"{self.where}: refusing to unpickle {module}.{name} (not a CIFAR-10 batch)")
        return found


def _load_pickle(data: bytes, where: str) -> dict[Any, Any]:
    try:
        obj = _BatchUnpickler(io.BytesIO(data), where).load()
    except ImatError:
        raise
    except Exception as exc:  # any malformed stream: truncated, wrong protocol, bad opcodes
        raise ImatError(f"{where}: not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ImatError(f"{where}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch_arrays(batch: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 RGB images and (N,) labels, after checking shapes and values."""
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ImatError(f"{where}: 'data' must be a uint8 array of shape (N, 3072)")
    if not isinstance(labels, list) or len(labels) != len(data):
        raise ImatError(f"{where}: 'labels' must be a list with one label per image")
    y = np.asarray(labels)
    if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() >= len(CLASSES))):
        raise ImatError(f"{where}: labels must be integers in 0..{len(CLASSES) - 1}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y.astype(np.int64)


def _class_names(meta: dict[str, Any] | None, where: str) -> tuple[str, ...]:
    if meta is None:
        return CLASSES
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != len(CLASSES):
        raise ImatError(f"{where}: 'label_names' must list {len(CLASSES)} class names")
    decoded = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    for name in decoded:
        if not _SAFE_NAME.match(name):
            raise ImatError(f"{where}: class name {name!r} is not a plain folder name")
    return decoded


def _write_pickle_archive(tar: tarfile.TarFile, source: Path, out: Path, quality: int) -> dict[str, Any]:
    members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
    missing = [n for n in PICKLE_BATCHES if n not in members]
    if missing:
        raise ImatError(f"{source}: not the CIFAR-10 python archive (missing {', '.join(missing)})")

    def read(name: str) -> bytes:
        member = members[name]
        if member.size > MAX_MEMBER_BYTES:
            raise ImatError(f"{source}: {member.name} is {member.size} bytes, too large for a CIFAR-10 batch")
        handle = tar.extractfile(member)
        assert handle is not None  # a regular file
        return handle.read()

    meta = _load_pickle(read("batches.meta"), f"{source}:batches.meta") if "batches.meta" in members else None
    classes = _class_names(meta, f"{source}:batches.meta")
    counts: Counter[str] = Counter()
    for name, split in PICKLE_BATCHES.items():
        where = f"{source}:{members[name].name}"
        images, labels = _batch_arrays(_load_pickle(read(name), where), where)
        for image, label in zip(images, labels, strict=True):
            ok, buf = cv2.imencode(
                ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
            )
            if not ok:  # pragma: no cover - encoding a valid uint8 array does not fail
                raise ImatError(f"{where}: JPEG encoding failed")
            folder = out / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{counts[split]}.jpg").write_bytes(buf.tobytes())
            counts[split] += 1
    return {"source_kind": "cifar-10-python", "classes": list(classes), "quality": quality, "skipped": 0}


# --- ImageFolder sources: a tar of one, or one on disk ----------------------------------------------


def _split_class_file(parts: tuple[str, ...]) -> tuple[str, str, str] | None:
    """(split, class, file) for a path ``[PREFIX/...]split/class/file`` with a known split and suffix."""
    if len(parts) < 3 or parts[-3] not in SPLITS or Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    split, cls, name = parts[-3:]
    if not (_SAFE_NAME.match(cls) and _SAFE_NAME.match(name)):
        return None
    return split, cls, name


def _readable_image(data: bytes) -> bool:
    """True when the bytes decode to an image of at most MAX_PIXELS (header checked before decoding)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                return False
            im.verify()
        return True
    except Exception:  # any unreadable, truncated or unsupported file is skipped and counted
        return False


def _folder_entries(root: Path) -> Iterator[tuple[tuple[str, ...], Path]]:
    for dirpath, _dirs, files in os.walk(root):
        for name in sorted(files):
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path.relative_to(root).parts, path


def _write_image_folder(
    entries: Iterator[tuple[tuple[str, ...], Any]],
    read: Callable[[Any], bytes | None],
    source: Path,
    out: Path,
) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    classes: dict[str, set[str]] = {s: set() for s in SPLITS}
    prefixes: set[tuple[str, ...]] = set()
    skipped = 0
    for parts, handle in entries:
        found = _split_class_file(parts)
        if found is None:
            continue
        split, cls, name = found
        prefixes.add(parts[:-3])
        data = read(handle)
        if data is None or not _readable_image(data):
            skipped += 1
            continue
        folder = out / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        classes[split].add(cls)
        counts[split] += 1
    if len(prefixes) > 1:
        shown = ", ".join("/".join(p) or "." for p in sorted(prefixes))
        raise ImatError(f"{source}: more than one image folder inside ({shown}); give one")
    if not counts["train"]:
        raise ImatError(
            f"{source}: no images under train/<class>/ (expected [PREFIX/]{{train,test}}/<class>/<image>)"
        )
    extra = sorted(classes["test"] - classes["train"])
    if extra:
        raise ImatError(f"{source}: test classes without training images: {', '.join(extra)}")
    return {"classes": sorted(classes["train"]), "skipped": skipped}


def _read_member(tar: tarfile.TarFile) -> Callable[[tarfile.TarInfo], bytes | None]:
    def read(member: tarfile.TarInfo) -> bytes | None:
        if member.size > MAX_MEMBER_BYTES:
            return None
        handle = tar.extractfile(member)
        return handle.read() if handle is not None else None

    return read


def _read_file(path: Path) -> bytes | None:
    try:
        if path.stat().st_size > MAX_MEMBER_BYTES:
            return None
        return path.read_bytes()
    except OSError:
        return None


# --- the command's entry point ---------------------------------------------------------------------


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ImatError(f"kit output is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()):
        marker = out / KIT_MARKER
        try:
            previous = json.loads(marker.read_text(encoding="utf-8")).get("kit") if marker.is_file() else None
        except (OSError, ValueError):
            previous = None
        if previous != KIT_NAME:
            raise ImatError(f"refusing to replace a non-empty folder that is not a cifar10 kit: {out}")


def write_cifar10(
    source: str | os.PathLike[str], out_dir: str | os.PathLike[str], quality: int = 75
) -> dict[str, Any]:
    """Prepare CIFAR-10 from ``source`` into ``out_dir`` (see the module docstring); returns kit.json."""
    src = Path(source).expanduser()
    out = Path(out_dir).expanduser().resolve()
    if not 1 <= int(quality) <= 100:
        raise ImatError(f"quality must be between 1 and 100, got {quality}")
    if not src.exists():
        raise ImatError(f"CIFAR-10 source not found: {src}")
    _check_out(out)
    work = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        if src.is_dir():
            info = {"source_kind": "image-folder"} | _write_image_folder(
                _folder_entries(src), _read_file, src, work
            )
        else:
            try:
                tar = tarfile.open(src)  # noqa: SIM115 - closed below; gz, bz2, xz or plain tar
            except (tarfile.TarError, OSError) as exc:
                raise ImatError(f"{src}: not a tar archive or a folder ({exc})") from None
            with tar:
                names = {Path(m.name).name for m in tar.getmembers() if m.isfile()}
                if "data_batch_1" in names or "test_batch" in names:
                    info = _write_pickle_archive(tar, src, work, int(quality))
                else:
                    entries = ((tuple(Path(m.name).parts), m) for m in tar.getmembers() if m.isfile())
                    info = {"source_kind": "image-folder-archive"} | _write_image_folder(
                        entries, _read_member(tar), src, work
                    )
        counts = {
            s: sum(1 for _ in (work / s).rglob("*") if _.is_file()) for s in SPLITS if (work / s).is_dir()
        }
        info = {"kit": KIT_NAME, "source": str(src.resolve()), **info, "counts": counts}
        write_json(work / KIT_MARKER, info)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return info


def cifar10_summary(info: dict[str, Any], out_dir: str | os.PathLike[str]) -> str:
    """A few lines for the terminal: where the folder is, what it holds and how to use it."""
    out = Path(out_dir).expanduser().resolve()
    lines = [
        f"kit cifar10 -> {out}",
        f"  source: {info['source']} ({info['source_kind']}), {len(info['classes'])} classes",
    ]
    lines += [f"  {split:<5} {n:>6} images  {out / split}" for split, n in info["counts"].items()]
    if info.get("skipped"):
        lines.append(f"  skipped {info['skipped']} unreadable or oversized images")
    lines.append(f"  use: configs/cifar10.yaml data.train={out}/train data.val={out}/test data.images={out}")
    return "\n".join(lines)
