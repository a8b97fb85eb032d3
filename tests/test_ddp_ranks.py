"""Two gloo ranks: each draws its own random streams from shared initial weights and a shared order,
resumes its own streams exactly, runs as many steps as the other when its images are unreadable, and
accumulates gradients without reducing them on the accumulating steps."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import socket
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn

TIMEOUT_S = 60  # a collective that waits this long is a hang: the rank raises instead of blocking


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        IMAT_DIST_BACKEND="gloo",
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method="env://", timeout=datetime.timedelta(seconds=TIMEOUT_S)
    )


def _spawn(fn, world: int, *args) -> None:
    mp.spawn(fn, args=(world, _port(), *args), nprocs=world, join=True)


class Noisy(torch.utils.data.Dataset):
    """Items with an 'augmentation' drawn in the loader (numpy and torch, as albumentations and timm's
    transforms do); ``unreadable`` indices read as None (a broken file)."""

    def __init__(self, n: int = 32, unreadable: frozenset[int] = frozenset()) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.x[:, 0] += self.y[:, None, None].float()
        self.unreadable = unreadable

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict | None:
        if i in self.unreadable:
            return None
        noise = float(np.random.rand()) + float(torch.rand(1))
        return {"image": self.x[i] + 0.01 * noise, "label": int(self.y[i]), "index": i, "aug": noise}


def _collate(items):
    from imat.data.loader import collate_skip

    batch = collate_skip(items)
    batch["aug"] = torch.tensor([it["aug"] for it in items if it is not None])
    return batch


class Killed(Exception):
    pass


def _task(log: list, seed: int = 0):
    from imat.engine import ClassificationTask

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * 8 * 8, 3))

    class Rec(ClassificationTask):
        def step(self, batch, ctx):
            if ctx.epoch == 1 and ctx.step_in_epoch == 3 and os.environ.get("KILL_AT") == "1":
                raise Killed  # a killed job (after the checkpoint at step 2)
            out = super().step(batch, ctx)
            log.append(
                {
                    "epoch": ctx.epoch,
                    "step": ctx.step_in_epoch,
                    "index": batch["index"].tolist(),
                    "aug": [round(float(a), 6) for a in batch.get("aug", torch.zeros(0))],
                    "py": random.random(),
                    "np": float(np.random.rand()),
                    "torch": float(torch.rand(1)),
                    "dropout": float(self.model[1](torch.ones(16)).sum()),
                    "first_weight": self.model[2].weight.detach().flatten()[:4].tolist(),
                }
            )
            return out

    return Rec(model)


def _loader(batch: int, workers: int = 1, unreadable: frozenset[int] = frozenset(), shuffle: bool = True):
    from imat.data.loader import SkipLoader, _worker_init

    return SkipLoader(
        Noisy(unreadable=unreadable),
        batch_size=batch,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        generator=torch.Generator().manual_seed(0),
    )


def _streams_worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    from imat.config.train import TrainConfig
    from imat.engine import Engine

    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.1, device="cpu", ckpt_every_steps=2, seed=3)
    full: list = []
    # each rank builds other weights: only the engine's broadcast can make them agree
    Engine(
        _task(full, seed=100 + rank), cfg, Path(out) / "full", _loader(4), progress=False, tensorboard=False
    ).fit()
    # the same run killed at epoch 2, step 4 (checkpoint at step 2) and resumed
    killed: list = []
    os.environ["KILL_AT"] = "1"
    with contextlib.suppress(Killed):
        Engine(
            _task(killed, seed=100 + rank),
            cfg,
            Path(out) / "killed",
            _loader(4),
            progress=False,
            tensorboard=False,
        ).fit()
    os.environ["KILL_AT"] = "0"
    resumed: list = []
    engine = Engine(
        _task(resumed, seed=100 + rank),
        cfg,
        Path(out) / "killed",
        _loader(4),
        progress=False,
        tensorboard=False,
    )
    engine.fit(resume=True)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"full": full, "killed": killed, "resumed": resumed}))
    torch.distributed.destroy_process_group()


def test_ranks_draw_their_own_streams_from_shared_weights_and_order(tmp_path):
    """Rank 0 and rank 1 start from the same weights and split one shared permutation, but draw
    different python/numpy/torch numbers, dropout masks and loader-worker augmentations; a run killed
    mid-epoch resumes every rank's own streams exactly."""
    _spawn(_streams_worker, 2, str(tmp_path))
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    full = [r["full"] for r in runs]
    assert len(full[0]) == len(full[1]) == 8  # 32 images, 2 ranks x 4: 4 steps x 2 epochs
    assert full[0][0]["first_weight"] == full[1][0]["first_weight"]  # built apart, broadcast alike
    for epoch in (0, 1):
        seen = [i for r in (0, 1) for s in full[r] if s["epoch"] == epoch for i in s["index"]]
        assert sorted(seen) == list(range(32))  # one shared permutation, disjoint shares
    for key in ("py", "np", "torch", "dropout", "aug"):
        draws = [[s[key] for s in full[r]] for r in (0, 1)]
        assert draws[0] != draws[1], key  # each rank its own stream
    epochs = [[s["torch"] for s in full[0] if s["epoch"] == e] for e in (0, 1)]
    assert epochs[0] != epochs[1]  # and each epoch its own
    for r in (0, 1):
        resumed = runs[r]["resumed"]
        assert [(s["epoch"], s["step"]) for s in resumed] == [(1, 2), (1, 3)]  # from the checkpoint
        assert resumed == full[r][-2:]  # every rank's draws, data and weights as if never killed


