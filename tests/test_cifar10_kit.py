"""`imat data kit cifar10 --from SOURCE --out DIR`: the official python archive (read with a restricted
unpickler), a tar.gz of a JPEG ImageFolder and a plain ImageFolder all become the ImageFolder layout that
configs/cifar10.yaml reads; a crafted pickle is refused without running anything."""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from imat.app.cli import main
from imat.cifar10 import CLASSES, write_cifar10
from imat.config import load_config
from imat.errors import ImatError
from imat.formats import read_source

ROOT = Path(__file__).resolve().parents[1]


def _batch(n: int, seed: int) -> tuple[dict, np.ndarray, list[int]]:
    # one flat colour per image, red 200, green by image, blue 20: JPEG keeps it, and a channel swap shows
    planes = [
        np.full((n, 1024), 200),
        np.repeat(np.arange(n)[:, None] * 10 + seed, 1024, axis=1),
        np.full((n, 1024), 20),
    ]
    data = np.concatenate(planes, axis=1).astype(np.uint8)  # CIFAR's rows: 1024 red, 1024 green, 1024 blue
    labels = [int(i % 10) for i in range(n)]
    batch = {
        b"batch_label": b"x",
        b"labels": labels,
        b"data": data,
        b"filenames": [b"f%d.png" % i for i in range(n)],
    }
    return batch, data, labels


class _Python2Pickler(pickle._Pickler):  # the pure-Python pickler, whose opcodes can be overridden
    """Writes bytes as Python 2's cPickle wrote its str (BINSTRING), as the official archive holds them;
    Python 3's protocol 2 would write them through _codecs.encode, which no CIFAR batch needs."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _python2_style(obj: object) -> bytes:
    """A protocol-2 pickle as the official archive has them: Python 2 strings, and numpy.core (numpy 1)
    rather than numpy 2's numpy._core (GLOBAL opcodes are text lines, so the name is swapped in place)."""
    buf = io.BytesIO()
    _Python2Pickler(buf, protocol=2).dump(obj)
    data = buf.getvalue()
    assert b"_codecs" not in data
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _pickle_archive(path: Path, per_batch: int = 10, meta: bool = True, tamper: bytes | None = None) -> dict:
    arrays = {}
    with tarfile.open(path, "w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for k, name in enumerate(names):
            batch, data, labels = _batch(per_batch, k)
            arrays[name] = (data, labels)
            blob = tamper if (tamper is not None and name == "test_batch") else _python2_style(batch)
            _add(tar, f"cifar-10-batches-py/{name}", blob)
        if meta:
            _add(
                tar,
                "cifar-10-batches-py/batches.meta",
                _python2_style({b"label_names": [c.encode() for c in CLASSES]}),
            )
        _add(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
    return arrays


def _jpeg(value: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((32, 32, 3), value, np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 75])
    assert ok
    return buf.tobytes()


def _image_folder(root: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.jpg").write_bytes(_jpeg(40 * i + 10))
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")  # skipped and counted


def test_official_python_archive(tmp_path: Path, capsys) -> None:
    arrays = _pickle_archive(tmp_path / "cifar-10-python.tar.gz")
    out = tmp_path / "cifar10"
    assert (
        main(
            ["data", "kit", "cifar10", "--from", str(tmp_path / "cifar-10-python.tar.gz"), "--out", str(out)]
        )
        == 0
    )
    assert "train" in capsys.readouterr().out
    info = json.loads((out / "kit.json").read_text())
    assert info["source_kind"] == "cifar-10-python" and info["classes"] == list(CLASSES)
    assert info["counts"] == {"train": 50, "test": 10}
    # the first image of data_batch_1 is label 0 -> train/airplane/0.jpg, RGB as stored (channel-first rows)
    first = cv2.cvtColor(cv2.imread(str(out / "train" / "airplane" / "0.jpg")), cv2.COLOR_BGR2RGB)
    expected = arrays["data_batch_1"][0][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert first.shape == (32, 32, 3)
    assert np.abs(first.astype(int) - expected.astype(int)).max() <= 3  # JPEG q75 of a flat colour
    assert first[..., 0].mean() > 190 and first[..., 2].mean() < 30  # red stays red
    assert sorted(p.name for p in (out / "test").iterdir()) == sorted(CLASSES)
    # configs/cifar10.yaml with the data overrides the summary prints reads it as an ImageFolder
    cfg = load_config(
        ROOT / "configs" / "cifar10.yaml",
        [f"data.train={out}/train", f"data.val={out}/test", f"data.images={out}"],
    )
    train = read_source(cfg.data.train, "train", cfg.data.format, cfg.data.images)
    assert len(train.df) == 50 and train.df["source_label"].nunique() == 10


def test_python_archive_without_meta_uses_the_standard_class_names(tmp_path: Path) -> None:
    _pickle_archive(tmp_path / "a.tar.gz", per_batch=2, meta=False)
    info = write_cifar10(tmp_path / "a.tar.gz", tmp_path / "out")
    assert info["classes"] == list(CLASSES) and info["counts"]["test"] == 2


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_a_crafted_pickle_is_refused_and_never_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _pickle_archive(tmp_path / "evil.tar.gz", tamper=pickle.dumps({"data": _Exploit()}, protocol=2))
    with pytest.raises(ImatError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        write_cifar10(tmp_path / "evil.tar.gz", tmp_path / "out")
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "out").exists()  # nothing half-written is left
    assert not list(tmp_path.glob(".out.partial-*"))


def test_jpeg_image_folder_archive(tmp_path: Path) -> None:
    folder = tmp_path / "src" / "cifar10-jpeg"
    _image_folder(folder)
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar10-jpeg")
    out = tmp_path / "prepared"
    assert main(["data", "kit", "cifar10", "--from", str(archive), "--out", str(out)]) == 0
    info = json.loads((out / "kit.json").read_text())
    assert info["source_kind"] == "image-folder-archive" and info["classes"] == ["cat", "dog"]
    assert info["counts"] == {"train": 6, "test": 4} and info["skipped"] == 1
    assert (out / "train" / "dog" / "2.jpg").read_bytes() == (folder / "train" / "dog" / "2.jpg").read_bytes()
    # a second run replaces the earlier kit in place
    assert main(["data", "kit", "cifar10", "--from", str(archive), "--out", str(out)]) == 0


def test_plain_image_folder(tmp_path: Path) -> None:
    _image_folder(tmp_path / "folder")
    info = write_cifar10(tmp_path / "folder", tmp_path / "out")
    assert info["source_kind"] == "image-folder" and info["counts"] == {"train": 6, "test": 4}
    assert not (tmp_path / "out" / "train" / "cat" / "broken.jpg").exists()


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ImatError, match="not found"):
        write_cifar10(tmp_path / "missing.tar.gz", tmp_path / "out")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImatError, match="not a tar archive"):
        write_cifar10(tmp_path / "notes.txt", tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    _image_folder(tmp_path / "folder")
    with pytest.raises(ImatError, match="not a cifar10 kit"):
        write_cifar10(tmp_path / "folder", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImatError, match="no images under train"):
        write_cifar10(tmp_path / "empty", tmp_path / "out2")
    assert main(["data", "kit", "cifar10", "--out", str(tmp_path / "o")]) == 2  # --from is required
    folder = str(tmp_path / "folder")
    assert (
        main(["data", "kit", "cifar10", "--from", folder, "--out", str(tmp_path / "o"), "--limit", "5"]) == 2
    )
    assert main(["data", "kit", "digits", "--from", folder, "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
