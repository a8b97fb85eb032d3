"""`imat predict --ray`: Ray Data (decoding tasks, then a pool of 2 CPU onnxruntime actors whose results
the workers write as Parquet) gives the same predictions Parquet as one process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from submit_kit import make_checkpoint, make_kit

from imat.app.cli import main
from imat.errors import ImatError
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


def _wide_model(path: Path, classes: int = 2019, size: int = 32) -> Path:
    """A real ONNX model with ``classes`` outputs (pooling + a random linear layer) and its JSON: the
    probabilities of a few dozen images then outweigh everything else the driver could read."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, classes)).astype(np.float32) * 5, "w")
    b = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
        ],
        "wide",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [w, b],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    desc = {
        "format": "imat-onnx/1",
        "num_classes": classes,
        "input_size": size,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "crop_pct": 1.0,
        "classes": {"source_labels": [f"c{i}" for i in range(classes)], "names": [], "label_type": "str"},
        "precision": "fp32",
        "target": "cpu",
        "outputs": ["logits"],
        "softmax_in_graph": False,
        "input_name": "input",
    }
    path.with_name(path.name + ".json").write_text(json.dumps(desc))
    return path


def test_probabilities_stay_in_worker_shards_within_a_driver_budget(onnx_model, tmp_path):
    """--save-probs on 2,019 classes: the probabilities (24 x 2019 x 4 bytes, ~190 KB) are far over
    the driver's 50 KB budget, yet the run succeeds: the workers' shards hold them (OUT.probs/), the
    driver read only the top-k columns, and read_predictions attaches the same probabilities the
    single process computes (uint8 between the stages, normalised by the actor)."""
    from submit.ray_predict import ray_predict

    _, kit = onnx_model
    model = _wide_model(tmp_path / "wide.onnx")
    budget = 50_000
    predict(model, kit["furniture_test"], tmp_path / "s.parquet", images=kit["images"], split="test",
            workers=0, batch_size=8, save_probs=True, progress=False)  # fmt: skip
    single, _ = read_predictions(tmp_path / "s.parquet")
    out = tmp_path / "ray.parquet"
    frame = ray_predict(
        model, kit["furniture_test"], out, images=kit["images"], split="test", provider="cpu",
        batch_size=8, save_probs=True, actors=1, max_driver_bytes=budget,
    )  # fmt: skip
    probs_bytes = sum(len(p) for p in single["probs"]) * 4
    assert probs_bytes > 3 * budget
    assert "probs" not in frame.columns and frame.attrs["imat"]["probs_shards"] == "ray.parquet.probs"
    assert any(Path(f"{out}.probs").glob("*.parquet")) and not Path(f"{out}.parts").exists()
    ray_df, _ = read_predictions(out)
    a = single.set_index("image_id").loc[ray_df["image_id"]]
    for pa_, pb, m in zip(a["probs"], ray_df["probs"], ray_df["missing"], strict=True):
        assert len(pb) == (0 if m else 2019)
        np.testing.assert_allclose(np.asarray(pa_), np.asarray(pb), rtol=1e-4, atol=1e-6)
    # the same run with a budget below even the top-k columns is refused in one line
    with pytest.raises(ImatError, match="over the driver budget of 100"):
        ray_predict(model, kit["furniture_test"], out, images=kit["images"], split="test", provider="cpu",
                    batch_size=8, actors=1, max_driver_bytes=100)  # fmt: skip


def test_plan_actors_from_the_cluster():
    from submit.ray_predict import plan_actors

    assert plan_actors(128, 8, "auto", None, None) == (8, 1.0, 1, 1)  # one actor per GPU
    assert plan_actors(128, 8, "cpu", None, None) == (31, 4.0, 0, 4)  # CPU provider: CPU actors
    assert plan_actors(64, 0, "auto", None, 8) == (7, 8.0, 0, 8)  # --threads 8: 8 cores each
    assert plan_actors(2, 0, "auto", 2, None) == (2, 0.5, 0, 1)  # a 2-core box: fractions, no deadlock
    assert plan_actors(2, 0, "auto", None, None) == (1, 1.0, 0, 1)


def test_decoding_hands_on_uint8(onnx_model):
    from submit.inputs import read_images
    from submit.ray_predict import decode_batch

    _, kit = onnx_model
    rows = read_images(kit["images"]).head(3)
    out = decode_batch(
        {"_row": np.arange(3), "image_id": rows["image_id"].to_numpy(), "path": rows["path"].to_numpy()},
        32, [0.5] * 3, [0.25] * 3, 1.0, "cv2",
    )  # fmt: skip
    assert out["image"].dtype == np.uint8 and out["image"].shape == (3, 3, 32, 32)


def test_decoding_keeps_the_pixel_limit(onnx_model, tmp_path):
    """The Ray decode tasks skip what the single-process path skips: an image over ``max_pixels`` (by
    its header, never decoded) gets a fallback row, and the run's own limit is the one applied."""
    from bomb_kit import write_bomb_png

    from submit.inputs import read_images
    from submit.ray_predict import decode_batch

    _, kit = onnx_model
    rows = read_images(kit["images"]).head(2)
    paths = [*rows["path"], str(write_bomb_png(tmp_path / "bomb.png"))]
    batch = {"_row": np.arange(3), "image_id": np.array(["a", "b", "bomb"], dtype=object),
             "path": np.array(paths, dtype=object)}  # fmt: skip
    out = decode_batch(batch, 32, [0.5] * 3, [0.25] * 3, 1.0, "cv2")
    assert out["ok"].tolist() == [True, True, False]
    tight = decode_batch(batch, 32, [0.5] * 3, [0.25] * 3, 1.0, "cv2", max_pixels=10, draft=False)
    assert not tight["ok"].any() and not tight["image"].any()
