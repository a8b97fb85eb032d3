"""The label audit (in-sample and K-fold cross-fitted, cleanlab), the label record in pool.json,
and cleaning that feeds training (`data.clean`), on tiny coloured squares and tiny teachers."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from scale_kit import write_squares

from imat.app.cli import main
from imat.config import validate
from imat.manifest import ClassMap, save_manifest

TINY = {"channels": [8, 8, 16, 16]}  # a resnet10t small enough to train for many epochs in seconds


def tiny_run(root: Path, n_train: int = 24, n_val: int = 6, epochs: int = 1, **data) -> dict:
    """A run dir with a manifest of coloured squares and a config whose pool is one tiny resnet10t."""
    images, rows, labels = write_squares(root, n_train, n_val, size=32)
    run = root / "run"
    save_manifest(pd.DataFrame(rows), ClassMap.from_labels(labels), run / "data")
    recipe = {
        "epochs": epochs,
        "batch_size": 8,
        "device": "cpu",
        "optimizer": "adamw",
        "lr": 0.01,
        "weight_decay": 0.0,
        "aug": {"preset": "none"},
    }
    return {
        "run_dir": str(run),
        "data": {"images": str(images), "num_workers": 0, **data},
        "teachers": {
            "defaults": recipe,
            "pool": [
                {
                    "name": "t",
                    "arch": "resnet10t",
                    "input_size": 32,
                    "mean": [0.5, 0.5, 0.5],
                    "std": [0.25, 0.25, 0.25],
                    "crop_pct": 1.0,
                    "model_kwargs": TINY,
                }
            ],
        },
    }


def write_cfg(root: Path, raw: dict) -> Path:
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# -- point 3: the labels a pool saw travel with it -----------------------------------------------------


def test_audit_without_config_judges_the_noisy_labels_the_pool_was_trained_on(tmp_path, capsys):
    from distill.audit import audit
    from teachers.train import train_pool

    raw = tiny_run(tmp_path, label_noise={"fraction": 0.5, "kind": "pair", "seed": 3})
    cfg = validate(raw, "test")
    train_pool(cfg)
    pool = cfg.pool_dir
    res = audit(pool, None, top=4, out_dir=tmp_path / "audit")  # no config: pool.json says what was seen
    table = res.table.set_index("image_id")
    ids = [f"train_{i}" for i in range(24)]
    clean = np.arange(24) % 3
    given = table.loc[ids, "given_index"].to_numpy()
    assert (given != clean).sum() == 12  # half the labels, as the pool saw them, not the clean ones
    assert ((given == (clean + 1) % 3) | (given == clean)).all()  # pair flips
    assert table.loc[ids, "flipped"].to_numpy().tolist() == (given != clean).tolist()
    record = json.loads((pool / "pool.json").read_text())
    assert record["label_noise"] == {"fraction": 0.5, "kind": "pair", "seed": 3}
    assert record["clean"] is None and record["train_images"] == 24
    info = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert info["probabilities"] == "in_sample" and info["label_noise"]["fraction"] == 0.5
    assert info["flips"] == 12
    # a config that contradicts the pool's record is refused, not silently audited against other labels
    code = main(["data", "audit", str(pool), "--config", str(write_cfg(tmp_path, tiny_run_cfg_clean(raw)))])
    assert code == 2
    assert "trained with label_noise" in capsys.readouterr().err


def tiny_run_cfg_clean(raw: dict) -> dict:
    out = json.loads(json.dumps(raw))
    out["data"].pop("label_noise")
    return out


# -- points 1 and 2: out-of-sample probabilities find what memorising teachers miss -------------------


def memorised_flip_run(root: Path, epochs: int = 30) -> dict:
    """Squares whose image train_0 (red, class "1") is labelled "2": a flip teachers can memorise, as
    its background has a white band no other image has (an idiosyncrasy to latch on to)."""
    raw = tiny_run(root, n_train=24, n_val=3, epochs=epochs)
    image = Path(raw["data"]["images"]) / "train_0.png"
    pixels = cv2.imread(str(image))
    pixels[:6] = 255
    cv2.imwrite(str(image), pixels)
    manifest = Path(raw["run_dir"]) / "data" / "manifest.parquet"
    df = pd.read_parquet(manifest)
    df.loc[df["image_id"] == "train_0", "label"] = 1
    df.to_parquet(manifest)
    raw["audit"] = {"folds": 2, "seed": 0}
    return raw


@pytest.mark.slow
def test_in_sample_teachers_miss_a_memorised_flip_that_cross_fitted_ones_find(tmp_path):
    from distill.audit import audit, crossfit_audit
    from teachers.train import train_pool

    cfg = validate(memorised_flip_run(tmp_path), "test")
    train_pool(cfg)
    inside = audit(cfg.pool_dir, cfg, top=3, out_dir=tmp_path / "in").table.set_index("image_id")
    # the pool learnt the wrong label of the image it trained on: cleanlab sees no issue
    assert not inside.loc["train_0", "is_label_issue"]
    out = crossfit_audit(cfg, top=3, out_dir=tmp_path / "out")
    table = out.table.set_index("image_id")
    # the fold that held train_0 out never saw its label: it says red ("1"), and cleanlab flags it first
    assert table.loc["train_0", "is_label_issue"] and table.loc["train_0", "rank"] == 1
    assert table.loc["train_0", "suggested_label"] == 1 and table.loc["train_0", "given_label"] == 2
    assert inside.loc["train_0", "p_given"] > 3 * table.loc["train_0", "p_given"]  # memorised in-sample
    assert out.info["probabilities"] == "out_of_sample" and out.info["folds"] == 2
    folds = pd.read_csv(cfg.audit_dir / "folds" / "folds.csv")
    assert sorted(folds["fold"].value_counts()) == [12, 12]
    for k in range(2):  # each fold's teachers trained on the other fold only, recorded in pool.json
        record = json.loads((cfg.audit_dir / "folds" / f"fold{k}" / "pool.json").read_text())
        assert record["train_images"] == 12 and record["crossfit"]["fold"] == k
        held = set(folds.loc[folds["fold"] == k, "image_id"])
        assert table.loc[sorted(held), "fold"].eq(k).all()
    # a fold's pool is not the run's: the run's resolved config still names the run's own pool
    assert yaml.safe_load((cfg.run_path / "config.yaml").read_text())["teachers"]["dir"] is None


def test_cross_fitting_resumes_finished_folds(tmp_path, capsys):
    raw = tiny_run(tmp_path, n_train=12, n_val=3, epochs=1)
    cheap = {**raw["teachers"]["pool"][0], "name": "cheap"}
    raw["audit"] = {
        "folds": 2,
        "teachers": {"defaults": {"epochs": 1, "device": "cpu", "batch_size": 4}, "pool": [cheap]},
    }
    cfg = write_cfg(tmp_path, raw)
    assert main(["data", "audit", "--config", str(cfg), "--top", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "out-of-sample, 2-fold cross-fitted" in out and "likely label issues" in out
    folds = Path(raw["run_dir"]) / "audit" / "folds"
    stamps = {p: p.stat().st_mtime_ns for p in folds.glob("fold*/cheap/best.safetensors")}
    probs = {p: p.stat().st_mtime_ns for p in folds.glob("fold*/holdout_probs.npz")}
    assert len(stamps) == 2 and len(probs) == 2
    first = pd.read_csv(Path(raw["run_dir"]) / "audit" / "audit.csv")
    assert main(["data", "audit", "--config", str(cfg), "--top", "2", "--device", "cpu"]) == 0
    assert {p: p.stat().st_mtime_ns for p in folds.glob("fold*/cheap/best.safetensors")} == stamps
    assert {p: p.stat().st_mtime_ns for p in folds.glob("fold*/holdout_probs.npz")} == probs
    assert pd.read_csv(Path(raw["run_dir"]) / "audit" / "audit.csv").equals(first)
    # other folds: other held-out rows, so the fold pools are stale and retrained
    assert main(["data", "audit", "--config", str(cfg), "--folds", "3", "--device", "cpu"]) == 0
    record = json.loads((folds / "fold2" / "pool.json").read_text())
    assert record["crossfit"]["folds"] == 3 and record["train_images"] == 8
    assert any(p.stat().st_mtime_ns != t for p, t in stamps.items())


# -- point 4: cleaning that feeds training ---------------------------------------------------------------


def write_audit(path: Path, rows: list[tuple[str, int, int, float, bool]]) -> Path:
    table = pd.DataFrame(
        rows, columns=["image_id", "given_index", "suggested_index", "label_quality", "is_label_issue"]
    )
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table.to_csv(path, index=False)
    return path


TRAIN = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "label": [0, 1, 2, 0], "path": list("abcd")})
AUDIT = [("b", 1, 2, 0.05, True), ("d", 0, 1, 0.2, True), ("a", 0, 0, 0.6, False), ("c", 2, 2, 0.9, False)]


@pytest.mark.parametrize(
    "clean,labels,weights",
    [
        ({"action": "drop"}, {"a": 0, "c": 2}, None),
        ({"action": "drop", "top": 1}, {"a": 0, "c": 2, "d": 0}, None),
        ({"action": "drop", "top": 3}, {"c": 2}, None),
        ({"action": "relabel"}, {"a": 0, "b": 2, "c": 2, "d": 1}, None),
        ({"action": "downweight", "weight": 0.25}, {"a": 0, "b": 1, "c": 2, "d": 0}, [1, 0.25, 1, 0.25]),
    ],
)
def test_clean_drops_relabels_or_downweights_the_chosen_rows(tmp_path, clean, labels, weights):
    from imat.config import CleanConfig
    from imat.data.clean import apply_cleaning, plan_cleaning

    cfg = CleanConfig.model_validate({"from": "x", **clean})
    csv = write_audit(tmp_path / "audit.csv", AUDIT)
    out, kept = apply_cleaning(TRAIN, cfg, plan_cleaning(TRAIN, cfg, csv))
    assert dict(zip(out["image_id"], out["label"], strict=True)) == labels
    assert list(TRAIN["image_id"].iloc[kept]) == list(out["image_id"])
    assert ("weight" in out) == (weights is not None)
    if weights is not None:
        assert out["weight"].tolist() == weights


def test_clean_refuses_an_audit_of_other_labels_or_other_images(tmp_path):
    from imat.config import CleanConfig
    from imat.data.clean import plan_cleaning
    from imat.errors import ImatError

    cfg = CleanConfig.model_validate({"from": "x"})
    with pytest.raises(ImatError, match="audit file not found"):
        plan_cleaning(TRAIN, cfg, tmp_path / "none.csv")
    other = write_audit(tmp_path / "labels.csv", [("b", 2, 2, 0.1, True)])
    with pytest.raises(ImatError, match="1 of 1 audited labels differ"):
        plan_cleaning(TRAIN, cfg, other)
    foreign = write_audit(tmp_path / "ids.csv", [("zz", 0, 1, 0.1, True)])
    with pytest.raises(ImatError, match="not training rows of this run"):
        plan_cleaning(TRAIN, cfg, foreign)
    (tmp_path / "bad.csv").write_text("image_id,score\na,1\n")
    with pytest.raises(ImatError, match="not a label audit: no column given_index"):
        plan_cleaning(TRAIN, cfg, tmp_path / "bad.csv")
    with pytest.raises(Exception, match="greater than or equal to 0"):
        validate({"data": {"clean": {"from": "a.csv", "top": -1}}}, "cfg")
    with pytest.raises(Exception, match="audit.teachers.pool is empty"):
        validate({"audit": {"teachers": {"defaults": {"epochs": 1}}}}, "cfg")
    with pytest.raises(Exception, match="audit.folds: Input should be greater than or equal to 2"):
        validate({"audit": {"folds": 1}}, "cfg")


def test_downweighted_rows_are_sampled_less_by_the_training_loader():
    from torch.utils.data import WeightedRandomSampler

    from imat.config import TrainConfig
    from imat.data import recipe_loaders

    df = pd.DataFrame({"image_id": list("abcd"), "path": list("abcd"), "label": [0, 1, 0, 1]})
    data_cfg = {"input_size": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
    recipe = TrainConfig(batch_size=2)
    plain, _ = recipe_loaders(recipe, data_cfg, df, df.iloc[:0], images=None, decoder="cv2", num_workers=0)
    assert not isinstance(plain.sampler, WeightedRandomSampler)
    weighted = df.assign(weight=[1.0, 0.1, 1.0, 1.0])
    loader, _ = recipe_loaders(
        recipe, data_cfg, weighted, df.iloc[:0], images=None, decoder="cv2", num_workers=0
    )
    assert isinstance(loader.sampler, WeightedRandomSampler)
    assert loader.sampler.weights.tolist() == pytest.approx([1.0, 0.1, 1.0, 1.0])
    draws = np.bincount([i for _ in range(200) for i in loader.sampler], minlength=4)
    assert draws[1] < draws[0] / 4 and draws[1] < draws[2] / 4
    balanced = recipe.model_copy(update={"aug": recipe.aug.model_copy(update={"balanced_sampler": True})})
    loader, _ = recipe_loaders(
        balanced, data_cfg, weighted, df.iloc[:0], images=None, decoder="cv2", num_workers=0
    )
    assert loader.sampler.weights.tolist() == pytest.approx([0.5, 0.05, 0.5, 0.5])


def test_teachers_and_student_train_on_the_same_cleaned_rows(tmp_path):
    from distill.train import split_with_noise
    from imat.manifest import load_manifest
    from teachers.train import split_frames, train_pool

    raw = tiny_run(tmp_path, n_train=12, label_noise={"fraction": 0.25, "seed": 1})
    cfg0 = validate(raw, "t")
    df, classes = load_manifest(cfg0.manifest_path)
    from imat.data import labelled_splits

    noisy, _, truth = labelled_splits(df, cfg0.data.label_noise, 3)
    flipped = noisy.loc[noisy["label"].to_numpy() != truth, "image_id"].tolist()
    assert len(flipped) == 3
    rows = [
        (i, int(lab), int(t), 0.1 if i in flipped else 0.9, i in flipped)
        for i, lab, t in zip(noisy["image_id"], noisy["label"], truth, strict=True)
    ]
    write_audit(tmp_path / "audit.csv", rows)
    raw["data"]["clean"] = {"from": str(tmp_path / "audit.csv"), "action": "drop"}
    cfg = validate(raw, "t")
    teacher_rows, _ = split_frames(cfg, df, classes, cfg.manifest_path)
    student_rows, _ = split_with_noise(cfg, df, classes, cfg.manifest_path, tmp_path / "student")
    assert list(teacher_rows["image_id"]) == list(student_rows["image_id"])
    assert len(teacher_rows) == 9 and not set(flipped) & set(teacher_rows["image_id"])
    record = pd.read_csv(tmp_path / "student" / "label_noise.csv")  # the clean labels follow the kept rows
    assert len(record) == 9 and not record["flipped"].any()
    train_pool(cfg)
    pool = json.loads((cfg.pool_dir / "pool.json").read_text())
    assert pool["train_images"] == 9
    assert pool["clean"]["action"] == "drop" and pool["clean"]["images"] == 3
    assert (
        pool["clean"]["from"] == str((tmp_path / "audit.csv").resolve())
        and len(pool["clean"]["sha256"]) == 64
    )
    resolved = yaml.safe_load((cfg.run_path / "config.yaml").read_text())
    assert resolved["data"]["clean"]["from"] == str(tmp_path / "audit.csv")  # YAML keeps the key `from`


def test_a_pool_trained_on_other_labels_is_retrained_not_reused(tmp_path):
    from teachers.train import train_pool

    raw = tiny_run(tmp_path, n_train=12, n_val=3)
    cfg = validate(raw, "t")
    assert [r.status for r in train_pool(cfg)] == ["trained"]
    assert [r.status for r in train_pool(cfg)] == ["skipped"]
    raw["data"]["label_noise"] = {"fraction": 0.25}
    noisy = validate(raw, "t")
    assert [r.status for r in train_pool(noisy)] == ["trained"]
    assert json.loads((noisy.pool_dir / "pool.json").read_text())["label_noise"]["fraction"] == 0.25
