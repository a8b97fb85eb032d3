"""DDP with 2 gloo processes (torchrun) keeps the metrics and checkpoint contract of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    cmd = [*head, "-m", "imat.app.cli", "distill", str(cfg), *extra, "--quiet"]
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
    """`imat distill --ray-workers 2`: the engine as 2 Ray Train ranks (gloo), same files and sums; Ray
    keeps `--keep-checkpoints` of the epoch checkpoints: the best by val top-1, and the latest."""
    recipe = {"distill.train.batch_size": 4, "distill.train.epochs": 3}
    cfg = make_run(tmp_path, extra=recipe)
    env = {**ENV, "IMAT_RAY_NUM_CPUS": "2"}
    cmd = [sys.executable, "-m", "imat.app.cli", "distill", str(cfg), "--ray-workers", "2", "--quiet"]
    proc = subprocess.run(
        cmd + ["--keep-checkpoints", "1"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(yaml.safe_load(cfg.read_text())["run_dir"])
    out = run_dir / "student"
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["epoch"]) == [1, 2, 3]
    assert (summary["train_images"] == 24).all() and list(summary["global_step"]) == [3, 6, 9]  # 2 ranks x 4
    assert (out / "best.safetensors").is_file() and sorted(p.name for p in out.glob("*.ckpt")) == [
        "last.ckpt"
    ]
    res = _val_metrics(cfg, out / "last.ckpt")
    assert res["n"] == 9 and res["top1"] == pytest.approx(summary["val_top1"].iloc[-1], abs=1e-6)
    kept = sorted(
        json.loads(meta.read_text())["epoch"]
        for meta in (run_dir / "ray_train").glob("*/checkpoint_*/imat_*.json")
    )
    best = set(summary.loc[summary["val_top1"] == summary["val_top1"].max(), "epoch"])
    assert 3 in kept and best & set(kept), kept  # the latest (for a restart) and a best one
    assert len(kept) == (1 if 3 in best else 2), (kept, summary["val_top1"].tolist())


def _shard_kit(mode: str, cfg: Path, out: Path, ranks: int) -> tuple[dict, list[int]]:
    kit = str(Path(__file__).with_name("shard_kit.py"))
    head = TORCHRUN if ranks == 2 else [sys.executable]
    proc = subprocess.run(
        [*head, kit, mode, str(cfg), str(out)], env=ENV, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = [json.loads((out / f"count_{r}.json").read_text())["images"] for r in range(ranks)]
    return dict(np.load(out / "result.npz")), counts


@pytest.mark.slow
def test_teacher_eval_and_cache_split_the_images_over_two_ranks(tmp_path):
    """Under torchrun `imat teachers eval` (evaluate_pool) and the teacher cache build each score half
    of the images on every rank and end with what one process computes; an unreadable image is
    found on whichever rank owns it."""
    cfg = make_run(tmp_path, n_train=10, n_val=9)
    images = Path(yaml.safe_load(cfg.read_text())["data"]["images"])
    (images / "val_4.png").write_bytes(b"not an image")
    pool_eval = Path(yaml.safe_load(cfg.read_text())["run_dir"]) / "teachers" / "pool_eval.csv"

    one, (n_one,) = _shard_kit("eval", cfg, tmp_path / "eval1", 1)
    table_one = pd.read_csv(pool_eval)
    pool_eval.unlink()
    two, n_two = _shard_kit("eval", cfg, tmp_path / "eval2", 2)
    # rows 0, 2, 4, 6, 8 on rank 0 and 1, 3, 5, 7 on rank 1; row 4 cannot be read (label -1)
    assert n_one == 8 and n_two == [4, 4]
    assert one["labels"][4] == -1 and np.array_equal(two["labels"], one["labels"])
    np.testing.assert_allclose(two["probs"], one["probs"], atol=1e-5)
    pd.testing.assert_frame_equal(pd.read_csv(pool_eval), table_one)  # written once, by rank 0

    one, (n_one,) = _shard_kit("cache", cfg, tmp_path / "cache1", 1)
    two, n_two = _shard_kit("cache", cfg, tmp_path / "cache2", 2)
    assert n_one == 10 * 2 and n_two == [5 * 2, 5 * 2]  # 2 views of each image, each image on one rank
    for key in ("index", "views"):
        assert np.array_equal(two[key], one[key]), key
    for key in ("logit", "tail"):
        np.testing.assert_allclose(two[key], one[key], atol=1e-5)


# --- each rank on its own device (faked: no GPU here) -------------------------------------------------


def _fake_two_gpu_rank1(monkeypatch) -> list:
    """The process environment of rank 1 on a node with 2 GPUs; returns the set_device calls."""
    from imat.engine import distributed as d

    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(torch.device(dev)))
    monkeypatch.setattr(d, "is_distributed", lambda: True)
    monkeypatch.setattr(d, "rank", lambda: 1)
    return calls


def test_torchrun_rank_binds_its_local_gpu(monkeypatch):
    from imat.engine.distributed import process_device

    calls = _fake_two_gpu_rank1(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("IMAT_RAY_TRAIN_WORKER", raising=False)
    assert process_device("auto") == torch.device("cuda", 1)
    assert process_device("cuda") == torch.device("cuda", 1)  # a bare cuda is this rank's GPU too
    assert calls == [torch.device("cuda", 1)] * 2
    assert process_device("cpu") == torch.device("cpu")


def test_ray_train_rank_takes_rays_device(monkeypatch):
    """Ray shares CUDA_VISIBLE_DEVICES among a node's workers and sets up the group itself: the device
    comes from ray.train.torch.get_device(), whatever LOCAL_RANK says."""
    pytest.importorskip("ray")
    import ray.train.torch

    from imat.engine.distributed import process_device

    calls = _fake_two_gpu_rank1(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("IMAT_RAY_TRAIN_WORKER", "1")
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda", 1))
    assert process_device("auto") == torch.device("cuda", 1)
    assert calls == [torch.device("cuda", 1)]


def test_one_process_keeps_the_plain_device(monkeypatch):
    from imat.engine.distributed import process_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: pytest.fail("no binding for one process"))
    assert process_device("auto") == torch.device("cuda")


# --- DDP for one-backward tasks, the manual path for MEAL's alternating steps (2 gloo processes) --------


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.x[:, 0] += self.y[:, None, None].float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": int(self.y[i]), "index": i}


def _net(bn: bool) -> torch.nn.Module:
    from torch import nn

    torch.manual_seed(0)
    norm = [nn.BatchNorm2d(4)] if bn else []
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        *norm,
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def _engine(out: Path, batch: int, manual: bool, bn: bool):
    from torch.utils.data import DataLoader

    from imat.config.train import TrainConfig
    from imat.engine import ClassificationTask, Engine
    from imat.engine.task import Task

    class TwoSteps(Task):
        manual_optimization = True

        def __init__(self, model):
            super().__init__(model)
            torch.manual_seed(1)
            self.disc = torch.nn.Linear(3, 1)

        def modules(self):
            return {"model": self.model, "disc": self.disc}

        def param_groups(self):
            return {
                "main": [{"params": list(self.model.parameters())}],
                "disc": [{"params": list(self.disc.parameters())}],
            }

        def step(self, batch, ctx):
            logits = self.model(batch["image"])
            d_loss = self.disc(logits.detach()).pow(2).mean()
            ctx.optimize("disc", d_loss)
            loss = torch.nn.functional.cross_entropy(logits, batch["label"]) + 0.1 * self.disc(logits).mean()
            ctx.optimize("main", loss)
            return {"loss": loss.detach()}

    loader = DataLoader(_Images(), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    # lr set for the global batch 16 that both the 2 x 8 and the 1 x 16 runs train at
    cfg = TrainConfig(epochs=2, batch_size=batch, lr=0.1, lr_base_batch=16, device="cpu", weight_decay=1e-3)
    task = TwoSteps(_net(bn)) if manual else ClassificationTask(_net(bn))
    return Engine(task, cfg, out, loader, None, progress=False, tensorboard=False)


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        IMAT_DIST_BACKEND="gloo",
    )
    torch.set_num_threads(1)
    from imat.engine import distributed as d

    for manual in (False, True):
        engine = _engine(Path(out) / str(manual), 16 // world, manual, bn=False)
        engine.fit()
        assert isinstance(engine.ddp, torch.nn.parallel.DistributedDataParallel) != manual
        weights = {k: v.clone() for k, v in engine.task.model.state_dict().items()}
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, weights)
        assert all(torch.equal(gathered[0][k], g[k]) for g in gathered for k in weights)  # ranks agree
        if rank == 0:
            torch.save(weights, Path(out) / f"weights_{manual}.pt")
    # BatchNorm running statistics: averaged over ranks at each epoch end, not rank 0's
    bn_engine = _engine(Path(out) / "bn", 16 // world, False, bn=True)
    bn = bn_engine.task.model[1]
    bn.running_mean.fill_(float(rank))
    d.average_norm_stats(bn_engine.task.modules())
    assert torch.allclose(bn.running_mean, torch.full_like(bn.running_mean, (world - 1) / 2))
    d.cleanup()


def test_two_gloo_ranks_match_one_process(tmp_path):
    """Two ranks at batch 8 each train the weights one process trains at batch 16 (sum of shards = the
    whole batch): through DistributedDataParallel for a one-backward task, through the manual gradient
    average for alternating optimisers."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port, str(tmp_path / "two")), nprocs=2, join=True)
    for manual in (False, True):
        one = _engine(tmp_path / "one" / str(manual), 16, manual, bn=False)
        one.fit()
        assert one.ddp is None
        two = torch.load(tmp_path / "two" / f"weights_{manual}.pt", weights_only=True)
        for key, value in one.task.model.state_dict().items():
            assert torch.allclose(value, two[key], atol=1e-5), (manual, key)


