"""Do MEAL's discriminators learn? Per-epoch balanced accuracy of every block's discriminator under
several settings, on one teacher pool, with `imat distill` itself.

The pool is any run directory with a trained ``teachers/`` (the demo's is the quickest to make:
``imat demo --out DIR --until teachers``). Each setting is one student run under ``--out/d_NAME``; a
finished run is reused (``fit(resume=True)`` is a no-op), so the script resumes where it stopped.

    .venv/bin/imat demo --out /tmp/dx/demo --until teachers
    .venv/bin/python benchmarks/bench_discriminators.py --config /tmp/dx/demo/config.yaml --out /tmp/dx

Writes ``benchmarks/results/discriminators_demo.csv``: one row per setting and epoch with ``d_acc_b{k}``
(0.5 = chance), the discriminators' loss, the student's validation top-1 and the run's ``adversarial``
status (``inert`` when every discriminator stayed within 0.5 +- 0.05 for the whole run).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

# name -> (epochs, max steps per epoch or None, overrides)
SETTINGS: dict[str, tuple[int, int | None, list[str]]] = {
    "old": (
        6,
        12,
        [
            "distill.adversarial.widths=paper",
            "distill.adversarial.input_norm=none",
            "distill.adversarial.optimizer=same",
        ],
    ),
    "new": (6, 12, []),
    "full": (4, None, []),
    "full_lr2e4": (4, None, ["distill.adversarial.lr=2e-4"]),
    "full_w01": (4, None, ["distill.adversarial.weight=0.1"]),
    "full_d3": (4, None, ["distill.adversarial.d_steps=3"]),
    "full_single": (4, None, ["distill.teachers=[resnet10t]"]),
    "full_pt": (4, None, ["distill.adversarial.per_teacher=true"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the pool run's config.yaml (its teachers/ is used)")
    p.add_argument("--out", required=True, help="folder for the student runs (d_NAME)")
    p.add_argument("--settings", default=",".join(SETTINGS))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from distill.train import distill
    from imat.config import load_config
    from imat.io import write_csv

    pool_run = Path(args.config).resolve().parent
    frames = []
    for name in args.settings.split(","):
        epochs, steps, overrides = SETTINGS[name]
        cfg = load_config(
            args.config,
            [
                f"run_dir={Path(args.out) / f'd_{name}'}",
                f"distill.pool={pool_run / 'teachers'}",
                f"distill.train.epochs={epochs}",
                f"distill.train.max_steps_per_epoch={'null' if steps is None else steps}",
                *overrides,
            ],
        )
        summary = distill(cfg, resume=True, progress=False)
        keep = ["epoch", "val_top1", "train_d_loss", "adversarial"]
        keep += [c for c in summary.columns if c.startswith("d_acc_b")]
        frames.append(
            summary[[c for c in keep if c in summary]].assign(setting=name, overrides=" ".join(overrides))
        )
        print(frames[-1].to_string(index=False), flush=True)
    table = pd.concat(frames, ignore_index=True)
    write_csv(ROOT / "benchmarks" / "results" / "discriminators_demo.csv", table)


if __name__ == "__main__":
    main()
