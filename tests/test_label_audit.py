"""The label audit (in-sample and K-fold cross-fitted, cleanlab), the label record in pool.json,
and cleaning that feeds training (`data.clean`), on tiny coloured squares and tiny teachers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scale_kit import write_squares

from imat.cli import main
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