@pytest.mark.slow
def test_ray_train_restarts_from_its_checkpoint_after_a_worker_is_killed(tmp_path):
    """Rank 1 of a 2-worker Ray Train run is SIGKILLed after epoch 2 (and the run directory's last.ckpt
    deleted): Ray restarts the group (FailureConfig) from the checkpoint the engine reported, and the run
    finishes with its history whole: epochs 1-4, each once."""
    kit = Path(__file__).with_name("ray_restart_kit.py")
    repo = str(Path(__file__).resolve().parents[1])
    env = {**ENV, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env["IMAT_RAY_NUM_CPUS"] = "2"
    proc = subprocess.run(
        [sys.executable, str(kit), str(tmp_path)], env=env, capture_output=True, text=True, timeout=420
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert (tmp_path / "killed.txt").is_file()  # a worker did die
    assert (tmp_path / "attempts.txt").read_text().split() == ["resumed=False", "resumed=True"]
    summary = pd.read_csv(tmp_path / "run" / "summary.csv")
    assert list(summary["epoch"]) == [1, 2, 3, 4] and summary["val_loss"].notna().all()
    assert list(summary["global_step"]) == [2, 4, 6, 8]  # 16 images, 2 ranks x 4: 2 steps per epoch
    ckpt = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 4 and [row["epoch"] for row in ckpt["history"]] == [1, 2, 3, 4]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["checkpoint"] and result["metrics"]["epoch"] == 4


def test_sync_bn_is_for_cuda_ranks(tmp_path, monkeypatch):
    """train.sync_bn converts BatchNorm to SyncBatchNorm on distributed GPUs; on CPU ranks (gloo) it is a
    one-line error (their statistics are averaged at each epoch end instead); one process ignores it."""
    from imat.engine import distributed as d
    from imat.errors import ImatError

    one = _engine(tmp_path / "one", 8, manual=False, bn=True)  # the helper's recipe, sync_bn off
    cfg = one.cfg.model_copy(update={"sync_bn": True})
    from imat.engine import ClassificationTask, Engine

    single = Engine(ClassificationTask(_net(True)), cfg, tmp_path / "s", one.train_loader, progress=False)
    assert isinstance(single.task.model[1], torch.nn.BatchNorm2d)
    assert not isinstance(single.task.model[1], torch.nn.SyncBatchNorm)
    monkeypatch.setattr(d, "init_from_env", lambda: True)
    monkeypatch.setattr(d, "shard_loader", lambda loader, pad=True: loader)
    with pytest.raises(ImatError, match="sync_bn needs CUDA"):
        Engine(ClassificationTask(_net(True)), cfg, tmp_path / "d", one.train_loader, progress=False)


def test_sync_bn_keeps_timm_fused_norm_activation():
    """train.sync_bn converts timm's BatchNormAct2d (EfficientNet's norm + activation) to timm's
    SyncBatchNormAct with its activation and drop layers; in eval mode the converted layer and a whole
    converted EfficientNet compute what they computed before, and their weights still load into the
    unconverted network (best.safetensors, export)."""
    import timm
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    from imat.engine import ClassificationTask
    from imat.engine.distributed import convert_sync_batchnorm

    torch.manual_seed(0)
    layer = BatchNormAct2d(4, act_layer=torch.nn.ReLU, drop_layer=torch.nn.Dropout2d)
    layer.running_mean.normal_()
    layer.running_var.uniform_(0.5, 2.0)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    x = torch.randn(2, 4, 5, 5)
    holder = torch.nn.Sequential(layer).eval()
    before = holder(x)
    convert_sync_batchnorm({"model": holder})
    converted = holder[0]
    assert isinstance(converted, SyncBatchNormAct)
    assert isinstance(converted.act, torch.nn.ReLU) and isinstance(converted.drop, torch.nn.Dropout2d)
    after = holder(x)
    assert (after >= 0).all() and (after == 0).any()  # the ReLU is still applied
    torch.testing.assert_close(after, before)

    net = timm.create_model("test_efficientnet", num_classes=5).eval()
    assert any(isinstance(m, BatchNormAct2d) for m in net.modules())
    reference = timm.create_model("test_efficientnet", num_classes=5).eval()
    reference.load_state_dict(net.state_dict())
    task = ClassificationTask(net)
    convert_sync_batchnorm(task.modules())
    assert task.model is net and not any(type(m) is BatchNormAct2d for m in net.modules())
    assert any(isinstance(m, SyncBatchNormAct) for m in net.modules())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(images), reference(images))
    fresh = timm.create_model("test_efficientnet", num_classes=5)
    fresh.load_state_dict(net.state_dict())  # same keys: the weights file stays loadable anywhere


def test_max_failures_reaches_ray_train(monkeypatch, tmp_path):
    """`--max-failures N` of `imat distill --ray-workers` becomes Ray Train's FailureConfig."""
    from imat.app.cli import main
    from imat.engine import ray_train as d

    seen = {}

    def fake_run(fn, config, num_workers, **kw):
        seen.update(kw, num_workers=num_workers, resume=config["kwargs"]["resume"])

    monkeypatch.setattr(d, "run_ray_train", fake_run)
    cfg = make_run(tmp_path)
    main(["distill", str(cfg), "--ray-workers", "2", "--max-failures", "5", "--quiet"])
    assert seen["max_failures"] == 5 and seen["num_workers"] == 2 and seen["resume"] is False
    assert seen["storage"].endswith("ray_train") and seen["name"] == "distill-train-distill"
