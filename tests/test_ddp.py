"""DDP with 2 gloo processes (torchrun) keeps the metrics and checkpoint contract of one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from scale_kit import make_run

from imat.engine.distributed import ShardedSampler

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_sharded_sampler_splits_and_pads():
    shards = [list(ShardedSampler(range(10), r, 4)) for r in range(4)]
    assert [len(s) for s in shards] == [3, 3, 3, 3]
    assert sorted(i for s in shards for i in s) == sorted([*range(10), 0, 1])  # padded by wrapping round
    val = [list(ShardedSampler(range(10), r, 4, pad=False)) for r in range(4)]
    assert sorted(i for s in val for i in s) == list(range(10))


def _distill(cfg: Path, *extra: str, ranks: int) -> subprocess.CompletedProcess:
    head = TORCHRUN if ranks == 2 else [sys.executable]
    cmd = [*head, "-m", "imat.cli", "distill", str(cfg), *extra, "--quiet"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _val_metrics(cfg_path: Path, ckpt: Path) -> dict:
    """The checkpoint's student evaluated on the whole validation split in this one process."""
    from distill.train import build_loaders, build_student, pool_dir_of, run_manifest, split_with_noise
    from imat.config import load_config
    from imat.engine import ClassificationTask, Engine
    from imat.engine.checkpoint import load_checkpoint

    cfg = load_config(cfg_path)
    df, classes, manifest = run_manifest(cfg, pool_dir_of(cfg))
    student, data_cfg = build_student(cfg.distill, classes.num_classes)
    student.load_state_dict(load_checkpoint(ckpt)["modules"]["model"])
    train_df, val_df = split_with_noise(cfg, df, classes, manifest, cfg.run_path / "eval")
    train_loader, val_loader = build_loaders(cfg, data_cfg, train_df, val_df, cfg.data.images)
    engine = Engine(ClassificationTask(student), cfg.distill.train, cfg.run_path / "eval", train_loader)
    return engine.evaluate(val_loader)


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_keep_the_single_process_contract(tmp_path):
    recipe = {"distill.train.batch_size": 4, "distill.train.epochs": 2}
    one = make_run(tmp_path / "one", extra=recipe)
    two = make_run(tmp_path / "two", extra=recipe)
    _distill(one, ranks=1)
    _distill(two, ranks=2)
    out1 = Path(yaml.safe_load(one.read_text())["run_dir"]) / "student"
    out2 = Path(yaml.safe_load(two.read_text())["run_dir"]) / "student"
    s1, s2 = pd.read_csv(out1 / "summary.csv"), pd.read_csv(out2 / "summary.csv")
    assert list(s1.columns) == list(s2.columns)  # the same summary.csv contract
    assert list(s2["epoch"]) == [1, 2]
    assert (s2["train_images"] == 24).all() and (s1["train_images"] == 24).all()  # every image once per epoch
    assert (s2["global_step"] == [3, 6]).all() and (s1["global_step"] == [6, 12]).all()  # batch size per rank
    # one checkpoint, loadable without pickle, whose weights give the logged (reduced) val metrics
    assert sorted(p.name for p in out2.glob("*.ckpt")) == ["last.ckpt"]
    ckpt = torch.load(out2 / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    res = _val_metrics(two, out2 / "last.ckpt")
    assert res["n"] == 9  # the validation metrics cover the whole split, not one rank's share
    assert res["top1"] == pytest.approx(s2["val_top1"].iloc[-1], abs=1e-6)
    assert res["loss"] == pytest.approx(s2["val_loss"].iloc[-1], rel=1e-4)
    assert (out2 / "best.safetensors").is_file()
    # resumable: a third epoch continues from last.ckpt under torchrun again
    _distill(two, "distill.train.epochs=3", "--resume", ranks=2)
    s3 = pd.read_csv(out2 / "summary.csv")
    assert list(s3["epoch"]) == [1, 2, 3]
    pd.testing.assert_frame_equal(
        s3.iloc[:2][["epoch", "train_loss", "val_loss"]], s2[["epoch", "train_loss", "val_loss"]]
    )
    assert torch.load(out2 / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 3


@pytest.mark.slow
def test_ray_train_two_workers_keep_the_single_process_contract(tmp_path):
    """`imat distill --ray-workers 2`: the engine as 2 Ray Train ranks (gloo), same files and sums."""
    recipe = {"distill.train.batch_size": 4, "distill.train.epochs": 1}
    cfg = make_run(tmp_path, extra=recipe)
    env = {**ENV, "IMAT_RAY_NUM_CPUS": "2"}
    cmd = [sys.executable, "-m", "imat.cli", "distill", str(cfg), "--ray-workers", "2", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(yaml.safe_load(cfg.read_text())["run_dir"]) / "student"
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["epoch"]) == [1]
    assert summary["train_images"].iloc[0] == 24 and summary["global_step"].iloc[0] == 3  # 2 ranks x 4
    assert (out / "best.safetensors").is_file() and sorted(p.name for p in out.glob("*.ckpt")) == [
        "last.ckpt"
    ]
    res = _val_metrics(cfg, out / "last.ckpt")
    assert res["n"] == 9 and res["top1"] == pytest.approx(summary["val_top1"].iloc[-1], abs=1e-6)
