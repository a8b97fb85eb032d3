"""Predict-time TTA: several scales (resize, centre-crop) and the flip, probabilities averaged; the same
numbers from `imat predict`, the Ray Data stages and the Python API, recorded in the predictions file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from submit_kit import make_checkpoint, make_kit

from imat.app.cli import main
from imat.data import build_eval_transform, decode_image
from imat.errors import ImatError
from submit.predict import predict, read_predictions, softmax
from submit.tta import average_views, make_tta, parse_scales


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tta")
    kit = make_kit(root, n_train=20, n_test=12)
    # crop 0.875 at 32 px: scale 1.15 is a real zoom (shorter side 42 instead of 36)
    ckpt = make_checkpoint(
        root / "best.safetensors", kit["images"], kit["train_classes"], steps=30, crop_pct=0.875
    )
    out = root / "student.onnx"
    assert main(["export", str(ckpt), "--out", str(out), "--images", str(kit["images"])]) == 0
    return out, kit


def _by_hand(model: Path, image: Path, scales: list[float], flip: bool) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    pixels = decode_image(image)
    probs = []
    for s in scales:
        x = build_eval_transform(32, (0.5,) * 3, (0.25,) * 3, 0.875 / s)(image=pixels)["image"].numpy()[None]
        for view in (x, x[..., ::-1]) if flip else (x,):
            probs.append(softmax(sess.run(None, {"input": np.ascontiguousarray(view)})[0]))
    return np.mean(probs, axis=0)[0]


def _textured(folder: Path) -> Path:
    """Images with structure (the kit's flat colours look alike at every scale and mirrored)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        img = cv2.resize(
            rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), (48, 40), interpolation=cv2.INTER_LINEAR
        )
        cv2.imwrite(str(folder / f"{i}.jpg"), img)
    return folder


def test_scales_and_flip_average_every_view(onnx_model, tmp_path, capsys) -> None:
    model, _ = onnx_model
    images = _textured(tmp_path / "images")
    out = tmp_path / "p.parquet"
    args = ["predict", str(model), str(images), "--out", str(out), "--workers", "0", "--save-probs"]
    assert main([*args, "--tta-scales", "1.0,1.15", "--tta-flip"]) == 0
    assert "TTA flip+scales 1,1.15" in capsys.readouterr().out
    frame, info = read_predictions(out)
    assert info["tta"] == {"flip": True, "scales": [1.0, 1.15], "views": 4, "label": "flip+scales 1,1.15"}
    row = frame.set_index("image_id").loc["1.jpg"]
    want = _by_hand(model, images / "1.jpg", [1.0, 1.15], True)
    np.testing.assert_allclose(np.asarray(row["probs"]), want, atol=1e-6)
    # the views differ, so TTA changes the numbers (a test that cannot pass on a flip-only predict)
    for scales, flip in (([1.0], False), ([1.0], True), ([1.15], False)):
        assert np.abs(want - _by_hand(model, images / "1.jpg", scales, flip)).max() > 1e-3
    zoom_only = predict(model, images, workers=0, save_probs=True, progress=False, tta_scales="1.15")
    np.testing.assert_allclose(
        np.asarray(zoom_only.set_index("image_id").loc["1.jpg", "probs"]),
        _by_hand(model, images / "1.jpg", [1.15], False),
        atol=1e-6,
    )
    assert zoom_only.attrs["imat"]["tta"]["label"] == "scales 1.15"


def test_ray_stages_give_the_same_views(onnx_model) -> None:
    from submit.ray_predict import OnnxPredictor, decode_batch

    model, kit = onnx_model
    ids = np.array(["3.jpg", "4.jpg"], dtype=object)
    batch = {"_row": np.arange(2), "image_id": ids, "path": np.array([str(kit["images"] / i) for i in ids])}
    decoded = decode_batch(batch, 32, [0.5] * 3, [0.25] * 3, 0.875, "cv2", scales=[1.0, 1.15])
    assert decoded["image"].shape == (2, 2, 3, 32, 32) and decoded["ok"].all()
    actor = OnnxPredictor(str(model), "cpu", None, True, 3, True, 8)
    got = actor(decoded)
    single = predict(
        model,
        kit["images"],
        workers=0,
        save_probs=True,
        progress=False,
        tta_flip=True,
        tta_scales=[1.0, 1.15],
    )
    want = single.set_index("image_id").loc[list(ids), "probs"]
    for g, w in zip(got["probs"].to_pylist(), want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6)


def test_options_are_checked() -> None:
    assert parse_scales("1.0, 1.15") == (1.0, 1.15) and parse_scales(None) == (1.0,)
    assert make_tta(True, [1.0, 1.3]).views == 4 and make_tta().label == "none"
    for bad in ("1.0,x", "0,1", "1.0,1.0"):
        with pytest.raises(ImatError):
            parse_scales(bad)
    # a scale that would need padding (crop_pct / scale > 1) is refused, not silently padded
    from submit.tta import view_transform

    with pytest.raises(ImatError, match="below the model's crop_pct"):
        view_transform({"input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875}, [0.8])
    # views of a (B, V, 3, S, S) batch and flips are averaged in probability space
    x = np.random.default_rng(0).standard_normal((2, 2, 3, 4, 4)).astype(np.float32)
    run = lambda b: b.reshape(len(b), -1)[:, :5] * 3  # noqa: E731
    want = np.mean(
        [softmax(run(v)) for v in (x[:, 0], x[:, 0, ..., ::-1], x[:, 1], x[:, 1, ..., ::-1])], axis=0
    )
    np.testing.assert_allclose(average_views(run, x, True, False), want, atol=1e-6)
