"""The training engine: fitting, the files it writes, validation and the best checkpoint, resuming (a run
killed mid-epoch continues bit for bit) and the input pipeline on the device."""

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
from engine_kit import ToyData, collate, loaders, tiny_cnn, train_cfg
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imat.engine import ClassificationTask, Engine
from imat.engine.checkpoint import get_rng_state, set_rng_state
from imat.errors import ImatError
from imat.metrics import topk_accuracy
from imat.weights import load_weights, read_meta

REPO = Path(__file__).resolve().parents[1]


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


def test_fit_learns_and_writes_files(tmp_path: Path) -> None:
    train, val = loaders()
    engine = Engine(
        ClassificationTask(tiny_cnn()), train_cfg(epochs=4), tmp_path, train, val, meta={"arch": "tiny"}
    )
    df = engine.fit()
    assert list(df["epoch"]) == [1, 2, 3, 4]
    assert df["train_loss"].iloc[-1] < df["train_loss"].iloc[0]
    summary = pd.read_csv(tmp_path / "summary.csv")
    for col in ["epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top3", "val_top1_err",
                "val_top3_err", "lr_main", "images_per_s", "epoch_time_s", "skipped", "replaced_batches", "is_best"]:  # fmt: skip
        assert col in summary.columns, col
    assert len(summary) == 4
    # 48 training images in batches of 8 -> never odd; validation 24 in 16 + 8 -> 0 skipped per the collate
    assert (summary["skipped"] == 0).all() and (summary["replaced_batches"] == 0).all()
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
    Engine(task, train_cfg(epochs=3), tmp_path, train, val, meta={"arch": "tiny"}, progress=False).fit()
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["val_top1"].tolist() == pytest.approx([0.5, 0.75, 0.25])
    assert summary["is_best"].tolist() == [True, True, False]
    meta = read_meta(tmp_path / "best.safetensors")
    assert meta["epoch"] == 2 and meta["metrics"]["val_top1"] == pytest.approx(0.75)


def test_skipped_images_are_summed(tmp_path: Path) -> None:
    train, val = loaders(n=45, batch=8)  # 6 batches, the last one has 5 items -> collate says 1 skipped
    df = Engine(
        ClassificationTask(tiny_cnn()), train_cfg(epochs=1), tmp_path, train, None, progress=False
    ).fit()
    assert df["skipped"].tolist() == [1] and df["train_images"].tolist() == [45]
    assert "val_top1" not in df.columns and (tmp_path / "best.safetensors").exists()


def test_evaluate_returns_outputs_consistent_with_metrics(tmp_path: Path) -> None:
    train, val = loaders()
    engine = Engine(ClassificationTask(tiny_cnn()), train_cfg(epochs=1), tmp_path, train, val, progress=False)
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
    cfg = train_cfg(epochs=2, max_steps_per_epoch=3)
    df = Engine(ClassificationTask(tiny_cnn()), cfg, tmp_path, train, train, progress=False).fit()
    assert df["global_step"].tolist() == [3, 6] and df["train_images"].tolist() == [12, 12]


def test_resume_finished_run_is_noop_and_foreign_checkpoint_is_rejected(tmp_path: Path) -> None:
    train, val = loaders()
    df = Engine(
        ClassificationTask(tiny_cnn()), train_cfg(epochs=2), tmp_path, train, val, progress=False
    ).fit()
    before = (tmp_path / "last.ckpt").stat().st_mtime_ns
    again = Engine(
        ClassificationTask(tiny_cnn()), train_cfg(epochs=2), tmp_path, train, val, progress=False
    ).fit(resume=True)
    assert (tmp_path / "last.ckpt").stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(df, again)
    other = Engine(
        ClassificationTask(tiny_cnn(classes=5)), train_cfg(epochs=3), tmp_path, train, val, progress=False
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


def test_rng_state_roundtrip_through_weights_only(tmp_path: Path) -> None:
    import random

    import numpy as np

    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), float(np.random.rand()), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == first


def test_resume_takes_the_configs_learning_rate(tmp_path: Path) -> None:
    """A resumed run (a PBT trial after a mutation) trains at its config's lr, not the checkpoint's."""
    train, val = loaders()
    first = Engine(
        ClassificationTask(tiny_cnn()),
        train_cfg(epochs=2, schedule="constant"),
        tmp_path,
        train,
        val,
        progress=False,
    )
    first.fit()
    train, val = loaders()
    mutated = Engine(
        ClassificationTask(tiny_cnn()),
        train_cfg(epochs=3, schedule="constant", lr=0.01),
        tmp_path,
        train,
        val,
        progress=False,
    )
    df = mutated.fit(resume=True)
    assert list(df["epoch"]) == [1, 2, 3]
    assert df["lr_main"].tolist() == pytest.approx([0.05, 0.05, 0.01])


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
    recipe = train_cfg(batch_size=4, aug={"preset": "none"})
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
    # the same metrics, up to float rounding (the two normalisations round differently)
    assert engine.evaluate(u_val) == pytest.approx(engine.evaluate(f_val), rel=1e-6)
    assert engine.fit()["train_loss"].notna().all()


def test_the_main_process_augmentation_is_seeded_with_workers_too(tmp_path: Path) -> None:
    """Replacement batches (a batch with no readable image) are read in the main process even when
    workers load the rest: its copy of the pipeline draws from the rank's seed, so a rerun repeats."""
    import numpy as np

    from imat.data.transforms import build_train_transform

    class Augmented(ToyData):
        transform = build_train_transform("heavy", 16)

    train = DataLoader(Augmented(8, size=16), batch_size=4, num_workers=2, collate_fn=collate)
    engine = Engine(ClassificationTask(tiny_cnn()), train_cfg(), tmp_path, train, None, progress=False)
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    draws = []
    for _ in range(2):
        engine._prepare_loader(0, rank_seed=5)
        draws.append([Augmented.transform(image=img)["image"] for _ in range(3)])
    assert all(np.array_equal(a, b) for a, b in zip(*draws, strict=True))
