"""`imat predict --ray`: Ray Data (decoding tasks, then a pool of 2 CPU onnxruntime actors whose results
the workers write as Parquet) gives the same predictions Parquet as one process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from submit_kit import make_checkpoint, make_kit

from imat.app.cli import main
from submit.predict import predict, read_predictions


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("raypred")
    kit = make_kit(root, n_train=20, n_test=23)
    ckpt = make_checkpoint(root / "best.safetensors", kit["images"], kit["train_classes"], steps=30)
    out = root / "student.onnx"
    assert main(["export", str(ckpt), "--out", str(out), "--images", str(kit["images"])]) == 0
    return out, kit


def test_ray_data_matches_single_process(onnx_model, tmp_path, capsys):
    model, kit = onnx_model
    single = tmp_path / "single.parquet"
    predict(
        model,
        kit["furniture_test"],
        single,
        images=kit["images"],
        split="test",
        workers=0,
        batch_size=8,
        progress=False,
    )
    ray_out = tmp_path / "ray.parquet"
    code = main(
        [
            "predict",
            str(model),
            str(kit["furniture_test"]),
            "--images",
            str(kit["images"]),
            "--out",
            str(ray_out),
            "--ray",
            "--actors",
            "2",
            "--batch-size",
            "4",
            "--provider",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    # the actors wrote their results as Parquet parts beside the output; joined and cleaned up
    assert not Path(f"{ray_out}.parts").exists()
    a, info_a = read_predictions(single)
    b, info_b = read_predictions(ray_out)
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b) == 24  # 23 test images + one id whose image was never downloaded
    assert list(a["image_id"]) == list(b["image_id"])  # same order as the test file
    a, b = a.sort_values("image_id").reset_index(drop=True), b.sort_values("image_id").reset_index(drop=True)
    assert (a["missing"] == b["missing"]).all() and int(b["missing"].sum()) == 2  # missing + corrupt
    for la, lb, sa, sb in zip(
        a["topk_labels"], b["topk_labels"], a["topk_scores"], b["topk_scores"], strict=True
    ):
        assert list(la) == list(lb)
        np.testing.assert_allclose(np.asarray(sa), np.asarray(sb), rtol=1e-5, atol=1e-6)
    # A pool of 2 actors ran; which of them got the 6 batches is Ray's scheduling (on 2 busy cores one
    # actor can finish them all before the other is up), so "both did work" would be a flaky assertion.
    assert info_b["ray_actors"] == 2 and info_b["ray_actors_used"] in (1, 2)
    assert info_b["classes"] == info_a["classes"] and info_b["topk"] == 3