def _unreadable_worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    from imat.config.train import TrainConfig
    from imat.engine import Engine

    # sequential order: rank 1's first batch is indices 1, 3, 5, 7, all unreadable
    loader = _loader(4, workers=0, unreadable=frozenset({1, 3, 5, 7}), shuffle=False)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.1, device="cpu", seed=0)
    log: list = []
    engine = Engine(_task(log), cfg, Path(out), loader, progress=False, tensorboard=False)
    df = engine.fit()
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "steps": len(log),
                "global_step": engine.global_step,
                "skipped": df["skipped"].tolist(),
                "replaced": df["replaced_batches"].tolist(),
            }
        )
    )
    torch.distributed.destroy_process_group()


def test_a_rank_with_an_unreadable_batch_runs_as_many_steps(tmp_path):
    """Rank 1's first batch has no readable image: it is replaced by re-read samples of rank 1's own
    shard, so both ranks take 4 steps per epoch (no rank waits for the other); the 4 unreadable images
    are still counted in the summary, and so is the replaced batch (summed over ranks)."""
    _spawn(_unreadable_worker, 2, str(tmp_path))
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert runs[0]["steps"] == runs[1]["steps"] == 8
    assert runs[0]["global_step"] == runs[1]["global_step"] == 8
    assert runs[0]["skipped"] == [4, 4]
    assert runs[0]["replaced"] == runs[1]["replaced"] == [1, 1]


def _accum_worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    from test_accumulation import accum_engine
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from imat.engine import distributed as dist_utils

    reductions = []

    def counting(state, bucket):
        reductions.append(bucket.index())
        return allreduce_hook(state, bucket)

    for manual in (False, True):
        engine = accum_engine(Path(out) / str(manual), batch=4, accum=2, manual=manual)
        if not manual:  # the engine's own wrapper, built before fit so that the test can hook it
            engine.ddp = dist_utils.wrap_ddp(engine.task, engine.device, accumulate=True)
            engine.ddp.register_comm_hook(None, counting)
        engine.fit()
        if not manual:
            Path(out, f"reductions{rank}.json").write_text(json.dumps([len(reductions), engine.update_step]))
        if rank == 0:
            state = {
                f"{n}.{k}": v for n, m in engine.task.modules().items() for k, v in m.state_dict().items()
            }
            torch.save(state, Path(out) / f"weights_{manual}.pt")
    torch.distributed.destroy_process_group()


def test_two_ranks_accumulating_match_one_process(tmp_path):
    """2 ranks x batch 4 x 2 accumulation steps train the weights one process trains at batch 16 (the
    global batch): through DDP (no_sync on the accumulating step) and through MEAL-style alternating
    optimisers (student and discriminator each accumulate their own gradients)."""
    from test_accumulation import accum_engine

    _spawn(_accum_worker, 2, str(tmp_path))
    for rank in (0, 1):  # one all-reduce per optimiser update (one bucket), none on accumulating batches
        reductions, updates = json.loads((tmp_path / f"reductions{rank}.json").read_text())
        assert updates == 4 and reductions == updates
    for manual in (False, True):
        one = accum_engine(tmp_path / "one" / str(manual), batch=16, accum=1, manual=manual)
        one.fit()
        two = torch.load(tmp_path / f"weights_{manual}.pt", weights_only=True)
        mine = {f"{n}.{k}": v for n, m in one.task.modules().items() for k, v in m.state_dict().items()}
        assert set(mine) == set(two)
        for key, value in mine.items():
            assert torch.allclose(value, two[key], atol=1e-5), (manual, key)


class _Flipped(torch.utils.data.Dataset):
    """Images through an albumentations pipeline run in the loading process (num_workers=0)."""

    def __init__(self) -> None:
        import albumentations as A

        self.transform = A.Compose([A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=1.0)])
        self.x = np.random.default_rng(0).integers(0, 255, (16, 8, 8, 3), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        image = self.transform(image=self.x[i])["image"]
        return {"image": torch.from_numpy(image).permute(2, 0, 1).float() / 255, "label": i % 3, "index": i}


def test_in_process_albumentations_stream_is_the_ranks_own(tmp_path, monkeypatch):
    """With num_workers=0 the dataset's albumentations pipeline runs in the rank's process: the engine
    seeds it from (seed, rank, epoch), so rank 1 does not replay rank 0's flips and jitter (and the
    same rank replays its own)."""
    from imat.config.train import TrainConfig
    from imat.data.loader import build_loader
    from imat.engine import Engine
    from imat.engine import distributed as d

    def images_seen(rank: int, name: str) -> list[torch.Tensor]:
        monkeypatch.setattr(d, "rank", lambda: rank)
        seen: list[torch.Tensor] = []
        task = _task([])
        step = task.step

        def seeing(batch, ctx):
            seen.append(batch["image"].clone())
            return step(batch, ctx)

        task.step = seeing
        loader = build_loader(_Flipped(), batch_size=8, shuffle=False, num_workers=0, seed=0)
        cfg = TrainConfig(epochs=2, batch_size=8, lr=0.1, device="cpu", seed=0)
        Engine(task, cfg, tmp_path / name, loader, progress=False, tensorboard=False).fit()
        return seen

    rank0, rank0_again, rank1 = images_seen(0, "a"), images_seen(0, "b"), images_seen(1, "c")
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank0_again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))
    assert not torch.equal(rank0[0], rank0[2])  # epoch 2 draws anew: same images, other augmentations
