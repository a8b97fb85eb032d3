"""Scale-out overheads on one machine, each against its one-process twin, in one run:

* a Ray Tune sweep (`imat tune`, FIFO, N trials x E epochs) against the same trials run one after
  another with `imat distill`; plus the bare cost of starting and stopping a local Ray;
* `imat distill` data-parallel over 2 gloo processes (torchrun) against 1 process;
* `imat predict --ray` with 2 Ray Data actors against the single-process `imat predict`.

Everything runs on the embedded kit (`imat data kit mnist5k`, a class-balanced subset), prepared by
`imat pipeline --until export` with one small teacher, so the numbers are about orchestration, not
about accuracy. Every command runs in its own process, as a user would run it.

    .venv/bin/python benchmarks/bench_scale.py [--images 2000] [--epochs 2] [--trials 2]

Prints a Markdown table; writes ``results.csv`` under --out.

``--only lr`` measures accuracy only (no timings, so it may run beside other work): the
data-parallel distillation over ``--seeds`` seeds, one process against 2 gloo processes with the
learning rate as written (``train.lr_scale=none``, what the engine did before it scaled the lr) and
rescaled to the global batch (the default), plus 2 processes at half the batch (the one-process
global batch). Writes the table to ``--csv`` (e.g. benchmarks/results/scale_lr_cpu.csv).

    .venv/bin/python benchmarks/bench_scale.py --only lr --seeds 3 --csv benchmarks/results/scale_lr_cpu.csv
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

IMAT = [sys.executable, "-m", "imat.app.cli"]


def run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Wall seconds of ``cmd`` (its own process); raises with the tail of stderr when it fails."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{proc.stderr[-2000:]}")
    return seconds


def write_config(out: Path, images: int, epochs: int, trials: int) -> Path:
    from imat.kit import write_kit

    kit = out / "kit"
    if not (kit / "train.json").is_file():
        write_kit("mnist5k", kit, seed=0, limit=images)
    recipe = {"epochs": epochs, "batch_size": 64, "lr": 0.05, "aug": {"preset": "light", "flips": False}}
    cfg = {
        "run_dir": str(out / "run"),
        "data": {
            "train": str(kit / "train.json"),
            "val": str(kit / "val.json"),
            "test": str(kit / "test.json"),
            "images": str(out / "images"),
            "num_workers": 0,
        },
        "teachers": {
            "dir": str(out / "run" / "teachers"),  # every run below distils from this one pool
            "defaults": {**recipe, "epochs": 1},
            "pool": [{"name": "r10", "arch": "resnet10t", "input_size": 28, "crop_pct": 1.0}],
        },
        "distill": {
            "method": "kd",
            "student": {"arch": "resnet10t", "input_size": 28, "crop_pct": 1.0},
            "train": recipe,
        },
        "tune": {
            "samples": trials,
            "scheduler": "fifo",
            "metric": "val_top1_err",
            "space": {"distill.train.lr": {"type": "choice", "values": [0.02, 0.05, 0.1, 0.2][:trials]}},
        },
        "export": {"verify_images": 64, "calibration_images": 64},
        "pipeline": {"audit_top": 0},
    }
    path = out / "scale.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def scaling_note(config: Path) -> dict[str, str]:
    """The engine's ``# imat.engine scaling:`` note at the end of a run's config.yaml."""
    text = config.read_text()
    marker = "# imat.engine scaling:"
    if marker not in text:
        return {}
    lines = text.split(marker, 1)[1].splitlines()[1:]
    return dict(line[1:].strip().split(": ", 1) for line in lines if line.startswith("#   "))


def lr_rows(cfg: Path, out: Path, seeds: int) -> list[dict]:
    """Val top-1 of the student: 1 process against 2 gloo processes, lr as written or rescaled."""
    runs = [
        ("1 process", [], [sys.executable]),
        ("torchrun, 2 gloo processes, lr as written", ["distill.train.lr_scale=none"], TORCHRUN),
        ("torchrun, 2 gloo processes, lr scaled (default)", [], TORCHRUN),
        ("torchrun, 2 gloo processes at half the batch", ["distill.train.batch_size=32"], TORCHRUN),
    ]
    rows = []
    for seed in range(seeds):
        for label, extra, head in runs:
            folder = out / f"lr{len(rows)}"
            cmd = [*head, "-m", "imat.app.cli", "distill", str(cfg), f"run_dir={folder}"]
            run([*cmd, f"distill.train.seed={seed}", *extra, "--quiet"], {"OMP_NUM_THREADS": "1"})
            student = folder / "student"
            summary = pd.read_csv(student / "summary.csv")
            note = scaling_note(student / "config.yaml")
            rows.append(
                {
                    "benchmark": "distill",
                    "run": label,
                    "seed": seed,
                    "ranks": int(note.get("world_size", 0)),
                    "global_batch": int(summary["global_batch"].iloc[-1]),
                    "lr": float(note.get("lr_main", "nan")),
                    "steps": int(summary["global_step"].iloc[-1]),
                    "val top-1": float(summary["val_top1"].iloc[-1]),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out/scale")
    p.add_argument("--images", type=int, default=2000, help="kit subset (train/val/test 70/10/20)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--trials", type=int, default=2, choices=[1, 2, 3, 4])
    p.add_argument(
        "--only", choices=["all", "lr"], default="all", help="lr: the lr-scaling accuracy runs only"
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds of each --only lr run")
    p.add_argument("--csv", default=None, help="also write the table here (e.g. under benchmarks/results/)")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = write_config(out, args.images, args.epochs, args.trials)
    if args.only == "lr":
        run([*IMAT, "pipeline", str(cfg), "--until", "teachers"])
        df = pd.DataFrame(lr_rows(cfg, out, args.seeds))
        means = df.groupby("run", sort=False)[["global_batch", "lr", "steps", "val top-1"]].mean()
        print(means.to_string())
        if args.csv:
            Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
            df.to_csv(args.csv, index=False)
        return
    run([*IMAT, "pipeline", str(cfg), "--until", "export"])
    rows = []

    # 1. sweep: Ray Tune against the same trials one after another
    lrs = yaml.safe_load(cfg.read_text())["tune"]["space"]["distill.train.lr"]["values"]
    seq = sum(
        run([*IMAT, "distill", str(cfg), f"distill.train.lr={lr}", f"run_dir={out / f'seq{i}'}", "--quiet"])
        for i, lr in enumerate(lrs)
    )
    ray_start = run([sys.executable, "-c", "import ray; ray.init(include_dashboard=False); ray.shutdown()"])
    tune = run([*IMAT, "tune", str(cfg), "--restart", "--quiet", "--num-cpus", str(os.cpu_count())])
    what = f"{args.trials} trials x {args.epochs} epochs"
    rows += [
        {"benchmark": "sweep", "run": f"`imat distill` x {args.trials}, one after another", "seconds": seq},
        {"benchmark": "sweep", "run": f"`imat tune` ({what}, FIFO, 1 CPU per trial)", "seconds": tune},
        {"benchmark": "sweep", "run": "start + stop a local Ray (`ray.init`)", "seconds": ray_start},
    ]

    # 2. data-parallel distillation: 2 gloo processes against 1
    one = out / "ddp1"
    two = out / "ddp2"
    t1 = run([*IMAT, "distill", str(cfg), f"run_dir={one}", "--quiet"])
    t2 = run(
        [*TORCHRUN, "-m", "imat.app.cli", "distill", str(cfg), f"run_dir={two}", "--quiet"],
        {"OMP_NUM_THREADS": "1"},
    )
    for label, folder, total in (("1 process", one, t1), ("torchrun, 2 gloo processes", two, t2)):
        summary = pd.read_csv(folder / "student" / "summary.csv")
        rows.append(
            {
                "benchmark": "distill",
                "run": label,
                "seconds": total,
                "train s/epoch": float(summary["train_time_s"].mean()),
                "val top-1": float(summary["val_top1"].iloc[-1]),
            }
        )

    # 3. batch inference: Ray Data with 2 actors against one process
    onnx = Path(yaml.safe_load(cfg.read_text())["run_dir"]) / "export" / "student.onnx"
    test = yaml.safe_load(cfg.read_text())["data"]["test"]
    images = yaml.safe_load(cfg.read_text())["data"]["images"]
    common = ["predict", str(onnx), test, "--images", images, "--provider", "cpu", "--batch-size", "64"]
    n_test = len(json.loads(Path(test).read_text())["images"])
    single = run([*IMAT, *common, "--out", str(out / "p1.parquet"), "--workers", "1", "--no-progress"])
    ray = run([*IMAT, *common, "--out", str(out / "p2.parquet"), "--ray", "--actors", "2"])
    same = (
        pd.read_parquet(out / "p1.parquet")["topk_labels"]
        .map(list)
        .equals(pd.read_parquet(out / "p2.parquet")["topk_labels"].map(list))
    )
    rows += [
        {"benchmark": "predict", "run": f"one process ({n_test} images)", "seconds": single},
        {
            "benchmark": "predict",
            "run": f"Ray Data, 2 actors ({n_test} images; same rows: {same})",
            "seconds": ray,
        },
    ]

    df = pd.DataFrame(rows)
    df.to_csv(out / "results.csv", index=False)
    print(
        f"\nkit subset {args.images} images, {args.epochs} epochs; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}\n"
    )
    cols = list(df.columns)
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for _, r in df.iterrows():
        cells = [
            "" if pd.isna(r[c]) else (f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])) for c in cols
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
