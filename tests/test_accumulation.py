"""Gradient accumulation (``train.accum_steps``): N batches of b per optimiser step train what one batch
of N x b trains, for a one-backward task and for alternating optimisers (MEAL's discriminators)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from imat.config.train import TrainConfig
from imat.errors import ImatError


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.x[:, 0] += self.y[:, None, None].float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": int(self.y[i]), "index": i}


def _net() -> nn.Module:  # no BatchNorm or dropout: its update does not depend on how a batch is split
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def _two_optimisers(d_steps: int = 1):
    """MEAL's shape: a discriminator with its own optimiser and loss, and a student whose loss reaches
    the discriminator's parameters (the adversarial term). The student steps first, so one batch of
    N x b and N accumulated batches of b see the same networks."""
    from imat.engine.task import Task

    class TwoSteps(Task):
        manual_optimization = True

        def __init__(self, model):
            super().__init__(model)
            torch.manual_seed(1)
            self.disc = nn.Linear(3, 1)

        def modules(self):
            return {"model": self.model, "disc": self.disc}

        def param_groups(self):
            return {
                "main": [{"params": list(self.model.parameters())}],
                "disc": [{"params": list(self.disc.parameters())}],
            }

        def optimizer_options(self):
            return {"disc": {"optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0}}

        def step(self, batch, ctx):
            logits = self.model(batch["image"])
            loss = nn.functional.cross_entropy(logits, batch["label"]) + 0.1 * self.disc(logits).mean()
            ctx.optimize("main", loss)
            for _ in range(d_steps):
                d_loss = (self.disc(logits.detach()) - 1).pow(2).mean()
                ctx.optimize("disc", d_loss)
            return {"loss": loss.detach()}

    return TwoSteps(_net())


def accum_engine(out: Path, batch: int, accum: int, manual: bool, d_steps: int = 1, **cfg_kw):
    """An engine on 32 toy images, lr set for the global batch 16 (so every split trains at one lr)."""
    from imat.engine import ClassificationTask, Engine

    loader = DataLoader(Images(), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    base = dict(epochs=2, batch_size=batch, accum_steps=accum, lr=0.1, lr_base_batch=16, device="cpu")
    cfg = TrainConfig(**{**base, "weight_decay": 1e-3, **cfg_kw})
    task = _two_optimisers(d_steps) if manual else ClassificationTask(_net())
    return Engine(task, cfg, out, loader, None, progress=False, tensorboard=False)


def _weights(engine) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v for n, m in engine.task.modules().items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("manual", [False, True])
def test_four_accumulated_batches_of_4_equal_one_batch_of_16(tmp_path, manual):
    big = accum_engine(tmp_path / "big", batch=16, accum=1, manual=manual)
    big.fit()
    small = accum_engine(tmp_path / "small", batch=4, accum=4, manual=manual)
    df = small.fit()
    assert small.update_step == big.update_step == 4  # 2 epochs x 2 optimiser steps
    assert list(df["global_step"]) == [8, 16] and list(df["global_batch"]) == [16, 16]
    want, got = _weights(big), _weights(small)
    for key, value in want.items():
        assert torch.allclose(value, got[key], atol=1e-5), key
    # and the accumulation mattered: one step per batch of 4 trains other weights
    plain = accum_engine(tmp_path / "plain", batch=4, accum=1, manual=manual, lr_scale="none")
    plain.fit()
    assert any(not torch.allclose(v, _weights(plain)[k], atol=1e-5) for k, v in want.items())


def test_an_uneven_last_cycle_and_a_schedule_per_update(tmp_path):
    """32 images in batches of 4 with accum 3: cycles of 3, 3 and 2 batches per epoch, 3 updates; the
    schedule runs over updates (warm-up of one epoch = 3 updates)."""
    engine = accum_engine(tmp_path, batch=4, accum=3, manual=False, warmup_epochs=1.0, schedule="constant")
    df = engine.fit()
    assert engine.updates_per_epoch == 3 and engine.update_step == 6
    assert df["lr_main"].tolist() == pytest.approx([0.1 * 12 / 16] * 2)  # global batch 12, lr set for 16
    # the last cycle (2 batches) averages over its own 8 images: as batches of 12, 12 and 8 train
    whole = accum_engine(
        tmp_path / "whole", batch=12, accum=1, manual=False, warmup_epochs=1.0, schedule="constant"
    )
    whole.fit()
    assert whole.update_step == 6
    for key, value in _weights(whole).items():
        assert torch.allclose(value, _weights(engine)[key], atol=1e-5), key


def test_mid_epoch_checkpoints_keep_coming_under_accumulation(tmp_path):
    """48 images in batches of 4 with accum 3: updates end at batches 3, 6, 9 and 12 of each epoch, so
    ``ckpt_every_steps=4`` never lands on an update boundary; a checkpoint still follows every 4 batches
    at the next boundary (counting from the last save)."""
    from engine_kit import loaders, tiny_cnn, train_cfg

    from imat.engine import ClassificationTask, Engine

    train, _ = loaders(n=48, batch=4)
    cfg = train_cfg(epochs=2, batch_size=4, accum_steps=3, ckpt_every_steps=4)
    engine = Engine(
        ClassificationTask(tiny_cnn()), cfg, tmp_path, train, None, progress=False, tensorboard=False
    )
    saved = []
    save = engine._save_last

    def spy(epoch, step_in_epoch, *args):
        saved.append((epoch, step_in_epoch))
        return save(epoch, step_in_epoch, *args)

    engine._save_last = spy
    engine.fit()
    # mid-epoch at batch 6 of each epoch (4 batches since the last save, at a boundary), plus epoch ends
    assert [s for s in saved if s[1]] == [(0, 6), (1, 6)]
    assert len(saved) == 4


def test_several_updates_of_one_optimiser_per_batch_refuse_accumulation(tmp_path):
    engine = accum_engine(tmp_path, batch=4, accum=2, manual=True, d_steps=2)
    with pytest.raises(ImatError, match="accum_steps=2.*'disc' more than once"):
        engine.fit()


class _Squares(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.arange(n) % 5

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": int(self.y[i]), "index": i}


def _meal_discriminators(out: Path, batch: int, accum: int) -> dict[str, torch.Tensor]:
    """The real MEAL task (alternating discriminators) for one update on 8 images; BatchNorm frozen so
    a network's output does not depend on how the 8 images are split into batches."""
    from meal_kit import MEAN, STD, meal_task, tiny
    from timm.layers import freeze_batch_norm_2d

    from distill.teachers_runtime import FrozenTeacher, TeacherEnsemble
    from imat.engine import Engine

    student = freeze_batch_norm_2d(tiny(100))
    teacher = FrozenTeacher("t0", tiny(0, arch="resnet18"), 40, MEAN, STD, False)
    task = meal_task(
        student,
        TeacherEnsemble([teacher], "mean", seed=0),
        [2, "logits"],
        [[2, "logits"]],
        lengths=[20, None],
        num_classes=5,
        adversarial=dict(enabled=True, mode="alternating", lr=0.05, optimizer="adam"),
    )
    loader = DataLoader(_Squares(), batch_size=batch, shuffle=False)
    cfg = TrainConfig(epochs=1, batch_size=batch, accum_steps=accum, lr=0.05, lr_scale="none", device="cpu")
    engine = Engine(task, cfg, out, loader, None, progress=False, tensorboard=False)
    engine.fit()
    assert engine.update_step == 1
    return {k: v.clone() for k, v in task.discriminators.state_dict().items()}


def test_meal_discriminators_accumulate_the_whole_cycle(tmp_path):
    """Two accumulated batches of 4 update MEAL's discriminators as one batch of 8 does (their
    gradient is the cycle's, not only its last batch's)."""
    want = _meal_discriminators(tmp_path / "one", batch=8, accum=1)
    got = _meal_discriminators(tmp_path / "two", batch=4, accum=2)
    assert want
    for key, value in want.items():
        assert torch.allclose(value, got[key], atol=1e-5), key
