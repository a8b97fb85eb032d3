"""Work that is not training, split over ranks: ``python shard_kit.py MODE CONFIG OUT`` (one process, or
under torchrun; tests/test_ddp.py). MODE ``eval`` runs :func:`teachers.evaluate.evaluate_pool` on the
run's pool, MODE ``cache`` :func:`distill.cache_build.build_cache` over its training images. Every rank
writes how many images went through its teachers (``OUT/count_RANK.json``), rank 0 the result
(``OUT/result.npz``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from imat.engine import distributed as dist_utils

seen = {"images": 0}


def count(module: torch.nn.Module, args: tuple) -> None:
    seen["images"] += int(args[0].shape[0])


def evaluate(run: Path) -> dict[str, np.ndarray]:
    import teachers.ensemble as ensemble
    from teachers.evaluate import evaluate_pool

    load = ensemble.load_teacher

    def counted(entry, device):  # every teacher the evaluation loads counts its images
        model = load(entry, device)
        model.register_forward_pre_hook(count)
        return model

    ensemble.load_teacher = counted
    result = evaluate_pool(run / "teachers", device="cpu", batch_size=2, progress=False)
    return {"probs": result.probs, "labels": result.labels}


def cache(run: Path, images: str) -> dict[str, np.ndarray]:
    from distill.cache_build import build_cache
    from distill.teachers_runtime import FrozenTeacher
    from teachers.pool import load_pool, load_teacher

    dist_utils.init_from_env()
    df = pd.read_parquet(run / "data" / "manifest.parquet")
    train = df[df["split"] == "train"].reset_index(drop=True)
    entry = load_pool(run / "teachers")[0]
    model = load_teacher(entry, torch.device("cpu"))
    model.register_forward_pre_hook(count)
    teacher = FrozenTeacher(entry.name, model, entry.input_size, tuple(entry.mean), tuple(entry.std))
    index, logit, tail, views = build_cache(
        [teacher],
        train,
        images,
        num_classes=entry.num_classes,
        topk=2,
        views_per_image=2,
        seed=3,
        scale=(0.35, 1.0),
        temperatures=(1.0, 4.0),
        batch_size=3,
    )
    return {"index": index.numpy(), "logit": logit.numpy(), "tail": tail.numpy(), "views": views.numpy()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, config, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    cfg = yaml.safe_load(config.read_text())
    run = Path(cfg["run_dir"])
    arrays = evaluate(run) if mode == "eval" else cache(run, cfg["data"]["images"])
    out.mkdir(parents=True, exist_ok=True)
    rank = dist_utils.rank()
    (out / f"count_{rank}.json").write_text(json.dumps(seen))
    if rank == 0:
        np.savez(out / "result.npz", **arrays)
    dist_utils.cleanup()
