"""Do MEAL's stage blocks carry information? The teachers' block vectors on the VALIDATION split, and the
per-epoch block figures of short student runs.

A block vector is a stage output pooled to length L over the spatial axis and reduced over the channels
(distill/align.py); the similarity loss compares softmax(vector / T) of teacher and student. When that
softmax is near uniform (entropy near ln L) the loss is mostly the uniform distribution's entropy and the
block teaches nothing. Two parts:

``probe``: for every teacher of a trained pool, every stage, channel reduction (avg | max), pooled length L
and block temperature T: the mean entropy of the teacher's block softmax over the validation images
against ln L, with the stage's map size at the student's input size (a map of fewer than L positions
repeats values).

``train``: short ``imat distill`` runs under block settings; per epoch ``t_entropy_b0`` (the teachers'
entropy of block 0), ``t_entropy_uniform_b0`` (ln L) and ``sim_kl_b0`` (the KL term: the part of the
similarity loss that alignment can reduce).

    .venv/bin/imat demo --out /tmp/bx/demo --until evaluate
    .venv/bin/python benchmarks/bench_blocks.py --config /tmp/bx/demo/config.yaml --out /tmp/bx \
        --publish blocks_demo

writes ``benchmarks/results/NAME_probe.csv`` and ``NAME_train.csv`` (with ``--publish NAME``; else under
``--out``).
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]

LENGTHS = (4, 16, 64)
REDUCES = ("avg", "max")
TEMPERATURES = (1.0, 0.5, 0.2, 0.1)

# name -> overrides for the training part: block 0 and the aligner; the logits block stays as the config has it
TRAIN: dict[str, list[str]] = {
    "stage-2_avg_T1": [
        "distill.blocks.0={index: -2, length: 16, gamma: 0.05, temperature: 1.0}",
        "distill.channel_reduce=avg",
    ],
    "stage1_max_T0.5": [
        "distill.blocks.0={index: 1, length: 16, gamma: 0.05, temperature: 0.5}",
        "distill.channel_reduce=max",
    ],
}


def probe(config: Path, max_images: int) -> pd.DataFrame:
    from distill.align import align
    from distill.blocks import num_blocks
    from distill.methods.meal import stage_map_sizes
    from distill.settings import pool_dir_of
    from distill.train import (
        build_loaders,
        build_student,
        images_root,
        load_frozen_teachers,
        run_manifest,
        split_with_noise,
    )
    from imat.config import load_config

    cfg = load_config(config)
    pool_dir = pool_dir_of(cfg)
    df, classes, manifest = run_manifest(cfg, pool_dir)
    student, data_cfg = build_student(cfg.distill, classes.num_classes)
    teachers = load_frozen_teachers(cfg, pool_dir, classes)
    out_dir = Path(cfg.run_path) / "bench_blocks"
    out_dir.mkdir(parents=True, exist_ok=True)
    train_df, val_df = split_with_noise(cfg, df, classes, manifest, out_dir)
    _, val_loader = build_loaders(cfg, data_cfg, train_df, val_df, images_root(cfg, pool_dir))
    size = data_cfg["input_size"]
    side = int(size if isinstance(size, int) else size[-1])
    sums: dict[tuple, float] = {}
    seen = 0
    with torch.no_grad():
        for batch in val_loader:
            x = batch["image"]
            for t in teachers:
                stages = list(range(num_blocks(t.model)))
                feats = t.blocks(x, stages, data_cfg["mean"], data_cfg["std"])
                for s, feat in zip(stages, feats, strict=True):
                    for L in LENGTHS:
                        for red in REDUCES:
                            v = align(feat, L, "avg", red)
                            for T in TEMPERATURES:
                                p = torch.softmax(v / T, -1)
                                h = float(-(p * p.clamp_min(1e-12).log()).sum(-1).sum())
                                key = (t.name, s, L, red, T)
                                sums[key] = sums.get(key, 0.0) + h
            seen += len(x)
            if seen >= max_images:
                break
    rows = []
    sizes = {t.name: stage_map_sizes(t.model, t.input_size) for t in teachers}
    for (name, s, L, red, T), h in sums.items():
        hw = sizes[name][s] if sizes[name] else (0, 0)
        rows.append(
            {
                "teacher": name,
                "stage": s,
                "map": f"{hw[0]}x{hw[1]}",
                "positions": hw[0] * hw[1],
                "length": L,
                "channel_reduce": red,
                "temperature": T,
                "entropy": round(h / seen, 4),
                "uniform": round(math.log(L), 4),
                "entropy_ratio": round(h / seen / math.log(L), 4),
                "images": seen,
                "student_px": side,
            }
        )
    return pd.DataFrame(rows)


def train(config: Path, out: Path, settings: list[str], epochs: int, seeds: list[int]) -> pd.DataFrame:
    from distill.settings import pool_dir_of
    from distill.train import distill
    from imat.config import load_config

    pool = pool_dir_of(load_config(config))
    frames = []
    for name in settings:
        for seed in seeds:
            # a run dir of its own; the manifest and images are the pool's (pool.json points to them)
            run = out / f"b_{name}_s{seed}"
            overrides = [*TRAIN[name], f"distill.train.epochs={epochs}"]
            overrides += [f"distill.train.seed={seed}", f"run_dir={run}", f"distill.pool={pool}"]
            summary = distill(load_config(config, overrides), resume=True, progress=False)
            cols = [c for c in summary.columns if c.endswith("_b0") and c.split("_")[0] in ("t", "sim")]
            keep = ["epoch", *cols, "train_sim_b0", "val_top1"]
            frames.append(summary[[c for c in keep if c in summary.columns]].assign(setting=name, seed=seed))
    return pd.concat(frames, ignore_index=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True, help="a run config whose pool is trained")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="probe,train")
    ap.add_argument("--settings", default=",".join(TRAIN))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--max-images", type=int, default=2000)
    ap.add_argument("--publish", default=None, help="write benchmarks/results/NAME_{probe,train}.csv")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from imat.io import write_csv

    dest = (ROOT / "benchmarks" / "results") if args.publish else args.out
    stem = args.publish or "blocks"
    parts = args.parts.split(",")
    if "probe" in parts:
        table = probe(args.config, args.max_images)
        write_csv(dest / f"{stem}_probe.csv", table)
        print(table.sort_values("entropy_ratio").head(20).to_string(index=False))
    if "train" in parts:
        seeds = [int(s) for s in args.seeds.split(",")]
        table = train(args.config, args.out, args.settings.split(","), args.epochs, seeds)
        write_csv(dest / f"{stem}_train.csv", table)
        print(table.to_string(index=False))


if __name__ == "__main__":
    main()
