"""The engine's optimisation: per-group learning rates through warm-up and schedules, EMA, weight decay
exemptions, mixup targets and torch.compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_kit import loaders, tiny_cnn, train_cfg
from torch import nn

from imat.engine import ClassificationTask, Engine, LrSchedule, Task
from imat.weights import load_weights


class TwoOptimizers(Task):
    """Manual optimisation with three param groups across two optimisers, recording every lr."""

    manual_optimization = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.disc = nn.Linear(3, 1)
        self.lrs: list[tuple[float, float, float]] = []

    def modules(self):
        return {"model": self.model, "disc": self.disc}

    def param_groups(self):
        body = [p for n, p in self.model.named_parameters() if not n.startswith("6.")]
        head = list(self.model[6].parameters())
        return {
            "main": [{"params": body}, {"params": head, "lr": 0.01}],
            "disc": [{"params": self.disc.parameters(), "lr": 0.001}],
        }

    def optimizer_options(self):
        return {"disc": {"optimizer": "adam", "betas": (0.5, 0.999), "weight_decay": 0.0}}

    def step(self, batch, ctx):
        main, disc = ctx.optimizers["main"], ctx.optimizers["disc"]
        self.lrs.append((main.param_groups[0]["lr"], main.param_groups[1]["lr"], disc.param_groups[0]["lr"]))
        with ctx.autocast():
            logits = self.model(batch["image"])
        d_loss = self.disc(logits.detach().float()).pow(2).mean()
        ctx.optimize("disc", d_loss)
        loss = (
            nn.functional.cross_entropy(logits.float(), batch["label"])
            + 0.1 * self.disc(logits.float()).mean()
        )
        ctx.optimize("main", loss)
        return {"loss": loss.detach(), "d_loss": d_loss.detach()}


def test_per_group_lr_keeps_its_ratio_through_warmup_and_cosine(tmp_path: Path) -> None:
    train, val = loaders()
    task = TwoOptimizers(tiny_cnn())
    engine = Engine(task, train_cfg(epochs=3, lr=0.1, warmup_epochs=1), tmp_path, train, val, progress=False)
    assert isinstance(engine.optimizers["disc"], torch.optim.Adam)
    df = engine.fit()
    lrs = torch.tensor(task.lrs, dtype=torch.float64)
    assert lrs.shape == (18, 3)
    assert torch.allclose(lrs[:, 1] / lrs[:, 0], torch.full((18,), 0.1, dtype=torch.float64))
    assert torch.allclose(lrs[:, 2] / lrs[:, 0], torch.full((18,), 0.01, dtype=torch.float64))
    # warm-up over the first epoch (6 steps), then cosine decay
    assert lrs[:6, 0].tolist() == pytest.approx([0.1 * (i + 1) / 6 for i in range(6)])
    assert (lrs[6:, 0].diff() < 0).all()
    assert {"train_d_loss", "lr_main", "lr_main_1", "lr_disc"} <= set(df.columns)
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(ckpt["modules"]) == {"model", "disc"} and set(ckpt["optimizers"]) == {"main", "disc"}


def test_schedules() -> None:
    cos = LrSchedule(train_cfg(epochs=4, warmup_epochs=1, min_lr_ratio=0.1), steps_per_epoch=10)
    factors = [cos.factor(s) for s in range(40)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1, abs=0.01)
    assert min(factors[10:]) >= 0.1
    ms = LrSchedule(
        train_cfg(epochs=4, schedule="multistep", milestones=[2, 3], lr_gamma=0.5), steps_per_epoch=10
    )
    assert [ms.factor(s) for s in (0, 19, 20, 29, 30, 39)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    const = LrSchedule(train_cfg(epochs=2, schedule="constant", warmup_epochs=0.5), steps_per_epoch=4)
    assert [const.factor(s) for s in range(8)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1])


def test_ema_differs_from_raw_weights_and_is_what_gets_saved(tmp_path: Path) -> None:
    train, val = loaders()
    engine = Engine(
        ClassificationTask(tiny_cnn()),
        train_cfg(epochs=2, ema=True, ema_decay=0.9, best_metric="loss"),  # val loss falls: epoch 2 is best
        tmp_path,
        train,
        val,
        progress=False,
    )
    df = engine.fit()
    raw = engine.task.model.state_dict()
    ema = engine.ema.module.state_dict()
    assert not torch.equal(raw["0.weight"], ema["0.weight"])
    assert {"val_raw_top1", "val_raw_loss"} <= set(df.columns)
    state, meta = load_weights(tmp_path / "best.safetensors")
    assert meta["ema"] is True and meta["epoch"] == 2 and df["val_loss"].iloc[1] < df["val_loss"].iloc[0]
    assert torch.equal(state["0.weight"], ema["0.weight"])
    assert engine.evaluate(val)["loss"] != engine.evaluate(val, use_ema=False)["loss"]


def test_mixup_soft_targets(tmp_path: Path) -> None:
    from timm.data import Mixup

    mix = Mixup(mixup_alpha=0.4, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=3)
    train, val = loaders(n=45)  # odd last batch: one image is dropped before mixing
    df = Engine(
        ClassificationTask(tiny_cnn(), mixup=mix), train_cfg(epochs=1), tmp_path, train, val, progress=False
    ).fit()
    assert df["train_loss"].notna().all() and "train_top1" not in df.columns


def test_compile_flag_compiles_in_place_trains_and_keeps_weight_names(tmp_path: Path) -> None:
    train, val = loaders()
    model = tiny_cnn()
    keys = list(model.state_dict())
    engine = Engine(
        ClassificationTask(model), train_cfg(compile=True, epochs=2), tmp_path, train, val, progress=False
    )
    assert model._compiled_call_impl is not None and list(model.state_dict()) == keys
    df = engine.fit()  # the compiled module trains and its checkpoint loads into a plain one
    assert list(df["epoch"]) == [1, 2] and df["train_loss"].notna().all()
    plain = tiny_cnn()
    plain.load_state_dict(load_weights(tmp_path / "best.safetensors")[0])


class LayerScaleNet(nn.Module):
    """Conv + BN + layer-scale gain + a 2-D position table named in no_weight_decay() + head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gamma = nn.Parameter(torch.ones(4))
        self.pos = nn.Parameter(torch.zeros(4, 1))
        self.head = nn.Linear(4, 3)

    def no_weight_decay(self) -> set[str]:
        return {"pos"}

    def forward(self, x):
        x = self.bn(self.conv(x)) * self.gamma[None, :, None, None] + self.pos[None, :, :, None]
        return self.head(x.mean((2, 3)))


