"""Decompression bombs are skipped before decoding (training, evaluation, inspect), and big JPEGs are
decoded at a DCT scale: the size check reads the header only."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from bomb_kit import write_bomb_png
from PIL import Image

import imat.data.decode as decode_mod
from imat.config.train import TrainConfig
from imat.data import (
    DEFAULT_MAX_PIXELS,
    ImageDataset,
    ImageTooLargeError,
    dct_scale,
    decode_image,
    decode_side,
    read_header,
    recipe_loaders,
)
from imat.inspection import check_image, format_report, inspect_input


@pytest.fixture()
def no_bomb_decode(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail the test if any decoder is handed a file named *bomb*; returns the decoded paths."""
    seen: list[str] = []
    real = cv2.imdecode

    def imdecode(buf, flags):  # noqa: ANN001, ANN202
        data = bytes(np.asarray(buf, np.uint8)[:32])
        assert b"IHDR\x00\x00u0" not in data, "the bomb reached cv2.imdecode"
        seen.append("cv2")
        return real(buf, flags)

    monkeypatch.setattr(decode_mod.cv2, "imdecode", imdecode)
    real_load = Image.Image.load

    def load(self):  # noqa: ANN001, ANN202
        assert self.size != (30000, 30000), "the bomb reached PIL's decoder"
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", load)
    return seen


def _photo(path: Path, width: int, height: int) -> Path:
    rng = np.random.default_rng(0)
    img = cv2.resize(rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8), (width, height))
    cv2.imwrite(str(path), img)
    return path


def test_bomb_png_is_cheap_and_declares_its_size(tmp_path: Path) -> None:
    bomb = write_bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 20_000
    with pytest.raises(ImageTooLargeError):  # 900 M pixels: over PIL's own hard limit
        read_header(bomb.read_bytes())
    small = write_bomb_png(tmp_path / "moderate.png", 10000, 10000)
    assert read_header(small.read_bytes()) == ("PNG", 10000, 10000)


@pytest.mark.parametrize("decoder", ["cv2", "pil"])
def test_decode_refuses_a_bomb_before_decoding(tmp_path: Path, decoder: str, no_bomb_decode: list) -> None:
    bomb = write_bomb_png(tmp_path / "bomb.png")
    with pytest.raises(ImageTooLargeError, match="too large.*bomb.png"):
        decode_image(bomb, decoder)
    # under PIL's hard limit but over ours: the configured limit decides
    moderate = write_bomb_png(tmp_path / "moderate.png", 10000, 10000)
    with pytest.raises(ImageTooLargeError, match="10000x10000"):
        decode_image(moderate, decoder)
    ok = _photo(tmp_path / "ok.png", 64, 48)
    assert decode_image(ok, decoder, max_pixels=64 * 48).shape == (48, 64, 3)
    with pytest.raises(ImageTooLargeError):
        decode_image(ok, decoder, max_pixels=64 * 48 - 1)


def test_default_limit_is_pils() -> None:
    assert DEFAULT_MAX_PIXELS == 89_478_485


def _frame(paths: list[Path]) -> pd.DataFrame:
    return pd.DataFrame({"path": [str(p) for p in paths], "label": [i % 2 for i in range(len(paths))]})


