"""imat export POOL_DIR: the teacher pool (or its greedy selection) as one ONNX model, verified against
the PyTorch ensemble; its probabilities are the ensemble's of ``imat teachers eval``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from submit_kit import make_kit, make_pool

from imat.app.cli import main
from submit.pool_export import build_pool_model
from submit.predict import predict
from teachers.ensemble import ensemble_probs, pool_probs
from teachers.pool import load_pool


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pool_export")
    k = make_kit(root)
    k["pool"] = make_pool(root, k["images"], k["train_classes"])
    return k


def _own_transforms(kit: dict, names: list[str], method: str) -> tuple[np.ndarray, pd.DataFrame]:
    """The ensemble as ``imat teachers eval`` computes it: each teacher on its own eval transform."""
    preds = predict_rows(kit)
    entries = load_pool(kit["pool"], names)
    probs, _ = pool_probs(entries, preds.assign(label=0), None, device="cpu")
    return ensemble_probs(probs, method), preds


def predict_rows(kit: dict) -> pd.DataFrame:
    from submit.inputs import read_images

    rows = read_images(kit["images"], None)
    return rows[~rows["image_id"].isin(["15", "15.jpg"])].reset_index(drop=True)  # the corrupt one


def _onnx_probs(model: Path, kit: dict, **kw) -> pd.DataFrame:
    frame = predict(
        model, kit["images"], topk=5, provider="cpu", workers=0, save_probs=True, progress=False, **kw
    )
    return frame[~frame["missing"]].set_index("image_id")


def test_pool_exports_as_one_model_and_matches_the_ensemble(kit: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pool.onnx"
    assert main(["export", str(kit["pool"]), "--out", str(out), "--images", str(kit["images"])]) == 0
    assert "pool of 2 (mean)" in capsys.readouterr().out
    report = json.loads(out.with_name("pool.onnx.json").read_text())
    assert report["pool"]["members"] == ["a32", "b24"] and report["pool"]["method"] == "mean"
    model, *_ = build_pool_model(kit["pool"])
    assert report["pool"]["params"] == sum(p.numel() for p in model.parameters())
    # the shared input: largest size and crop, [0, 1] RGB; every member normalises inside the graph
    assert report["input_size"] == 32 and report["crop_pct"] == 1.0
    assert report["mean"] == [0.0] * 3 and report["std"] == [1.0] * 3
    v = report["verification"]
    assert v["images"] == 54 and v["top3_agreement"] == 1.0 and v["max_abs_logit_diff"] < 1e-3

    want, rows = _own_transforms(kit, ["a32", "b24"], "mean")
    got = _onnx_probs(out, kit).loc[rows["image_id"]]
    probs = np.stack(got["probs"].to_numpy())
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    # b24 sees a bilinear resize of the shared crop instead of its own resize: close, not identical
    assert np.abs(probs - want).max() < 0.15
    assert (probs.argmax(1) == want.argmax(1)).mean() >= 0.95


def test_selection_alone_is_the_teachers_own_prediction(kit: dict, tmp_path: Path) -> None:
    out = tmp_path / "selected.onnx"
    code = main(["export", str(kit["pool"]), "--selected", "--out", str(out), "--images", str(kit["images"])])
    assert code == 0
    report = json.loads(out.with_name("selected.onnx.json").read_text())
    assert report["pool"]["members"] == ["b24"] and report["pool"]["selected"] is True
    assert report["input_size"] == 24 and report["crop_pct"] == 0.875
    want, rows = _own_transforms(kit, ["b24"], "mean")
    probs = np.stack(_onnx_probs(out, kit).loc[rows["image_id"]]["probs"].to_numpy())
    assert np.abs(probs - want).max() < 1e-4  # the same view and normalisation: the same numbers


def test_geomean_fp16_and_int8(kit: dict, tmp_path: Path) -> None:
    model, *_ = build_pool_model(kit["pool"], method="geomean")
    x = torch.rand(4, 3, 32, 32)
    with torch.inference_mode():
        got = torch.softmax(model(x), dim=1).numpy()
        each = np.stack(
            [torch.softmax(m(model.member_input(x, i)), 1).numpy() for i, m in enumerate(model.members)]
        )
    assert np.allclose(got, ensemble_probs(each, "geomean"), atol=1e-5)
    assert not np.allclose(got, ensemble_probs(each, "mean"), atol=1e-4)
    out = tmp_path / "pool16.onnx"
    args = ["export", str(kit["pool"]), "--out", str(out), "--images", str(kit["images"])]
    assert main([*args, "--method", "geomean", "--precision", "fp16"]) == 0
    report = json.loads(out.with_name("pool16.onnx.json").read_text())
    assert report["precision"] == "fp16" and report["pool"]["method"] == "geomean"
    assert report["verification"]["top3_agreement"] >= 0.99
    # int8: calibrated on the shared input, like any model (the CPU form here)
    out8 = tmp_path / "pool8.onnx"
    args8 = [
        "export",
        str(kit["pool"]),
        "--out",
        str(out8),
        "--images",
        str(kit["images"]),
        "--precision",
        "int8",
    ]
    assert main([*args8, "--min-agreement", "0.9", "--calibration-images", "32"]) == 0
    report = json.loads(out8.with_name("pool8.onnx.json").read_text())
    assert report["precision"] == "int8" and report["verification"]["top3_agreement"] >= 0.9


def test_pool_options_on_a_checkpoint_are_one_line_errors(kit: dict, tmp_path: Path, capsys) -> None:
    ckpt = kit["pool"] / "a32" / "best.safetensors"
    args = [
        "export",
        str(ckpt),
        "--selected",
        "--out",
        str(tmp_path / "x.onnx"),
        "--images",
        str(kit["images"]),
    ]
    assert main(args) == 2
    assert "--selected and --method are for a teacher pool folder" in capsys.readouterr().err
    data = json.loads((kit["pool"] / "pool.json").read_text())
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "pool.json").write_text(
        json.dumps(
            {
                **data,
                "selected": None,
                "teachers": [{**t, "weights": str(kit["pool"] / t["weights"])} for t in data["teachers"]],
            }
        )
    )
    args = [
        "export",
        str(bare),
        "--selected",
        "--out",
        str(tmp_path / "y.onnx"),
        "--images",
        str(kit["images"]),
    ]
    assert main(args) == 2
    assert "no greedy selection recorded" in capsys.readouterr().err


def test_the_selection_candidate_is_cross_fitted_from_every_teachers_own_probabilities(kit: dict) -> None:
    """The select step's cross-fit of the greedy selection starts from what ``imat teachers eval``
    selected on: every pool teacher on its own eval transform, and the selection pool.json records."""
    from imat.app.candidates import ValRows, _members
    from imat.config import RunConfig

    cfg = RunConfig.model_validate({"teachers": {"dir": str(kit["pool"])}, "data": {"num_workers": 0}})
    rows = predict_rows(kit).assign(label=lambda d: np.arange(len(d)) % 5)
    members, labels = _members(cfg, ValRows(rows["label"].to_numpy(), 5, rows))
    assert members.names == ["a32", "b24"] and members.selected == ["b24"] and members.method == "mean"
    assert members.probs.shape == (2, len(rows), 5) and (labels == rows["label"]).all()
    want, _ = _own_transforms(kit, ["a32", "b24"], "mean")
    assert np.allclose(ensemble_probs(members.probs, "mean"), want, atol=1e-5)
