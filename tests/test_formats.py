"""Competition-format readers, detection, manifest building and their one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from imat.config import DataConfig, RunConfig
from imat.errors import ImatError
from imat.formats import build_manifest, detect_format, read_source, read_split, resolve_path, write_manifest
from imat.manifest import COLUMNS, load_manifest


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def touch(path: Path, data: bytes = b"\xff\xd8fake\xff\xd9") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def furniture(path: Path, labels: dict[int, int] | None, ids: list[int]) -> Path:
    doc = {"images": [{"url": [f"https://img.example.com/{i}.jpg"], "image_id": i} for i in ids]}
    if labels is not None:
        doc["annotations"] = [{"image_id": i, "label_id": labels[i]} for i in ids]
    return write_json(path, doc)


def one_line_error(excinfo, *parts: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


# ---------------------------------------------------------------- iMaterialist


def test_furniture_labels_round_trip_1_to_128(tmp_path):
    ids = list(range(1, 129))
    train = furniture(tmp_path / "train.json", {i: 129 - i for i in ids}, ids)
    val = furniture(tmp_path / "validation.json", {1000 + i: i for i in ids}, [1000 + i for i in ids])
    test = furniture(tmp_path / "test.json", None, [5001, 5002])
    assert detect_format(train) == detect_format(test) == "furniture2018"
    rows = read_split(train, "train")
    assert list(rows.columns) == COLUMNS
    first = rows.iloc[0]
    assert (first["image_id"], first["path"], first["source_label"], first["label"]) == (
        "1",
        "1.jpg",
        "128",
        -1,
    )
    assert first["url"] == "https://img.example.com/1.jpg"

    df, classes = build_manifest(DataConfig(train=str(train), val=str(val), test=str(test), images="imgs"))
    assert classes.num_classes == 128 and classes.label_type == "int"
    trained = df[df["split"] != "test"]
    assert trained["label"].tolist() == [int(s) - 1 for s in trained["source_label"]]  # 1..128 -> 0..127
    assert [classes.to_source(i) for i in range(128)] == list(range(1, 129))  # and back
    assert all(classes.to_source(classes.to_index(s)) == int(s) for s in trained["source_label"])
    assert (df.loc[df["split"] == "test", "label"] == -1).all()
    assert df["split"].value_counts().to_dict() == {"train": 128, "val": 128, "test": 2}


def test_fashion_real_spelling_multi_label_is_read_but_refused_for_training(tmp_path):
    doc = {
        "images": [
            {"url": "https://contestimg.wish.com/a-large", "imageId": "1"},
            {"url": "https://contestimg.wish.com/b-large", "imageId": "2"},
        ],
        "annotations": [
            {"imageId": "1", "labelId": ["17", "66", "105"]},
            {"imageId": "2", "labelId": ["62"]},
        ],
    }
    path = write_json(tmp_path / "fashion_train.json", doc)
    assert detect_format(path) == "fashion2018"
    data = read_source(path, "train")
    assert data.multi_label
    assert data.df["source_label"].tolist() == ["17 66 105", "62"]
    assert data.df["path"].tolist() == ["1.jpg", "2.jpg"]
    assert data.df["url"].tolist() == [
        "https://contestimg.wish.com/a-large",
        "https://contestimg.wish.com/b-large",
    ]
    with pytest.raises(ImatError) as exc:
        build_manifest(DataConfig(train=str(path)))
    one_line_error(exc, str(path), "multi-label", "'1'")
    # as a test file (download, inspect, predict) it is fine
    df, _ = build_manifest(DataConfig(test=str(path)))
    assert df["label"].tolist() == [-1, -1]


def test_fashion_single_label_and_doc_spelling(tmp_path):
    real = {
        "images": [{"url": "u1", "imageId": "7"}, {"url": "u2", "imageId": "8"}],
        "annotations": [{"imageId": "7", "labelId": ["3"]}, {"imageId": "8", "labelId": ["12"]}],
    }
    docs = {  # the documentation's spelling: image_id / label_id (a list) / url a list
        "images": [{"url": ["u3"], "image_id": 9}],
        "annotations": [{"image_id": 9, "label_id": ["12"]}],
    }
    train = write_json(tmp_path / "train.json", real)
    val = write_json(tmp_path / "val.json", docs)
    assert detect_format(val) == "fashion2018"
    df, classes = build_manifest(DataConfig(train=str(train), val=str(val)))
    assert classes.source_labels == ["3", "12"]
    assert df["label"].tolist() == [0, 1, 1]
    assert df["url"].tolist() == ["u1", "u2", "u3"]
    test = write_json(tmp_path / "test.json", {"images": [{"url": "u", "imageId": "99"}]})
    assert detect_format(test) == "fashion2018"
    assert read_split(test, "test")["image_id"].tolist() == ["99"]


def test_product2019_keeps_jpg_ids(tmp_path):
    train = write_json(
        tmp_path / "train.json",
        {
            "images": [
                {"id": "aa.jpg", "url": "http://x/aa", "class": 2018},
                {"id": "bb.jpg", "url": "http://x/bb", "class": 0},
                {"id": "cc.jpg", "url": "http://x/cc", "class": 7},
            ]
        },
    )
    val = write_json(tmp_path / "val.json", {"images": [{"id": "dd.jpg", "url": "http://x/dd", "class": 7}]})
    test = write_json(tmp_path / "test.json", {"images": [{"id": "ee.jpg", "url": "http://x/ee"}]})
    assert detect_format(train) == detect_format(test) == "product2019"
    df, classes = build_manifest(
        DataConfig(train=str(train), val=str(val), test=str(test), images=str(tmp_path))
    )
    assert classes.source_labels == ["0", "7", "2018"]
    assert df["image_id"].tolist() == ["aa.jpg", "bb.jpg", "cc.jpg", "dd.jpg", "ee.jpg"]
    assert df["path"].tolist() == df["image_id"].tolist()
    assert df["label"].tolist() == [2, 0, 1, 1, -1]
    assert resolve_path(df, tmp_path).iloc[0] == str(tmp_path / "aa.jpg")


def test_coco_with_category_names(tmp_path):
    doc = {
        "images": [
            {"id": 10, "file_name": "train/a.jpg"},
            {"id": 11, "file_name": "train/b.jpg"},
            {"id": 12, "file_name": "train/c.jpg"},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 5},
            {"id": 2, "image_id": 11, "category_id": 3},
            {"id": 3, "image_id": 12, "category_id": 5},
            {"id": 4, "image_id": 12, "category_id": 5},  # a repeat that agrees is fine
        ],
        "categories": [{"id": 3, "name": "fern"}, {"id": 5, "name": "moss"}],
    }
    path = write_json(tmp_path / "train2019.json", doc)
    assert detect_format(path) == "coco"
    df, classes = build_manifest(DataConfig(train=str(path)))
    assert df["path"].tolist() == ["train/a.jpg", "train/b.jpg", "train/c.jpg"]
    assert df["image_id"].tolist() == ["10", "11", "12"]
    assert df["label"].tolist() == [1, 0, 1]
    assert classes.names == ["fern", "moss"]
    doc["annotations"].append({"id": 5, "image_id": 10, "category_id": 3})
    with pytest.raises(ImatError) as exc:
        read_split(write_json(tmp_path / "bad.json", doc), "train")
    one_line_error(exc, "bad.json", "'10'", "category_id")


# ---------------------------------------------------------------- ImageNet

WNIDS = ["n01440764", "n01443537", "n02119789"]  # sorted: class index 0, 1, 2


def imagenet_train(root: Path) -> Path:
    for wnid in WNIDS:
        for k in range(2):
            touch(root / "train" / wnid / f"{wnid}_{k}.JPEG")
    return root / "train"


def flat_val(folder: Path, n: int) -> Path:
    for i in range(1, n + 1):
        touch(folder / f"ILSVRC2012_val_{i:08d}.JPEG")
    return folder


def test_imagenet_train_folders_sorted_wnids(tmp_path):
    train = imagenet_train(tmp_path)
    assert detect_format(train) == "imagenet"
    rows = read_split(train, "train")
    assert rows["path"].iloc[0] == "n01440764/n01440764_0.JPEG"
    assert rows["image_id"].iloc[0] == "n01440764_0"
    df, classes = build_manifest(DataConfig(train=str(train)))
    assert classes.source_labels == WNIDS
    assert df.groupby("source_label")["label"].first().to_dict() == {w: i for i, w in enumerate(WNIDS)}
    files = resolve_path(df, None)  # no data.images: folder rows are stored absolute
    assert all(os.path.isfile(f) for f in files)
    df2, _ = build_manifest(DataConfig(train=str(train), images=str(tmp_path)))
    assert df2["path"].iloc[0] == "train/n01440764/n01440764_0.JPEG"  # inside data.images: relative
    assert resolve_path(df2, tmp_path).tolist() == files.tolist()


def test_imagenet_flat_val_with_devkit_ground_truth_and_text_mapping(tmp_path):
    train = imagenet_train(tmp_path)
    val = flat_val(tmp_path / "val", 4)
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    # devkit ID order is not the sorted-wnid order: ID 1 = n02119789, 2 = n01440764, 3 = n01443537
    (devkit / "map_clsloc.txt").write_text("n02119789 1 kit_fox\nn01440764 2 tench\nn01443537 3 goldfish\n")
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n3\n1\n")
    assert detect_format(val) == "imagenet"
    df, classes = build_manifest(DataConfig(train=str(train), val=str(val)))
    v = df[df["split"] == "val"]
    assert v["image_id"].tolist() == [f"ILSVRC2012_val_{i:08d}" for i in range(1, 5)]
    assert v["source_label"].tolist() == ["n02119789", "n01440764", "n01443537", "n02119789"]
    assert v["label"].tolist() == [2, 0, 1, 2]
    assert classes.names == ["tench", "goldfish", "kit_fox"]
    # the ground-truth file itself as data.val: paths relative to data.images
    gt = devkit / "ILSVRC2012_validation_ground_truth.txt"
    assert detect_format(gt) == "imagenet"
    rows = read_split(gt, "val")
    assert rows["path"].tolist()[:2] == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"]
    assert rows["source_label"].tolist()[:2] == ["n02119789", "n01440764"]


def test_imagenet_devkit_meta_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    val = flat_val(tmp_path / "val", 2)
    synsets = np.array(
        [(2, "n01440764", "tench"), (1, "n01443537", "goldfish")],
        dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O")],
    )
    scipy_io.savemat(str(tmp_path / "meta.mat"), {"synsets": synsets})
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n")
    rows = read_split(val, "val")
    assert rows["source_label"].tolist() == ["n01440764", "n01443537"]


def test_imagenet_kaggle_loc_val_solution(tmp_path):
    kaggle = tmp_path / "kaggle"
    cls_loc = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    train = imagenet_train(cls_loc)
    val = flat_val(cls_loc / "val", 3)
    (kaggle / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn02119789 kit fox, Vulpes macrotis\n"
    )
    (kaggle / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000002,n01443537 20 31 400 310 n01443537 390 60 470 200\n"
        "ILSVRC2012_val_00000001,n02119789 1 2 3 4\n"
        "ILSVRC2012_val_00000003,n01440764 1 2 3 4\n"
    )
    df, classes = build_manifest(DataConfig(train=str(train), val=str(val)))
    v = df[df["split"] == "val"]
    assert v["source_label"].tolist() == ["n02119789", "n01443537", "n01440764"]
    assert v["label"].tolist() == [2, 1, 0]
    assert classes.names[0] == "tench, Tinca tinca"
    # data.val = the CSV itself: images found in ILSVRC/Data/CLS-LOC/val beside it
    solution = kaggle / "LOC_val_solution.csv"
    assert detect_format(solution) == "imagenet"
    df2, _ = build_manifest(DataConfig(train=str(train), val=str(solution)))
    files = resolve_path(df2[df2["split"] == "val"], None)
    assert all(os.path.isfile(f) for f in files)
    assert Path(files.iloc[0]).name == "ILSVRC2012_val_00000002.JPEG"


def test_imagenet_val_in_class_folders(tmp_path):
    train = imagenet_train(tmp_path)
    for wnid in WNIDS[:2]:
        touch(tmp_path / "val" / wnid / f"ILSVRC2012_val_{wnid}.JPEG")
    df, _ = build_manifest(DataConfig(train=str(train), val=str(tmp_path / "val")))
    assert df.loc[df["split"] == "val", "label"].tolist() == [0, 1]


def test_imagenet_flat_val_without_labels_is_an_error_but_flat_test_is_fine(tmp_path):
    val = flat_val(tmp_path / "val", 2)
    with pytest.raises(ImatError) as exc:
        read_split(val, "val")
    one_line_error(exc, str(val), "LOC_val_solution.csv")
    test = tmp_path / "test"
    touch(test / "ILSVRC2012_test_00000001.JPEG")
    rows = read_split(test, "test")
    assert rows["source_label"].tolist() == [""]


# ---------------------------------------------------------------- ImageFolder and CSV


def test_imagefolder_and_flat_test_folder(tmp_path):
    for cls, n in (("cat", 2), ("dog", 1)):
        for k in range(n):
            touch(tmp_path / "train" / cls / f"{k}.png")
    touch(tmp_path / "train" / "dog" / "notes.txt", b"ignored")
    touch(tmp_path / "test" / "x.jpg")
    assert detect_format(tmp_path / "train") == "imagefolder"
    df, classes = build_manifest(DataConfig(train=str(tmp_path / "train"), test=str(tmp_path / "test")))
    assert classes.source_labels == ["cat", "dog"]
    assert df["image_id"].tolist() == ["cat/0.png", "cat/1.png", "dog/0.png", "x.jpg"]
    assert df["label"].tolist() == [0, 0, 1, -1]
    assert resolve_path(df, None).tolist()[-1] == str(tmp_path / "test" / "x.jpg")


def test_csv_paths_relative_to_its_folder_or_images(tmp_path):
    touch(tmp_path / "imgs" / "a.jpg")
    table = tmp_path / "labels" / "train.csv"
    table.parent.mkdir()
    table.write_text("path,label,image_id\n../imgs/a.jpg,007,A\n../imgs/b.jpg,7,B\n")
    assert detect_format(table) == "csv"
    df, classes = build_manifest(DataConfig(train=str(table)))
    assert classes.source_labels == ["007", "7"]  # text labels keep their spelling
    assert df["image_id"].tolist() == ["A", "B"]
    assert os.path.isfile(resolve_path(df, None).iloc[0])
    test = tmp_path / "test.csv"
    test.write_text("path\na.jpg\n")
    df2, _ = build_manifest(DataConfig(test=str(test), images=str(tmp_path / "imgs")))
    assert df2["path"].tolist() == ["a.jpg"]
    assert os.path.isfile(resolve_path(df2, tmp_path / "imgs").iloc[0])


def test_write_manifest(tmp_path):
    train = furniture(tmp_path / "train.json", {1: 5, 2: 9}, [1, 2])
    cfg = RunConfig(run_dir=str(tmp_path / "run"), data=DataConfig(train=str(train)))
    out = write_manifest(cfg)
    assert out == tmp_path / "run" / "data" / "manifest.parquet"
    df, classes = load_manifest(out)
    assert df["label"].tolist() == [0, 1]
    assert classes.to_source(1) == 9


def test_forced_format(tmp_path):
    train = furniture(tmp_path / "train.json", {1: 5}, [1])
    df, _ = build_manifest(DataConfig(train=str(train), format="furniture2018"))
    assert df["source_label"].tolist() == ["5"]
    with pytest.raises(ImatError) as exc:
        build_manifest(DataConfig(train=str(train), format="imagefolder"))
    one_line_error(exc, str(train), "imagefolder")


# ---------------------------------------------------------------- bad input


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"images": [\n  {"image_id": 1,}\n]}')
    with pytest.raises(ImatError) as exc:
        read_split(path, "train")
    one_line_error(exc, str(path), "invalid JSON", "line 2")


@pytest.mark.parametrize(
    ("doc", "fmt", "parts"),
    [
        ({"annotations": []}, "furniture2018", ["missing key 'images'"]),
        ({"images": {"a": 1}}, "product2019", ["'images' must be a list"]),
        ({"images": [{"url": ["u"]}]}, "furniture2018", ["images[0]", "'image_id'"]),
        (
            {"images": [{"url": ["u"], "image_id": 1}], "annotations": [{"image_id": 2, "label_id": 3}]},
            "auto",
            ["annotations[0]", "'2'", "not in 'images'"],
        ),
        ({"images": [{"url": ["u"], "image_id": 1}], "annotations": []}, "auto", ["'1'", "no label"]),
        (
            {"images": [{"url": ["u"], "image_id": 1}, {"url": ["v"], "image_id": 1}]},
            "auto",
            ["image id '1'", "more than once"],
        ),
        ({"info": {}}, "auto", ["cannot tell the format", "expected one of"]),
        ([1, 2], "coco", ["top level"]),
    ],
)
def test_bad_json_inputs_are_one_line_errors(tmp_path, doc, fmt, parts):
    path = write_json(tmp_path / "train.json", doc)
    with pytest.raises(ImatError) as exc:
        build_manifest(DataConfig(train=str(path), format=fmt))
    one_line_error(exc, str(path), *parts)


def test_val_label_unseen_in_train(tmp_path):
    train = furniture(tmp_path / "train.json", {1: 5}, [1])
    val = furniture(tmp_path / "val.json", {2: 6}, [2])
    with pytest.raises(ImatError) as exc:
        build_manifest(DataConfig(train=str(train), val=str(val)))
    one_line_error(exc, str(val), "'6'", "not among the 1 classes")


def test_csv_errors(tmp_path):
    no_header = tmp_path / "a.csv"
    no_header.write_text("x.jpg,3\ny.jpg,4\n")
    with pytest.raises(ImatError) as exc:
        detect_format(no_header)
    one_line_error(exc, str(no_header), "cannot tell the format")
    with pytest.raises(ImatError) as exc:
        read_split(no_header, "train", fmt="csv")
    one_line_error(exc, str(no_header), "'path'", "'label'")
    no_label = tmp_path / "b.csv"
    no_label.write_text("path\nx.jpg\n")
    with pytest.raises(ImatError) as exc:
        read_split(no_label, "train")
    one_line_error(exc, str(no_label), "'label'")
    empty = tmp_path / "c.csv"
    empty.write_text("")
    with pytest.raises(ImatError) as exc:
        read_split(empty, "train")
    one_line_error(exc, str(empty), "empty CSV")


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImatError) as exc:
        read_split(empty, "train")
    one_line_error(exc, str(empty), "no images")
    (tmp_path / "only_dirs" / "cat").mkdir(parents=True)
    with pytest.raises(ImatError) as exc:
        read_split(tmp_path / "only_dirs", "train")
    one_line_error(exc, "only_dirs", "no images")
    mixed = tmp_path / "mixed"
    touch(mixed / "cat" / "a.jpg")
    touch(mixed / "loose.jpg")
    with pytest.raises(ImatError) as exc:
        read_split(mixed, "train")
    one_line_error(exc, str(mixed), "'loose.jpg'", "class folder")
    with pytest.raises(ImatError) as exc:
        read_split(tmp_path / "missing", "train")
    one_line_error(exc, "missing", "not found")


def test_nothing_configured_and_relative_paths_without_root(tmp_path):
    with pytest.raises(ImatError) as exc:
        build_manifest(DataConfig())
    one_line_error(exc, "data.train")
    df = pd.DataFrame({"path": ["a.jpg"]})
    with pytest.raises(ImatError) as exc:
        resolve_path(df, None)
    one_line_error(exc, "'a.jpg'", "--images")
