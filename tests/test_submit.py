"""predict -> submit -> score round trip, providers, submission formats, validators, prior correction."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from submit_kit import LABELS, make_checkpoint, make_kit

from imat.app.cli import main
from imat.config.stages import ExportConfig
from imat.errors import ImatError
from imat.manifest import ClassMap
from submit.export import export_model
from submit.formats import get_format, make_submission, match_predictions
from submit.inputs import read_images
from submit.predict import read_predictions
from submit.prior import prior_correct, train_frequencies
from submit.runtime import create_session
from submit.validate import check_submission, parse_submission


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("submit")
    k = make_kit(root)
    ckpt = make_checkpoint(root / "best.safetensors", k["images"], k["train_classes"])
    k["onnx"] = root / "student.onnx"
    export_model(
        ckpt, k["onnx"], read_images(k["images"]), cfg=ExportConfig(exporter="legacy", verify_images=20)
    )
    k["root"] = root
    return k


def _solution(path: Path, truth: dict) -> Path:
    path.write_text("id,expected\n" + "".join(f"{i},{label}\n" for i, label in truth.items()))
    return path


def test_round_trip_furniture(kit: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preds = tmp_path / "predictions.parquet"
    args = ["predict", str(kit["onnx"]), str(kit["furniture_test"]), "--out", str(preds)]
    args += [
        "--images",
        str(kit["images"]),
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--save-probs",
        "--no-progress",
    ]
    assert main(args) == 0
    df, info = read_predictions(preds)
    assert info["provider"] == "cpu" and info["topk"] == 3
    assert df["image_id"].tolist() == [str(i) for i in [*range(1, 16), 99]]
    assert df.set_index("image_id").loc[["15", "99"], "missing"].all()  # corrupt and never downloaded
    assert df["missing"].sum() == 2
    ok = df[~df["missing"]]
    assert all(len(x) == 3 and set(x) <= set(LABELS) for x in ok["topk_labels"])
    assert all(np.all(np.diff(s) <= 0) and 0 < s[0] <= 1 for s in ok["topk_scores"])
    assert all(len(p) == 5 and abs(sum(p) - 1) < 1e-4 for p in ok["probs"])
    assert df.loc[df["missing"], "topk_labels"].map(len).eq(0).all()

    sub = tmp_path / "submission.csv"
    args = ["submit", str(preds), "--format", "furniture2018", "--test", str(kit["furniture_test"])]
    args += ["--out", str(sub), "--train", str(kit["furniture_train"])]
    assert main(args) == 0
    lines = sub.read_text().splitlines()
    assert lines[0] == "id,predicted" and len(lines) == 17
    rows = dict(line.split(",") for line in lines[1:])
    assert list(rows) == [str(i) for i in [*range(1, 16), 99]]
    assert rows["15"] == rows["99"] == "3"  # fallback: the most frequent training class (label 3)

    sol = _solution(tmp_path / "solution.csv", kit["truth"])
    out = tmp_path / "score.json"
    assert (
        main(
            [
                "score",
                str(sub),
                "--solution",
                str(sol),
                "--metric",
                "top1",
                "--format",
                "furniture2018",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    score = json.loads(out.read_text())
    # 14 readable images of clearly coloured classes, plus the fallback that is right for id 99
    assert score["top1_accuracy"] == pytest.approx(15 / 16)
    assert score["score"] == pytest.approx(1 / 16)
    assert "top-1 accuracy 0.9375 (error 0.0625)" in capsys.readouterr().out


def test_round_trip_product_folder_and_flip(kit: dict, tmp_path: Path) -> None:
    preds = tmp_path / "p.parquet"
    assert (
        main(
            [
                "predict",
                str(kit["onnx"]),
                str(kit["images"]),
                "--out",
                str(preds),
                "--tta-flip",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    df, info = read_predictions(preds)
    assert info["tta_flip"] is True and "probs" not in df.columns and len(df) == 55
    sub = tmp_path / "s.csv"
    assert (
        main(
            [
                "submit",
                str(preds),
                "--format",
                "product2019",
                "--test",
                str(kit["product_test"]),
                "--out",
                str(sub),
            ]
        )
        == 0
    )
    lines = sub.read_text().splitlines()
    assert lines[0] == "id,predicted" and len(lines) == 17
    assert all(len(line.split(",")[1].split()) == 3 for line in lines[1:])
    assert lines[1].startswith("1.jpg,")
    truth = {f"{i}.jpg": v for i, v in kit["truth"].items()}
    sol = _solution(tmp_path / "sol.csv", truth)
    from submit.score import score

    result = score(sub, sol, "top3")
    assert result["top3_accuracy"] >= 15 / 16 and result["top1_accuracy"] >= 14 / 16


def test_flip_tta_is_the_mean_of_image_and_mirror(kit: dict, tmp_path: Path) -> None:
    import cv2

    from imat.data import decode_image
    from submit.predict import predict

    plain, mirror = tmp_path / "plain", tmp_path / "mirror"
    plain.mkdir()
    mirror.mkdir()
    for i in range(1, 6):  # square PNGs at the model's size: resizing and cropping commute with a mirror
        img = cv2.resize(decode_image(kit["images"] / f"{i}.jpg"), (32, 32), interpolation=cv2.INTER_AREA)
        img[:, :8] = 255  # make the mirror image really differ
        cv2.imwrite(str(plain / f"{i}.png"), img[..., ::-1])
        cv2.imwrite(str(mirror / f"{i}.png"), img[:, ::-1, ::-1])
    opts = {"workers": 0, "save_probs": True, "progress": False, "provider": "cpu"}
    p = np.stack(predict(kit["onnx"], plain, **opts).sort_values("image_id")["probs"].to_list())
    m = np.stack(predict(kit["onnx"], mirror, **opts).sort_values("image_id")["probs"].to_list())
    tta = predict(kit["onnx"], plain, tta_flip=True, **opts).sort_values("image_id")
    assert np.abs(p - m).max() > 1e-3  # the two views disagree, so the mean is a real test
    np.testing.assert_allclose(np.stack(tta["probs"].to_list()), (p + m) / 2, atol=1e-5)
    assert tta.attrs["imat"]["tta_flip"] is True


def test_manifest_input(kit: dict, tmp_path: Path) -> None:
    manifest = pd.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "split": ["test", "test", "train"],
            "path": ["1.jpg", "nope.jpg", "2.jpg"],
        }
    )
    manifest.to_parquet(tmp_path / "manifest.parquet")
    out = tmp_path / "p.parquet"
    args = ["predict", str(kit["onnx"]), str(tmp_path / "manifest.parquet"), "--images", str(kit["images"])]
    assert (
        main([*args, "--split", "test", "--out", str(out), "--workers", "0", "--topk", "2", "--no-progress"])
        == 0
    )
    df, _ = read_predictions(out)
    assert df["image_id"].tolist() == ["a", "b"] and df["missing"].tolist() == [False, True]
    assert len(df["topk_labels"][0]) == 2


def test_cpu_fallback_when_cuda_absent(
    kit: dict, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    session, active = create_session(kit["onnx"], "cpu")
    assert active == "cpu" and session.get_providers()[0] == "CPUExecutionProvider"
    with caplog.at_level(logging.INFO):
        session, active = create_session(kit["onnx"], "auto")
    if active != "cpu":
        pytest.skip(f"a GPU provider ({active}) works on this machine")
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert "did not initialise; using cpu" in caplog.text
    with pytest.raises(ImatError, match="cuda"):
        create_session(kit["onnx"], "cuda")
    code = main(
        ["predict", str(kit["onnx"]), str(kit["images"]), "--out", "/tmp/never.parquet", "--provider", "cuda"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("imat predict: error:") and "\n" not in err
    assert not Path("/tmp/never.parquet").exists()


# ---------------------------------------------------------------- formats against hand-written files

CLASSES = ClassMap.from_labels(LABELS)  # 3 7 12 20 31


def _preds(
    rows: list[tuple[str, list[int]]], probs: list[list[float]] | None = None
) -> tuple[pd.DataFrame, dict]:
    df = pd.DataFrame(
        {
            "image_id": [r[0] for r in rows],
            "topk_labels": [r[1] for r in rows],
            "topk_scores": [[0.5] * len(r[1]) for r in rows],
            "missing": [not r[1] for r in rows],
        }
    )
    if probs is not None:
        df["probs"] = probs
    return df, {"classes": CLASSES.to_dict()}


def _test(ids: list[str], paths: list[str] | None = None) -> pd.DataFrame:
    return pd.DataFrame({"image_id": ids, "path": paths or [f"{i}.jpg" for i in ids]})


def test_product2019_expected_file() -> None:
    preds, info = _preds([("b.jpg", [12, 3, 7, 20]), ("a.jpg", [31, 20, 12]), ("c.jpg", [])])
    counts = np.array([2, 9, 1, 5, 0])  # label 7 most frequent, then 20, then 3
    text, stats = make_submission(
        preds, info, get_format("product2019"), _test(["a.jpg", "b.jpg", "c.jpg", "d.jpg"]), counts=counts
    )
    assert text == "id,predicted\na.jpg,31 20 12\nb.jpg,12 3 7\nc.jpg,7 20 3\nd.jpg,7 20 3\n"
    assert stats["fallback_rows"] == 2 and stats["fallback_from"] == "most frequent training classes"


def test_furniture2018_expected_file_and_sample_order() -> None:
    # predictions made from a plain folder: ids are file names; matched to test ids by stem
    preds, info = _preds([("1.jpg", [12, 3, 7]), ("2.jpg", [31, 7, 3]), ("3.jpg", [7, 3, 12])])
    text, stats = make_submission(preds, info, get_format("furniture2018"), _test(["1", "2", "3", "4"]))
    # no training labels: the fallback is the class most often predicted first (a tie: first seen)
    assert text == "id,predicted\n1,12\n2,31\n3,7\n4,12\n"
    assert stats["fallback_from"] == "most frequently predicted classes"
    sample = (["id", "predicted"], ["3", "1", "4", "2"])
    text, _ = make_submission(
        preds, info, get_format("furniture2018"), _test(["1", "2", "3", "4"]), sample=sample
    )
    assert text == "id,predicted\n3,7\n1,12\n4,12\n2,31\n"


def test_coco_expected_file() -> None:
    # COCO ids are numbers, files live under sub-folders: matched through the test file's path
    preds, info = _preds([("val/x.jpg", [20, 12, 3]), ("val/y.jpg", [3, 31, 7])])
    test = _test(["10", "11"], ["val/x.jpg", "val/y.jpg"])
    text, _ = make_submission(preds, info, get_format("coco"), test)
    assert text == "id,predicted\n10,20 12 3\n11,3 31 7\n"
    text, _ = make_submission(preds, info, get_format("coco", topk=1), test)
    assert text == "id,predicted\n10,20\n11,3\n"


def test_too_few_labels_in_predictions_refused() -> None:
    preds, info = _preds([("a.jpg", [12])])
    with pytest.raises(ImatError, match="--topk 3"):
        make_submission(preds, info, get_format("product2019"), _test(["a.jpg"]))


def test_labels_the_format_cannot_hold_are_refused_and_nothing_is_written(kit: dict, tmp_path: Path) -> None:
    # an ImageFolder competition has class names, not the integer ids Product 2019 expects
    names = ClassMap.from_labels(["cat", "cow", "dog"])
    preds = pd.DataFrame(
        {
            "image_id": ["a.jpg"],
            "topk_labels": [["cat", "dog", "cow"]],
            "topk_scores": [[0.5, 0.3, 0.2]],
            "missing": [False],
        }
    )
    with pytest.raises(ImatError, match="integer"):
        make_submission(preds, {"classes": names.to_dict()}, get_format("product2019"), _test(["a.jpg"]))
    # through the command: the validator's refusal leaves no file behind
    from submit.predict import write_predictions

    path = write_predictions(tmp_path / "p.parquet", preds, {"classes": names.to_dict(), "topk": 3})
    test = tmp_path / "test.csv"
    test.write_text("path,label\na.jpg,cat\n")
    out = tmp_path / "s.csv"
    code = main(["submit", str(path), "--format", "product2019", "--test", str(test), "--out", str(out)])
    assert code == 2 and not out.exists()


def test_match_predictions_ambiguous_stem_is_not_guessed() -> None:
    hits = match_predictions(_test(["x", "y"], ["", ""]), ["a/x.jpg", "b/x.jpg", "y.png"])
    assert hits == [None, 2]


# ---------------------------------------------------------------- prior correction


def test_prior_correction_hand_computed() -> None:
    probs = np.array([[0.5, 0.3, 0.2]])
    r = train_frequencies([6, 3, 1])  # 0.6 0.3 0.1
    # p' = q p / (q p + r (1 - p)), q = 1/3:  5/14, 10/31, 5/11 before renormalising
    raw = np.array([5 / 14, 10 / 31, 5 / 11])
    np.testing.assert_allclose(prior_correct(probs, r)[0], raw / raw.sum(), rtol=1e-12)
    # a class absent from training: every count is smoothed by one
    np.testing.assert_allclose(train_frequencies([3, 0, 1]), [4 / 7, 1 / 7, 2 / 7])


def test_prior_correction_reranks_submission() -> None:
    probs = [[0.5, 0.3, 0.2, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6]]
    preds, info = _preds([("a", [3, 7, 12]), ("b", [31, 3, 7])], probs)
    counts = np.array([60, 30, 10, 10, 10])
    fmt = get_format("furniture2018")
    text, stats = make_submission(preds, info, fmt, _test(["a", "b"]), counts=counts, prior_correction=True)
    assert text == "id,predicted\na,12\nb,31\n"  # class 0 (label 3) was favoured only by its training share
    assert stats["prior_correction"] is True
    with pytest.raises(ImatError, match="--save-probs"):
        make_submission(
            _preds([("a", [3])])[0], info, fmt, _test(["a"]), counts=counts, prior_correction=True
        )
    with pytest.raises(ImatError, match="--train"):
        make_submission(preds, info, fmt, _test(["a", "b"]), prior_correction=True)


# ---------------------------------------------------------------- validators


@pytest.mark.parametrize(
    ("text", "kwargs", "fragment"),
    [
        ("id,label\n1,3\n", {}, "wrong header"),
        ("id,predicted\n1,3\n1,7\n", {}, "duplicate id '1'"),
        ("id,predicted\n1,3\n", {"expected_ids": ["1", "2"]}, "missing ids, e.g. '2'"),
        ("id,predicted\n1,3\n5,3\n", {"expected_ids": ["1"]}, "unknown ids, e.g. '5'"),
        ("id,predicted\n1,3 x7\n", {}, "label 'x7' is not an integer"),
        ("id,predicted\n1,3 7 12 20\n", {}, "4 labels, at most 3"),
        ("id,predicted\n1,3 7\n", {"max_labels": 1}, "2 labels, at most 1"),
        ("id,predicted\n1,\n", {}, "0 labels, at least 1"),
        ("id,predicted\n2,3\n1,3\n", {"expected_ids": ["1", "2"], "same_order": True}, "row 1 is id '2'"),
        ("id,predicted\n1,3,4\n", {}, "line 2 has 3 fields"),
        ("", {}, "empty file"),
    ],
)
def test_validator_errors(text: str, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ImatError, match=fragment.replace("(", r"\(")):
        check_submission(parse_submission(text), **kwargs)


@pytest.mark.parametrize(
    ("sub", "args", "fragment"),
    [
        ("Id;Predicted\n1;3\n", [], "wrong header"),
        ("id,predicted\n1,3\n1,7\n2,3\n", [], "duplicate id"),
        ("id,predicted\n1,3\n", [], "missing ids"),
        ("id,predicted\n1,3\n2,3\n9,3\n", [], "unknown ids"),
        ("id,predicted\n1,3\n2,cat\n", [], "not an integer"),
        ("id,predicted\n1,3 7 12 20\n2,3\n", [], "at most 3"),
        ("id,predicted\n1,3 7\n2,3\n", ["--format", "furniture2018"], "at most 1"),
    ],
)
def test_score_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, sub: str, args: list, fragment: str
) -> None:
    (tmp_path / "sub.csv").write_text(sub)
    sol = _solution(tmp_path / "sol.csv", {1: 3, 2: 7})
    assert main(["score", str(tmp_path / "sub.csv"), "--solution", str(sol), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imat score: error:") and fragment in err and "\n" not in err


def test_score_values_and_solution_headers(tmp_path: Path) -> None:
    from submit.score import score

    (tmp_path / "sub.csv").write_text("Id,Predicted\n1,7 3\n2,7\n3,\n4,1 2 31\n")
    for header in ("id,expected", "id,predicted", "id,label,Usage"):
        extra = ",Public" if "Usage" in header else ""
        (tmp_path / "sol.csv").write_text(f"{header}\n1,3{extra}\n2,7{extra}\n3,12{extra}\n4,31{extra}\n")
        r = score(tmp_path / "sub.csv", tmp_path / "sol.csv", "top3")
        assert (r["top1_accuracy"], r["top3_accuracy"], r["empty_rows"]) == (0.25, 0.75, 1)
        assert r["score"] == 0.25 and r["top1_error"] == 0.75
    (tmp_path / "bad.csv").write_text("image,truth\n1,3\n")
    with pytest.raises(ImatError, match="wrong solution header"):
        score(tmp_path / "sub.csv", tmp_path / "bad.csv")


def test_submit_refuses_bad_inputs(kit: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "x.parquet").write_bytes(b"nope")
    assert (
        main(
            [
                "submit",
                str(tmp_path / "x.parquet"),
                "--format",
                "product2019",
                "--test",
                str(kit["product_test"]),
                "--out",
                str(tmp_path / "s.csv"),
            ]
        )
        == 2
    )
    assert "not a readable Parquet" in capsys.readouterr().err
    pd.DataFrame({"image_id": ["1"]}).to_parquet(tmp_path / "y.parquet")
    assert (
        main(
            [
                "submit",
                str(tmp_path / "y.parquet"),
                "--format",
                "product2019",
                "--test",
                str(kit["product_test"]),
                "--out",
                str(tmp_path / "s.csv"),
            ]
        )
        == 2
    )
    assert "not an imat predictions file" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def test_predict_gives_a_bomb_a_fallback_row_without_decoding_it(
    kit: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import cv2
    from bomb_kit import write_bomb_png

    import imat.data.decode as decode_mod

    folder = tmp_path / "test"
    folder.mkdir()
    for i in (1, 2):
        shutil.copy(kit["images"] / f"{i}.jpg", folder / f"{i}.jpg")
    write_bomb_png(folder / "bomb.png")
    real = cv2.imdecode

    def imdecode(buf, flags):  # noqa: ANN001, ANN202
        assert b"IHDR\x00\x00u0" not in bytes(np.asarray(buf, np.uint8)[:32]), "the bomb was decoded"
        return real(buf, flags)

    monkeypatch.setattr(decode_mod.cv2, "imdecode", imdecode)
    preds = tmp_path / "predictions.parquet"
    args = ["predict", str(kit["onnx"]), str(folder), "--out", str(preds), "--workers", "0", "--no-progress"]
    assert main(args) == 0
    assert "1 missing, 1 of them too large: fallback rows" in capsys.readouterr().out
    df, info = read_predictions(preds)
    assert info["missing"] == 1 and info["too_large"] == 1
    missing = df.set_index("image_id")["missing"]
    assert missing.sum() == 1 and missing[[i for i in missing.index if "bomb" in i]].all()
