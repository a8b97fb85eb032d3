from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imat.config.train import TrainConfig
from imat.engine import ClassificationTask, Engine, LrSchedule, Task
from imat.engine.checkpoint import get_rng_state, set_rng_state
from imat.errors import ImatError
from imat.metrics import topk_accuracy
from imat.weights import load_weights, read_meta

REPO = Path(__file__).resolve().parents[1]


# A tiny learnable problem: the class shifts the mean of channel 0, so a 1-conv net learns it fast.
class ToyData(Dataset):
    def __init__(self, n=48, seed=0, classes=3, size=16):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % classes
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.x[:, 0] += 1.5 * self.y[:, None, None].float()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": int(self.y[i]), "index": i}


def collate(items):
    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([it["label"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        "skipped": 1 if len(items) % 2 else 0,
    }


def tiny_cnn(classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )


def loaders(n=48, batch=8, seed=0, generator=True, size=16):
    # generator=False: the sampler draws its order from the global torch RNG (the harder resume case)
    gen = torch.Generator().manual_seed(seed) if generator else None
    train = DataLoader(
        ToyData(n, size=size), batch_size=batch, shuffle=True, collate_fn=collate, generator=gen
    )
    val = DataLoader(ToyData(24, seed=1, size=size), batch_size=16, collate_fn=collate)
    return train, val


# The same helpers, as source, for the training script run (and killed) in a subprocess.
COMMON = (
    "import torch\nfrom torch import nn\nfrom torch.utils.data import DataLoader, Dataset\n\n"
    + "\n\n".join(inspect.getsource(obj) for obj in (ToyData, collate, tiny_cnn, loaders))
)

RUN_SCRIPT = (
    COMMON
    + """
import sys, time
from imat.config.train import TrainConfig
from imat.engine import ClassificationTask, Engine

torch.set_num_threads(1)
out, resume, slow, gen = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3]), sys.argv[4] == "gen"


class SlowTask(ClassificationTask):
    def step(self, batch, ctx):
        time.sleep(slow)
        return super().step(batch, ctx)


cfg = TrainConfig(epochs=3, lr=0.05, momentum=0.9, ema=True, warmup_epochs=0.5, ckpt_every_steps=3,
                  device="cpu", seed=7)
train, val = loaders(n=64, generator=gen)
engine = Engine(SlowTask(tiny_cnn()), cfg, out, train, val, meta={"arch": "tiny"}, progress=False, tensorboard=False)
engine.fit(resume=resume)
"""
)


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, lr=0.05, device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_fit_learns_and_writes_files(tmp_path: Path) -> None:
    train, val = loaders()
    engine = Engine(
        ClassificationTask(tiny_cnn()), _cfg(epochs=4), tmp_path, train, val, meta={"arch": "tiny"}
    )
    df = engine.fit()
    assert list(df["epoch"]) == [1, 2, 3, 4]
    assert df["train_loss"].iloc[-1] < df["train_loss"].iloc[0]
    summary = pd.read_csv(tmp_path / "summary.csv")
    for col in ["epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top3", "val_top1_err",
                "val_top3_err", "lr_main", "images_per_s", "epoch_time_s", "skipped", "is_best"]:  # fmt: skip
        assert col in summary.columns, col
    assert len(summary) == 4
    # 48 training images in batches of 8 -> never odd; validation 24 in 16 + 8 -> 0 skipped per the collate
    assert (summary["skipped"] == 0).all()
    assert summary["val_top3_err"].tolist() == pytest.approx((1 - summary["val_top3"]).tolist())
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["step_in_epoch"] == 0 and ckpt["global_step"] == 24
    assert len(ckpt["history"]) == 4 and set(ckpt["modules"]) == {"model"}
    state, meta = load_weights(tmp_path / "best.safetensors")
    assert meta["arch"] == "tiny" and meta["best_metric"] == "top1"
    assert meta["epoch"] == int(summary.loc[summary["is_best"], "epoch"].iloc[-1])
    assert set(state) == set(engine.task.model.state_dict())
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())


class LabelledPixels(Dataset):
    """Images that carry their label (channel 0) and their rank in the split (channel 1) in one pixel."""

    def __init__(self, n=24):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.zeros(3, 8, 8)
        x[0, 0, 0], x[1, 0, 0] = i % 3, i / self.n
        return {"image": x, "label": i % 3, "index": i}


class ScheduledValidation(ClassificationTask):
    """Trains for real, but validation top-1 follows ``accuracy[epoch]``: the first share of the split
    is predicted right, the rest wrong."""

    def __init__(self, model, accuracy):
        super().__init__(model)
        self.accuracy, self.epoch = accuracy, 0

    def on_epoch_start(self, epoch):
        self.epoch = epoch

    def eval_logits(self, images):
        label = images[:, 0, 0, 0].round().long()
        right = images[:, 1, 0, 0] < self.accuracy[self.epoch] - 1e-6
        return nn.functional.one_hot(torch.where(right, label, (label + 1) % 3), 3).float()


def test_best_checkpoint_is_the_best_validation_epoch_not_the_last(tmp_path: Path) -> None:
    train = DataLoader(
        LabelledPixels(24), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    val = DataLoader(LabelledPixels(24), batch_size=8)
    task = ScheduledValidation(tiny_cnn(), accuracy=[0.5, 0.75, 0.25])
    Engine(task, _cfg(epochs=3), tmp_path, train, val, meta={"arch": "tiny"}, progress=False).fit()
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["val_top1"].tolist() == pytest.approx([0.5, 0.75, 0.25])
    assert summary["is_best"].tolist() == [True, True, False]
    meta = read_meta(tmp_path / "best.safetensors")
    assert meta["epoch"] == 2 and meta["metrics"]["val_top1"] == pytest.approx(0.75)


def test_skipped_images_are_summed(tmp_path: Path) -> None:
    train, val = loaders(n=45, batch=8)  # 6 batches, the last one has 5 items -> collate says 1 skipped
    df = Engine(ClassificationTask(tiny_cnn()), _cfg(epochs=1), tmp_path, train, None, progress=False).fit()
    assert df["skipped"].tolist() == [1] and df["train_images"].tolist() == [45]
    assert "val_top1" not in df.columns and (tmp_path / "best.safetensors").exists()


def test_evaluate_returns_outputs_consistent_with_metrics(tmp_path: Path) -> None:
    train, val = loaders()
    engine = Engine(ClassificationTask(tiny_cnn()), _cfg(epochs=1), tmp_path, train, val, progress=False)
    res = engine.evaluate(val, return_outputs=True)
    assert (
        res["logits"].shape == (24, 3)
        and res["labels"].shape == (24,)
        and res["index"].tolist() == list(range(24))
    )
    acc = topk_accuracy(res["logits"], res["labels"])
    assert res["top1"] == pytest.approx(acc["top1"]) and res["top3"] == pytest.approx(acc["top3"])
    loss = nn.functional.cross_entropy(res["logits"], res["labels"]).item()
    assert res["loss"] == pytest.approx(loss, rel=1e-5)


def test_tuple_batches_and_step_cap(tmp_path: Path) -> None:
    x, y = torch.randn(40, 3, 16, 16), torch.arange(40) % 3
    train = DataLoader(list(zip(x, y, strict=True)), batch_size=4, shuffle=True)
    cfg = _cfg(epochs=2, max_steps_per_epoch=3)
    df = Engine(ClassificationTask(tiny_cnn()), cfg, tmp_path, train, train, progress=False).fit()
    assert df["global_step"].tolist() == [3, 6] and df["train_images"].tolist() == [12, 12]


def test_resume_finished_run_is_noop_and_foreign_checkpoint_is_rejected(tmp_path: Path) -> None:
    train, val = loaders()
    df = Engine(ClassificationTask(tiny_cnn()), _cfg(epochs=2), tmp_path, train, val, progress=False).fit()
    before = (tmp_path / "last.ckpt").stat().st_mtime_ns
    again = Engine(ClassificationTask(tiny_cnn()), _cfg(epochs=2), tmp_path, train, val, progress=False).fit(
        resume=True
    )
    assert (tmp_path / "last.ckpt").stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(df, again)
    other = Engine(
        ClassificationTask(tiny_cnn(classes=5)), _cfg(epochs=3), tmp_path, train, val, progress=False
    )
    with pytest.raises(ImatError, match=r"last\.ckpt: checkpoint does not match 'model'.*shape mismatch"):
        other.fit(resume=True)


def _wait_for(path: Path, predicate, timeout: float, proc: subprocess.Popen) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training process ended early: {proc.stderr.read().decode()[-2000:]}")
        if path.exists():
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # being renamed into place
                ckpt = None
            if ckpt is not None and predicate(ckpt):
                return ckpt
        time.sleep(0.02)
    raise AssertionError("timed out waiting for a checkpoint")


def _run(out: Path, resume: bool, slow: float, sampler: str) -> subprocess.Popen:
    script = out.parent / "run_engine.py"
    script.write_text(RUN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(out), "1" if resume else "0", str(slow), sampler],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("sampler", ["gen", "global"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path: Path, sampler: str) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = _run(full, resume=False, slow=0.0, sampler=sampler)
    victim = _run(killed, resume=False, slow=0.15, sampler=sampler)
    # 64 images / 8 = 8 steps per epoch, checkpoints every 3 steps: wait for one inside epoch 2
    _wait_for(killed / "last.ckpt", lambda c: c["epoch"] == 1 and c["step_in_epoch"] > 0, 120, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    state = torch.load(killed / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and state["step_in_epoch"] > 0, "kill did not land mid-epoch"
    assert len(pd.read_csv(killed / "summary.csv")) == 1
    assert ref.wait(timeout=120) == 0, ref.stderr.read().decode()[-2000:]
    resumed = _run(killed, resume=True, slow=0.0, sampler=sampler)
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read().decode()[-2000:]

    a = torch.load(full / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(killed / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"] == 24
    for key, value in a["modules"]["model"].items():  # bit-for-bit on the CPU
        assert torch.equal(value, b["modules"]["model"][key]), key
    for key, value in a["ema"]["module"].items():
        assert torch.equal(value, b["ema"]["module"][key]), key
    bufs_a = [s["momentum_buffer"] for s in a["optimizers"]["main"]["state"].values()]
    bufs_b = [s["momentum_buffer"] for s in b["optimizers"]["main"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(bufs_a, bufs_b, strict=True))
    sa, sb = pd.read_csv(full / "summary.csv"), pd.read_csv(killed / "summary.csv")
    assert sb["epoch"].tolist() == [1, 2, 3]
    for col in ["train_loss", "train_top1", "val_loss", "val_top1", "val_top3", "lr_main", "train_images"]:
        assert sa[col].tolist() == sb[col].tolist(), col
    assert read_meta(killed / "best.safetensors")["epoch"] == read_meta(full / "best.safetensors")["epoch"]


class NanAt(ClassificationTask):
    def __init__(self, model: nn.Module, at: int) -> None:
        super().__init__(model)
        self.at = at

    def step(self, batch, ctx):
        out = super().step(batch, ctx)
        if ctx.step == self.at:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_guard_stops_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    train, val = loaders()  # 6 steps per epoch; NaN at global step 8 = epoch 2, step 3
    engine = Engine(NanAt(tiny_cnn(), at=8), _cfg(epochs=3), tmp_path, train, val, progress=False)
    with pytest.raises(
        ImatError,
        match=r"non-finite loss at epoch 2 step 3: loss=nan; last good checkpoint kept at .*last\.ckpt",
    ):
        engine.fit()
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0 and ckpt["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["modules"]["model"].values() if v.is_floating_point())
    assert len(pd.read_csv(tmp_path / "summary.csv")) == 1
    # the weights in memory were not updated by the bad step either
    assert all(torch.isfinite(p).all() for p in engine.task.model.parameters())


class NanGradAt(ClassificationTask):
    """A finite loss whose gradients are NaN at the given global steps (an overflow or a faulty kernel)."""

    def __init__(self, model: nn.Module, steps: set[int]) -> None:
        super().__init__(model)
        self.steps, self.poison = steps, False
        nan = float("nan")
        next(model.parameters()).register_hook(lambda g: torch.full_like(g, nan) if self.poison else g)

    def step(self, batch, ctx):
        self.poison = ctx.step in self.steps
        return super().step(batch, ctx)


def test_nonfinite_gradients_skip_the_step_and_are_counted(tmp_path: Path) -> None:
    train, val = loaders()  # 6 steps per epoch
    engine = Engine(
        NanGradAt(tiny_cnn(), {4}), _cfg(epochs=2, grad_clip=5.0), tmp_path, train, val, progress=False
    )
    df = engine.fit()
    assert df["nonfinite_grad_steps"].tolist() == [1, 0]
    assert df["grad_norm_main"].notna().all()  # the skipped step's NaN norm is not averaged in
    assert df["train_loss"].notna().all() and df["val_top1"].iloc[-1] > 0.5  # training went on
    assert all(torch.isfinite(p).all() for p in engine.task.model.parameters())


def test_nonfinite_gradients_in_a_row_stop_the_run(tmp_path: Path) -> None:
    train, val = loaders()  # 6 steps per epoch: NaN gradients from global step 7 (epoch 2, step 2) on
    cfg = _cfg(epochs=3, nonfinite_grad_patience=2)
    engine = Engine(NanGradAt(tiny_cnn(), set(range(7, 100))), cfg, tmp_path, train, val, progress=False)
    with pytest.raises(
        ImatError, match=r"optimiser 'main' in 3 steps in a row at epoch 2 step 4 .*last\.ckpt"
    ):
        engine.fit()
    assert torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1
    assert all(torch.isfinite(p).all() for p in engine.task.model.parameters())


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
    engine = Engine(task, _cfg(epochs=3, lr=0.1, warmup_epochs=1), tmp_path, train, val, progress=False)
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
    cos = LrSchedule(_cfg(epochs=4, warmup_epochs=1, min_lr_ratio=0.1), steps_per_epoch=10)
    factors = [cos.factor(s) for s in range(40)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1, abs=0.01)
    assert min(factors[10:]) >= 0.1
    ms = LrSchedule(_cfg(epochs=4, schedule="multistep", milestones=[2, 3], lr_gamma=0.5), steps_per_epoch=10)
    assert [ms.factor(s) for s in (0, 19, 20, 29, 30, 39)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    const = LrSchedule(_cfg(epochs=2, schedule="constant", warmup_epochs=0.5), steps_per_epoch=4)
    assert [const.factor(s) for s in range(8)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1])


class RecordDtype(ClassificationTask):
    dtypes: list[torch.dtype] = []

    def step(self, batch, ctx):
        self.dtypes.append(self.model(batch["image"]).dtype)
        return super().step(batch, ctx)


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if this CPU had bf16 hardware, so the bf16 paths run on any CI machine (AVX2 ones fall back)."""
    from imat.engine import runtime

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)


def test_bf16_autocast_on_cpu_and_fp16_falls_back(tmp_path: Path, bf16_cpu: None) -> None:
    train, val = loaders()
    task = RecordDtype(tiny_cnn())
    df = Engine(
        task, _cfg(epochs=1, precision="bf16", channels_last=True), tmp_path, train, val, progress=False
    ).fit()
    assert task.dtypes and set(task.dtypes) == {torch.bfloat16}
    assert next(task.model.parameters()).dtype == torch.float32 and df["val_loss"].notna().all()
    with pytest.warns(UserWarning, match="fp16 needs CUDA"):
        engine = Engine(ClassificationTask(tiny_cnn()), _cfg(precision="fp16"), tmp_path / "b", train, val)
    assert engine.amp_dtype == torch.bfloat16 and engine.scaler is None


def test_bf16_and_fp16_run_in_fp32_on_a_cpu_without_bf16_hardware(tmp_path: Path, monkeypatch) -> None:
    from imat.engine import runtime

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    train, val = loaders()
    for precision in ("bf16", "fp16"):
        task = RecordDtype(tiny_cnn())
        task.dtypes = []
        with pytest.warns(UserWarning, match="no bf16 hardware.*using fp32"):
            engine = Engine(task, _cfg(epochs=1, precision=precision), tmp_path / precision, train, val)
        assert engine.amp_dtype is None and engine.scaler is None
        engine.fit()
        assert set(task.dtypes) == {torch.float32}


def test_bf16_hardware_probe_reads_the_cpu_flags(monkeypatch) -> None:
    import platform

    from imat.engine import runtime

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert runtime.cpu_has_fast_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert runtime.cpu_has_fast_bf16() is True
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert runtime.cpu_has_fast_bf16() is True


def test_ema_differs_from_raw_weights_and_is_what_gets_saved(tmp_path: Path) -> None:
    train, val = loaders()
    engine = Engine(
        ClassificationTask(tiny_cnn()),
        _cfg(epochs=2, ema=True, ema_decay=0.9, best_metric="loss"),  # val loss falls: epoch 2 is best
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


def test_timm_resnet_trains_channels_last_bf16(tmp_path: Path, bf16_cpu: None) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3, pretrained=False)
    # 32 px, not 16: at 16 px layer4's stride-2 conv sees a 1x1 map, and torch 2.14's CPU bf16 weight
    # gradient for that shape is sometimes garbage (benchmarks/repro_bf16_conv.py); real inputs are larger.
    train, val = loaders(n=16, size=32)
    cfg = _cfg(
        epochs=1, precision="bf16", channels_last=True, optimizer="adamw", lr=1e-3, grad_clip=1.0, ema=True
    )
    df = Engine(
        ClassificationTask(model, label_smoothing=0.1), cfg, tmp_path, train, val, progress=False
    ).fit()
    assert df["train_loss"].notna().all() and df["grad_norm_main"].iloc[0] > 0


def test_mixup_soft_targets(tmp_path: Path) -> None:
    from timm.data import Mixup

    mix = Mixup(mixup_alpha=0.4, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=3)
    train, val = loaders(n=45)  # odd last batch: one image is dropped before mixing
    df = Engine(
        ClassificationTask(tiny_cnn(), mixup=mix), _cfg(epochs=1), tmp_path, train, val, progress=False
    ).fit()
    assert df["train_loss"].notna().all() and "train_top1" not in df.columns


def test_rng_state_roundtrip_through_weights_only(tmp_path: Path) -> None:
    import random

    import numpy as np

    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), float(np.random.rand()), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == first


def test_compile_flag_compiles_in_place_trains_and_keeps_weight_names(tmp_path: Path) -> None:
    train, val = loaders()
    model = tiny_cnn()
    keys = list(model.state_dict())
    engine = Engine(
        ClassificationTask(model), _cfg(compile=True, epochs=2), tmp_path, train, val, progress=False
    )
    assert model._compiled_call_impl is not None and list(model.state_dict()) == keys
    df = engine.fit()  # the compiled module trains and its checkpoint loads into a plain one
    assert list(df["epoch"]) == [1, 2] and df["train_loss"].notna().all()
    plain = tiny_cnn()
    plain.load_state_dict(load_weights(tmp_path / "best.safetensors")[0])


def test_resume_takes_the_configs_learning_rate(tmp_path: Path) -> None:
    """A resumed run (a PBT trial after a mutation) trains at its config's lr, not the checkpoint's."""
    train, val = loaders()
    first = Engine(
        ClassificationTask(tiny_cnn()),
        _cfg(epochs=2, schedule="constant"),
        tmp_path,
        train,
        val,
        progress=False,
    )
    first.fit()
    train, val = loaders()
    mutated = Engine(
        ClassificationTask(tiny_cnn()),
        _cfg(epochs=3, schedule="constant", lr=0.01),
        tmp_path,
        train,
        val,
        progress=False,
    )
    df = mutated.fit(resume=True)
    assert list(df["epoch"]) == [1, 2, 3]
    assert df["lr_main"].tolist() == pytest.approx([0.05, 0.05, 0.01])


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
        ClassificationTask(model), _cfg(optimizer="adamw", weight_decay=0.05), tmp_path, train, val
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
        _cfg(optimizer="adamw", weight_decay=0.05, decay_norm_and_bias=True),
        tmp_path / "all",
        train,
        val,
    )
    assert [g["weight_decay"] for g in everything.optimizers["main"].param_groups] == [0.05]


def test_ema_is_timms_model_ema_v3_with_warmup(tmp_path: Path) -> None:
    from timm.utils import ModelEmaV3

    train, val = loaders()
    engine = Engine(ClassificationTask(tiny_cnn()), _cfg(epochs=1, ema=True), tmp_path, train, val)
    assert isinstance(engine.ema, ModelEmaV3)
    assert engine.ema.current_decay() == 0.0  # the first update copies the model
    engine.fit()
    assert engine.ema.updates == engine.global_step == 6
    assert 0.0 < engine.ema.current_decay() < engine.cfg.ema_decay  # still warming up


def test_cuda_backends_are_tuned_only_on_cuda() -> None:
    from imat.engine.runtime import configure_cuda

    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    try:
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert configure_cuda(torch.device("cpu")) is False and torch.backends.cudnn.benchmark is False
        assert configure_cuda(torch.device("cuda", 0)) is True
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


def test_uint8_batches_normalised_on_the_device_equal_the_cpu_pipeline(tmp_path: Path) -> None:
    """Loaders built for a GPU yield uint8 images and carry (mean, std); the engine's normalisation after
    the copy gives the float batches albumentations' Normalize gives on the CPU, and the same metrics."""
    from scale_kit import write_squares

    from imat.data import recipe_loaders
    from imat.engine.runtime import batch_to_device

    images, rows, _ = write_squares(tmp_path / "sq", 12, 6)
    df = pd.DataFrame(rows)
    train_df, val_df = df[df.split == "train"], df[df.split == "val"]
    data_cfg = {"input_size": 24, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "crop_pct": 1.0}
    recipe = _cfg(batch_size=4, aug={"preset": "none"})
    kw = {"images": str(images), "decoder": "cv2", "num_workers": 0}
    f_train, f_val = recipe_loaders(recipe, data_cfg, train_df, val_df, device_normalize=False, **kw)
    u_train, u_val = recipe_loaders(recipe, data_cfg, train_df, val_df, device_normalize=True, **kw)
    assert f_train.device_normalize is None
    assert u_train.device_normalize == ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3)) == u_val.device_normalize
    fb, ub = next(iter(f_val)), next(iter(u_val))
    assert fb["image"].dtype == torch.float32 and ub["image"].dtype == torch.uint8
    on_device = batch_to_device(ub, torch.device("cpu"), channels_last=True, normalize=u_val.device_normalize)
    assert on_device["image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(on_device["image"], fb["image"], atol=1e-5)
    with pytest.raises(ImatError, match="uint8"):
        batch_to_device(ub, torch.device("cpu"))
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    engine = Engine(ClassificationTask(model), recipe, tmp_path / "run", u_train, u_val, progress=False)
    assert engine.evaluate(u_val) == engine.evaluate(f_val)
    assert engine.fit()["train_loss"].notna().all()