def test_weight_decay_spares_norms_biases_layer_scale_and_named_tables(tmp_path: Path) -> None:
    train, val = loaders()
    model = LayerScaleNet()
    names = {id(p): n for n, p in model.named_parameters()}
    engine = Engine(
        ClassificationTask(model), train_cfg(optimizer="adamw", weight_decay=0.05), tmp_path, train, val
    )
    groups = engine.optimizers["main"].param_groups
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {"conv.weight", "head.weight"}
    spared = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert spared == {"conv.bias", "bn.weight", "bn.bias", "gamma", "pos", "head.bias"}
    assert all(g["lr"] == groups[0]["lr"] for g in groups)
    df = engine.fit()
    assert "lr_main_1" not in df.columns  # the weight-decay-free twin shares its lr: no extra column
    everything = Engine(
        ClassificationTask(LayerScaleNet()),
        train_cfg(optimizer="adamw", weight_decay=0.05, decay_norm_and_bias=True),
        tmp_path / "all",
        train,
        val,
    )
    assert [g["weight_decay"] for g in everything.optimizers["main"].param_groups] == [0.05]


def test_ema_is_timms_model_ema_v3_with_warmup(tmp_path: Path) -> None:
    from timm.utils import ModelEmaV3

    train, val = loaders()
    engine = Engine(ClassificationTask(tiny_cnn()), train_cfg(epochs=1, ema=True), tmp_path, train, val)
    assert isinstance(engine.ema, ModelEmaV3)
    assert engine.ema.current_decay() == 0.0  # the first update copies the model
    engine.fit()
    assert engine.ema.updates == engine.global_step == 6
    assert 0.0 < engine.ema.current_decay() < engine.cfg.ema_decay  # still warming up
