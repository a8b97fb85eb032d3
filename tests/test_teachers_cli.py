"""End to end: `imat teachers train` on a tiny generated ImageFolder with two tiny teachers, then
`imat teachers eval` (pool.json, pool_eval.csv, skipping finished teachers, one-line errors)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from imat.app.cli import main
from teachers.pool import load_pool, load_teacher

COLOURS = {  # BGR for cv2; five classes so that top-3 is not trivially 100%
    "red": (0, 0, 220),
    "green": (0, 200, 0),
    "blue": (230, 0, 0),
    "yellow": (0, 220, 220),
    "white": (230, 230, 230),
}


def _write_folder(root, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, size=(24, 24, 3), dtype=np.uint8)
            img[4:20, 4:20] = colour
            cv2.imwrite(str(root / name / f"{i}.png"), img)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teachers_e2e")
    _write_folder(tmp / "images" / "train", 8, 0)
    _write_folder(tmp / "images" / "val", 4, 1)
    config = {
        "run_dir": str(tmp / "run"),
        "data": {
            "train": str(tmp / "images" / "train"),
            "val": str(tmp / "images" / "val"),
            "images": str(tmp / "images"),
            "num_workers": 0,
        },
        "teachers": {
            "defaults": {
                "epochs": 1,
                "batch_size": 8,
                "lr": 0.05,
                "max_steps_per_epoch": 2,
                "device": "cpu",
                "aug": {"preset": "light"},
            },
            "pool": [
                {"name": "res", "arch": "resnet10t", "input_size": 32, "crop_pct": 1.0},
                {
                    "name": "mbv3",
                    "arch": "mobilenetv3_small_050",
                    "input_size": 32,
                    "mean": [0.5, 0.5, 0.5],
                    "std": [0.5, 0.5, 0.5],
                    "train": {"lr": 0.02, "aug": {"preset": "none"}},
                },
            ],
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["teachers", "train", str(path)])
    assert code == 0
    return tmp, path


def test_train_writes_pool(run, capsys):
    tmp, _ = run
    pool = tmp / "run" / "teachers"
    for name in ("res", "mbv3"):
        for f in ("config.yaml", "summary.csv", "best.safetensors", "last.ckpt"):
            assert (pool / name / f).is_file(), (name, f)
    data = json.loads((pool / "pool.json").read_text())
    by_name = {t["name"]: t for t in data["teachers"]}
    assert set(by_name) == {"res", "mbv3"}
    assert by_name["res"]["num_classes"] == 5 and by_name["res"]["input_size"] == 32
    assert by_name["res"]["crop_pct"] == 1.0 and by_name["res"]["epochs"] == 1
    assert by_name["mbv3"]["mean"] == [0.5, 0.5, 0.5]
    assert by_name["res"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # timm default of the arch
    assert 0.0 <= by_name["res"]["val_top1"] <= by_name["res"]["val_top3"] <= 1.0
    assert (tmp / "run" / "data" / "manifest.parquet").is_file()
    # each teacher's own recipe went through: the resolved config lists mbv3's own lr
    resolved = yaml.safe_load((pool / "mbv3" / "config.yaml").read_text())
    mbv3 = next(t for t in resolved["teachers"]["pool"] if t["name"] == "mbv3")
    assert mbv3["train"]["lr"] == 0.02 and mbv3["train"]["epochs"] == 1
    summary = pd.read_csv(pool / "res" / "summary.csv")
    assert len(summary) == 1
    entries = load_pool(pool)
    model = load_teacher(entries[0])
    assert not model.training


def test_rerun_skips_finished_teachers(run, capsys):
    tmp, path = run
    before = (tmp / "run" / "teachers" / "res" / "best.safetensors").stat().st_mtime_ns
    assert main(["teachers", "train", str(path), "--only", "res"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "mbv3" not in out.split("status")[-1]
    assert (tmp / "run" / "teachers" / "res" / "best.safetensors").stat().st_mtime_ns == before


def test_eval_writes_pool_eval(run, capsys):
    tmp, path = run
    pool = tmp / "run" / "teachers"
    assert main(["teachers", "eval", str(pool), "--tta-flip"]) == 0
    out = capsys.readouterr().out
    assert "ensemble_mean" in out and "greedy selection" in out
    table = pd.read_csv(pool / "pool_eval.csv")
    assert table["name"].tolist()[:2] == ["res", "mbv3"] or set(table["name"][:2]) == {"res", "mbv3"}
    assert {"ensemble_mean", "ensemble_geomean", "greedy_selection"} <= set(table["name"])
    assert (table["images"] == 20).all()
    assert (table["top1"] <= table["top3"]).all()
    # the pool's own evaluation of each teacher agrees with what its training run measured (fp32, same val)
    pool_json = {t["name"]: t for t in json.loads((pool / "pool.json").read_text())["teachers"]}
    assert main(["teachers", "eval", str(pool)]) == 0  # without TTA, to compare with training's eval
    plain = pd.read_csv(pool / "pool_eval.csv").set_index("name")
    for name in ("res", "mbv3"):
        assert plain.loc[name, "top1"] == pytest.approx(pool_json[name]["val_top1"], abs=1e-6)
        assert plain.loc[name, "top3"] == pytest.approx(pool_json[name]["val_top3"], abs=1e-6)
    assert main(["teachers", "eval", str(pool), "--tta-flip"]) == 0
    table = pd.read_csv(pool / "pool_eval.csv")
    selected = json.loads((pool / "pool.json").read_text())["selected"]
    assert selected["teachers"] and selected["tta_flip"] is True
    greedy = table.set_index("name").loc["greedy_selection"]
    assert greedy["members"].split() == selected["teachers"]
    # the same through --config (the run's manifest and data section)
    assert main(["teachers", "eval", str(pool), "--config", str(path), "--teachers", "res"]) == 0


def test_bad_inputs_are_one_line(run, tmp_path, capsys):
    _, path = run
    assert main(["teachers", "train", str(path), "--only", "nobody"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nobody" in err and "\n" not in err
    assert main(["teachers", "train", str(path), "teachers.pool.0.arch=resnet_10t"]) == 2
    err = capsys.readouterr().err.strip()
    assert "resnet_10t" in err and "\n" not in err
    assert main(["teachers", "eval", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imat teachers eval: error:") and "\n" not in err


def test_pool_probs_marks_unreadable_images(run):
    from imat.manifest import load_manifest
    from teachers.ensemble import pool_probs

    tmp, _ = run
    df, _ = load_manifest(tmp / "run" / "data" / "manifest.parquet")
    val = df[df["split"] == "val"].head(4).reset_index(drop=True)
    (tmp / "broken.png").write_bytes(b"not an image")
    bad = val.iloc[[0]].assign(path=str(tmp / "broken.png"), image_id="broken")
    rows = pd.concat([val.iloc[:2], bad, val.iloc[2:]], ignore_index=True)
    entries = load_pool(tmp / "run" / "teachers")
    probs, labels = pool_probs(entries, rows, tmp / "images", device="cpu", batch_size=2)
    assert probs.shape == (2, 5, 5)
    assert labels.tolist() == [*val["label"].iloc[:2], -1, *val["label"].iloc[2:]]
    np.testing.assert_allclose(probs.sum(axis=2), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs[:, 2], 1 / 5, rtol=1e-6)  # unreadable: uniform, label -1
