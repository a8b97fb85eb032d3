"""`imat data inspect`: counts, image file checks, the report and the CLI's exit codes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from imat.app.cli import main
from imat.config import DataConfig
from imat.errors import ImatError
from imat.formats import build_manifest
from imat.inspection import check_image, format_report, inspect_input
from imat.manifest import save_manifest


def jpeg(size: int = 24, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


@pytest.fixture()
def kit(tmp_path: Path) -> Path:
    """Furniture-style train file: image 1 good, 2 missing, 3 corrupt, 4 a 4x4 placeholder, 5 empty."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "1.jpg").write_bytes(jpeg())
    (images / "3.jpg").write_bytes(jpeg()[:40] + b"garbage")
    (images / "4.jpg").write_bytes(jpeg(size=4))
    (images / "5.jpg").write_bytes(b"")
    doc = {
        "images": [{"url": [f"http://x/{i}"], "image_id": i} for i in range(1, 6)],
        "annotations": [{"image_id": i, "label_id": 1 if i < 4 else 2} for i in range(1, 6)],
    }
    (tmp_path / "train.json").write_text(json.dumps(doc))
    return tmp_path


def test_check_image_kinds(kit):
    images = kit / "images"
    assert check_image(str(images / "1.jpg")) == ("ok", "")
    assert check_image(str(images / "2.jpg"))[0] == "missing"
    assert check_image(str(images / "3.jpg"))[0] == "corrupt"
    assert check_image(str(images / "4.jpg")) == ("tiny", "4x4 px")
    assert check_image(str(images / "5.jpg")) == ("empty", "0 bytes")
    truncated = images / "t.jpg"
    data = jpeg(size=64)
    truncated.write_bytes(data[: len(data) - 200])
    assert check_image(str(truncated))[0] == "corrupt"
    assert check_image(str(images / "4.jpg"), min_side=2)[0] == "ok"


def test_inspect_competition_file(kit):
    report = inspect_input(kit / "train.json", images=kit / "images", workers=2, progress=False)
    assert report.kind == "furniture2018"
    assert report.split_counts() == {"train": 5}
    table = report.class_table()
    assert table[["label", "total"]].values.tolist() == [["1", 3], ["2", 2]]
    problems = dict(zip(report.problems["image_id"], report.problems["problem"], strict=True))
    assert problems == {"2": "missing", "3": "corrupt", "4": "tiny", "5": "empty"}
    assert report.checked == 5
    text = format_report(report)
    assert "1 missing" in text and "1 corrupt" in text


def test_inspect_without_images_counts_only(kit):
    report = inspect_input(kit / "train.json", progress=False)
    assert report.checked == 0 and report.problems.empty
    assert "--images" in report.note


def test_inspect_folder_cli_writes_reports(tmp_path, capsys):
    tree = tmp_path / "tree"
    (tree / "cat").mkdir(parents=True)
    (tree / "dog").mkdir()
    (tree / "cat" / "good.jpg").write_bytes(jpeg())
    (tree / "dog" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "reports" / "inspect.json"
    assert main(["data", "inspect", str(tree), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "imagefolder" in printed and "corrupt" in printed
    report = json.loads(out.read_text())
    assert report["splits"] == {"train": 2}
    assert [(p["image_id"], p["problem"]) for p in report["problems"]] == [("dog/corrupt.jpg", "corrupt")]
    assert not list(out.parent.glob(".*tmp"))  # written atomically, no temp left
    out_csv = tmp_path / "problems.csv"
    assert main(["data", "inspect", str(tree), "--out", str(out_csv)]) == 0
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["problem"] for r in rows] == ["corrupt"]


def test_inspect_missing_path_cli(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("imat data inspect: error:") and "nope.json" in err[0]


def test_inspect_manifest_and_config(kit, tmp_path, capsys):
    df, classes = build_manifest(DataConfig(train=str(kit / "train.json"), images=str(kit / "images")))
    manifest = save_manifest(df, classes, tmp_path / "run" / "data")
    report = inspect_input(manifest, images=kit / "images", progress=False)
    assert report.kind == "manifest"
    assert sorted(report.problems["problem"]) == ["corrupt", "empty", "missing", "tiny"]
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  train: {kit / 'train.json'}\n  images: {kit / 'images'}\n")
    assert main(["data", "inspect", str(config)]) == 0
    assert "4 image" not in capsys.readouterr().err  # errors are not printed for problems
    report = inspect_input(config, progress=False)
    assert report.kind == "config" and report.checked == 5 and len(report.problems) == 4


def test_many_classes_head_and_tail(tmp_path):
    tree = tmp_path / "tree"
    for c in range(30):
        for k in range(c % 5 + 1):
            (tree / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
            (tree / f"c{c:02d}" / f"{k}.jpg").write_bytes(b"x")
    report = inspect_input(tree, check=False)
    text = format_report(report, head=5)
    assert "... 20 more classes ..." in text
    assert report.class_table()["total"].iloc[0] == 5


def test_missing_images_folder_is_an_error(kit):
    with pytest.raises(ImatError) as exc:
        inspect_input(kit / "train.json", images=kit / "nowhere")
    assert "nowhere" in str(exc.value)


def test_inspect_competition_folder_reads_every_split(kit, capsys):
    """A Kaggle folder (train.json, validation.json, test.json, images/) is inspected as one data set."""
    doc = {
        "images": [{"url": [f"http://x/{i}"], "image_id": i} for i in (6, 7)],
        "annotations": [{"image_id": i, "label_id": 2} for i in (6, 7)],
    }
    (kit / "validation.json").write_text(json.dumps(doc))
    (kit / "test.json").write_text(json.dumps({"images": [{"url": ["http://x/8"], "image_id": 8}]}))
    (kit / "images" / "6.jpg").write_bytes(jpeg(seed=6))
    report = inspect_input(kit, workers=2, progress=False)
    assert report.kind == "furniture2018"
    assert report.images_root == str(kit / "images")  # FOLDER/images by default
    assert report.split_counts() == {"train": 5, "val": 2, "test": 1}
    problems = dict(zip(report.problems["image_id"], report.problems["problem"], strict=True))
    assert problems == {
        "2": "missing",
        "3": "corrupt",
        "4": "tiny",
        "5": "empty",
        "7": "missing",
        "8": "missing",
    }
    assert main(["data", "inspect", str(kit)]) == 0
    assert "val" in capsys.readouterr().out
