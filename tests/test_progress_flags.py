"""`--no-progress` on the long commands: `imat teachers train` really prints no bar, and every long
command parses the flag (``--quiet`` stays an alias where it existed)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from imat.app.cli import build_parser, main

BAR = "%|"  # tqdm's percentage and bar: only a progress bar writes it


def _config(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for name, colour in (("red", (0, 0, 220)), ("green", (0, 200, 0)), ("blue", (230, 0, 0))):
            (tmp / "images" / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, size=(16, 16, 3), dtype=np.uint8)
                img[3:13, 3:13] = colour
                cv2.imwrite(str(tmp / "images" / split / name / f"{i}.png"), img)
    config = {
        "run_dir": str(tmp / "run"),
        "data": {
            "train": str(tmp / "images" / "train"),
            "val": str(tmp / "images" / "val"),
            "images": str(tmp / "images"),
            "num_workers": 0,
        },
        "teachers": {
            "defaults": {"epochs": 1, "batch_size": 6, "max_steps_per_epoch": 2, "device": "cpu"},
            "pool": [{"name": "res", "arch": "resnet10t", "input_size": 32, "crop_pct": 1.0}],
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_teachers_train_no_progress_prints_no_bar(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _config(tmp_path)
    assert main(["teachers", "train", str(path)]) == 0
    shown = capsys.readouterr()
    assert BAR in shown.err  # the bar this flag must remove is there by default
    assert main(["teachers", "train", str(path), "--force", "--no-progress"]) == 0
    quiet = capsys.readouterr()
    assert BAR not in quiet.err and "\r" not in quiet.err
    assert "epoch 1/1" not in quiet.err  # nor the per-epoch line written through tqdm
    assert "trained" in quiet.out  # the results table still prints
    assert (tmp_path / "run" / "teachers" / "res" / "best.safetensors").is_file()


@pytest.mark.parametrize(
    ("argv", "dest"),
    [
        (["teachers", "train", "c.yaml", "--no-progress"], "no_progress"),
        (["teachers", "eval", "pool", "--no-progress"], "no_progress"),
        (["data", "download", "train.json", "--out", "img", "--no-progress"], "no_progress"),
        (["data", "inspect", "train.json", "--no-progress"], "no_progress"),
        (["data", "audit", "pool", "--no-progress"], "no_progress"),
        (["predict", "m.onnx", "test.json", "--out", "p.parquet", "--no-progress"], "no_progress"),
        (["export", "best.safetensors", "--out", "m.onnx", "--no-progress"], "no_progress"),
        (["pipeline", "c.yaml", "--no-progress"], "no_progress"),
        (["demo", "--no-progress"], "no_progress"),
        (["distill", "c.yaml", "--no-progress"], "quiet"),
        (["distill", "c.yaml", "--quiet"], "quiet"),
        (["tune", "c.yaml", "--no-progress"], "quiet"),
        (["tune", "c.yaml", "--quiet"], "quiet"),
    ],
)
def test_long_commands_parse_no_progress(argv: list[str], dest: str) -> None:
    args = build_parser(argv).parse_args(argv)
    assert getattr(args, dest) is True
    without = [a for a in argv if a not in ("--no-progress", "--quiet")]
    assert getattr(build_parser(without).parse_args(without), dest) is False


def test_pipeline_no_progress_reaches_the_config() -> None:
    from imat.app.api import demo_config_path
    from imat.app.commands.pipeline import progress_overrides
    from imat.config import load_config

    for flag, expected in (([], True), (["--no-progress"], False)):
        args = build_parser(["pipeline", "c.yaml", *flag]).parse_args(["pipeline", "c.yaml", *flag])
        assert load_config(demo_config_path(), progress_overrides(args)).pipeline.progress is expected
