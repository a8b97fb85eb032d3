"""``train.lr`` is set for a reference batch and rescaled to the global batch (batch_size x ranks x
accum_steps): linear for SGD, square root for Adam-type optimisers; tuned configs carry their base."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from test_accumulation import _net, _two_optimisers
from torch.utils.data import DataLoader

from imat.config.train import TrainConfig
from imat.engine.optim import lr_factor, lr_scale_rule


def test_rules():
    assert lr_scale_rule("auto", "sgd") == "linear"
    assert lr_scale_rule("auto", "adamw") == lr_scale_rule("auto", "adam") == "sqrt"
    assert lr_scale_rule("none", "sgd") == "none" and lr_scale_rule("linear", "adam") == "linear"
    assert lr_factor("linear", 2048, 256) == 8.0
    assert lr_factor("sqrt", 2048, 256) == pytest.approx(math.sqrt(8))
    assert lr_factor("none", 2048, 256) == 1.0
    assert lr_factor("linear", 128, 256) == 0.5  # a smaller global batch lowers it


def _engine(tmp_path, monkeypatch, world: int, manual: bool = False, **kw):
    from imat.engine import ClassificationTask, Engine
    from imat.engine import distributed as d

    monkeypatch.setattr(d, "world_size", lambda: world)  # N ranks, as the engine sees them
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8), torch.arange(8) % 3)
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 4, "lr": 0.1, "device": "cpu", **kw})
    task = _two_optimisers() if manual else ClassificationTask(_net())
    return Engine(task, cfg, tmp_path, DataLoader(data, batch_size=4), progress=False, tensorboard=False)


def _lrs(engine) -> dict[str, float]:
    return {name: opt.param_groups[0]["base_lr"] for name, opt in engine.optimizers.items()}


def test_one_process_trains_at_lr_as_written(tmp_path, monkeypatch):
    engine = _engine(tmp_path, monkeypatch, 1)
    assert engine.global_batch == 4 and _lrs(engine) == {"main": 0.1}
    assert all(g["lr"] == 0.1 for g in engine.optimizers["main"].param_groups)


@pytest.mark.parametrize(
    "world,kw,want",
    [
        (8, {}, 0.8),  # 8 ranks x batch 4: 8x the batch the lr was set for, SGD: linear
        (8, {"optimizer": "adamw", "lr": 1e-3}, 1e-3 * math.sqrt(8)),  # Adam-type: square root
        (8, {"lr_scale": "none"}, 0.1),
        (8, {"lr_scale": "sqrt"}, 0.1 * math.sqrt(8)),
        (1, {"accum_steps": 4}, 0.4),  # accumulation grows the global batch too
        (8, {"lr_base_batch": 64}, 0.05),  # set for 64, trained at 32
        (2, {"accum_steps": 2, "lr_base_batch": 256}, 0.1 * 16 / 256),
    ],
)
def test_lr_follows_the_global_batch(tmp_path, monkeypatch, world, kw, want):
    engine = _engine(tmp_path, monkeypatch, world, **kw)
    assert engine.global_batch == 4 * world * kw.get("accum_steps", 1)
    assert _lrs(engine)["main"] == pytest.approx(want)
    assert all(g["lr"] == pytest.approx(want) for g in engine.optimizers["main"].param_groups)


def test_each_optimiser_scales_by_its_own_kind(tmp_path, monkeypatch):
    """MEAL's shape: an SGD student (linear) beside Adam discriminators (square root)."""
    engine = _engine(tmp_path, monkeypatch, 4, manual=True)
    assert _lrs(engine) == pytest.approx({"main": 0.4, "disc": 1e-2 * 2})
    assert engine.scaling["lr_rule_main"] == "linear" and engine.scaling["lr_rule_disc"] == "sqrt"


def test_effective_lr_and_global_batch_are_printed_and_saved(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.yaml").write_text("distill:\n  train:\n    lr: 0.1\n")
    engine = _engine(tmp_path, monkeypatch, 1, accum_steps=2)
    engine.progress = True
    df = engine.fit()
    err = capsys.readouterr().err
    assert "global batch 8 = 4 x 1 rank(s) x 2 accumulation step(s)" in err and "main 0.2 (linear x2)" in err
    assert df["global_batch"].tolist() == [8] and df["lr_main"].iloc[0] == pytest.approx(0.2)
    text = (tmp_path / "config.yaml").read_text()
    assert "#   global_batch: 8" in text and "#   lr_main: 0.2" in text
    assert yaml.safe_load(text) == {"distill": {"train": {"lr": 0.1}}}  # still the same config
    engine.fit(resume=True)  # noted once, not once per start
    assert (tmp_path / "config.yaml").read_text().count("global_batch") == 1


def test_a_tuned_config_replayed_at_another_world_size_is_rescaled(tmp_path, monkeypatch):
    """A sweep at 2 workers x batch 4 found lr 0.1 (effective 0.2); replayed at 32 workers, and with a
    changed batch size, its effective lr follows the global batch from the tuned base."""
    from distill.tune import record_tuned_batch

    raw = {"distill": {"train": {"batch_size": 4, "lr": 0.1, "optimizer": "sgd"}}}
    note = record_tuned_batch(raw, workers=2)
    assert note.startswith("# tuned at global batch 8 (2 worker(s) x batch 4")
    train = raw["distill"]["train"]
    assert train["lr_base_batch"] == 4
    tuned = _engine(tmp_path / "a", monkeypatch, 2, **train)
    replay = _engine(tmp_path / "b", monkeypatch, 32, **train)
    assert _lrs(tuned)["main"] == pytest.approx(0.2)
    assert _lrs(replay)["main"] == pytest.approx(0.2 * 16)  # 16x the tuned global batch
    # a replay that also doubles the per-rank batch: the pinned base keeps the rule honest
    bigger = _engine(tmp_path / "c", monkeypatch, 32, **{**train, "batch_size": 8})
    assert bigger.global_batch == 256 and _lrs(bigger)["main"] == pytest.approx(0.1 * 256 / 4)