def test_training_and_evaluation_skip_and_count_a_bomb(tmp_path: Path, no_bomb_decode: list) -> None:
    photos = [_photo(tmp_path / f"{i}.jpg", 64, 48) for i in range(5)]
    bomb = write_bomb_png(tmp_path / "bomb.png")
    df = _frame([*photos[:2], bomb, *photos[2:]])
    recipe = TrainConfig(batch_size=2, epochs=1, device="cpu")
    data_cfg = {"input_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875}
    train, val = recipe_loaders(recipe, data_cfg, df, df, images=None, decoder="cv2", num_workers=0)
    for loader in (train, val):
        seen = [int(i) for b in loader for i in b["index"]]
        assert loader.epoch_skipped == 1
        assert 2 not in seen and len(seen) >= 4
    ds = ImageDataset(df, None, None)
    assert ds[2] is None and ds.skipped == 1 and str(bomb) in ds.bad_files


def test_inspect_reports_too_large_without_decoding(tmp_path: Path, no_bomb_decode: list) -> None:
    tree = tmp_path / "train"
    (tree / "cat").mkdir(parents=True)
    (tree / "dog").mkdir()
    _photo(tree / "cat" / "a.jpg", 64, 48)
    _photo(tree / "dog" / "b.jpg", 64, 48)
    write_bomb_png(tree / "dog" / "bomb.png")
    report = inspect_input(tree, progress=False)
    assert report.problems[["image_id", "problem"]].values.tolist() == [["dog/bomb.png", "too large"]]
    assert "1 too large" in format_report(report)
    # a configured limit applies too
    assert check_image(str(tree / "cat" / "a.jpg"), max_pixels=100)[0] == "too large"
    assert check_image(str(tree / "cat" / "a.jpg"))[0] == "ok"


def test_dct_scale_follows_libjpeg() -> None:
    assert dct_scale(4000, 3000, 379, 379) == 4  # 3000 // 379 = 7 -> 4
    assert dct_scale(4000, 3000, 2000, 1500) == 2
    assert dct_scale(300, 200, 379, 379) == 1
    assert dct_scale(8000, 8000, 10, 10) == 8


def test_big_jpegs_decode_at_a_dct_scale_keeping_the_needed_side(tmp_path: Path) -> None:
    big = _photo(tmp_path / "big.jpg", 1600, 1200)
    side = decode_side("light", 224)  # 224 / sqrt(0.35)
    assert side == 379 and decode_side(None, 224) == 256 and decode_side("crop", 224) == 224
    for decoder in ("cv2", "pil"):
        full = decode_image(big, decoder)
        small = decode_image(big, decoder, min_side=side)
        assert full.shape == (1200, 1600, 3) and small.shape == (600, 800, 3)  # 1/3 would do: libjpeg has 1/2
        assert decode_image(big, decoder, min_side=150).shape == (150, 200, 3)  # 1/8
    # both back-ends give the same pixels at the same scale (both are libjpeg's scaled IDCT)
    np.testing.assert_array_equal(
        decode_image(big, "cv2", min_side=side), decode_image(big, "pil", min_side=side)
    )
    png = _photo(tmp_path / "big.png", 1600, 1200)
    assert decode_image(png, "cv2", min_side=side).shape == (1200, 1600, 3)  # only JPEGs have a DCT


def test_report_thumbnails_skip_a_bomb(tmp_path: Path, no_bomb_decode: list) -> None:
    from imat.app.report.page import _thumb

    assert _thumb(write_bomb_png(tmp_path / "bomb.png")) is None
    thumb = _thumb(_photo(tmp_path / "ok.jpg", 640, 480))
    assert thumb is not None and len(thumb) > 100


def test_teachers_train_skips_and_counts_a_bomb(tmp_path: Path, no_bomb_decode: list) -> None:
    """`imat teachers train` end to end: the bomb in train and val is counted in summary.csv."""
    import yaml

    from imat.app.cli import main

    for split, per_class in (("train", 4), ("val", 2)):
        for c, colour in enumerate(((0, 0, 220), (0, 200, 0))):
            folder = tmp_path / "images" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(per_class - (1 if (split, c) == ("train", 0) else 0)):
                img = np.full((24, 24, 3), colour, np.uint8)
                cv2.imwrite(str(folder / f"{i}.png"), img)
        write_bomb_png(tmp_path / "images" / split / "c0" / "bomb.png")
    config = {
        "run_dir": str(tmp_path / "run"),
        "data": {
            "train": str(tmp_path / "images" / "train"),
            "val": str(tmp_path / "images" / "val"),
            "images": str(tmp_path / "images"),
            "num_workers": 0,
        },
        "teachers": {
            "defaults": {"epochs": 1, "batch_size": 4, "device": "cpu", "aug": {"preset": "light"}},
            "pool": [{"name": "res", "arch": "resnet10t", "input_size": 16, "crop_pct": 1.0}],
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["teachers", "train", str(path)]) == 0
    summary = pd.read_csv(tmp_path / "run" / "teachers" / "res" / "summary.csv")
    assert summary["skipped"].tolist() == [2]  # the training bomb and the validation one
    assert summary["train_images"].tolist() == [7]  # 2 steps of 4, less the bomb
