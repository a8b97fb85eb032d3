"""Do MEAL's discriminators learn? Per-epoch balanced accuracy of every block's discriminator under
several settings, on one teacher pool, with `imat distill` itself.

The pool is any run directory with a trained ``teachers/`` and a config whose ``distill:`` section is
the student to train: the demo's (``imat demo --out DIR --until teachers``) or a reduced
``bench_distill.py --stages teachers`` run on CIFAR-10. Each setting is one student run under
``--out/d_NAME``; a finished run is reused (``fit(resume=True)`` is a no-op), so the script resumes
where it stopped.

    .venv/bin/imat demo --out /tmp/dx/demo --until teachers
    .venv/bin/python benchmarks/bench_discriminators.py --config /tmp/dx/demo/config.yaml --out /tmp/dx \
        --settings default,unconditional --publish discriminators_demo

The table (``benchmarks/results/NAME.csv`` with ``--publish NAME``, else ``--out/discriminators.csv``)
has one row per setting and epoch with ``d_acc_b{k}`` (0.5 = chance), the discriminators' loss, the
student's validation top-1 and the run's ``adversarial`` status (``inert`` when every discriminator
stayed within 0.5 +- 0.05 for the whole run).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

# name -> overrides of imat's default discriminator settings
SETTINGS: dict[str, list[str]] = {
    "default": [],  # conditioned on the teacher's class, Adam lr 1e-2, student weight 0.1, input_norm auto
    "unconditional": ["distill.adversarial.condition=none"],
    # MEAL's own discriminator (d/2, d/4 with ReLU, raw inputs, unconditional) on the student's optimiser
    # (SGD) at the default D lr and weight
    "paper": [
        "distill.adversarial.condition=none",
        "distill.adversarial.widths=paper",
        "distill.adversarial.input_norm=none",
        "distill.adversarial.optimizer=same",
    ],
    "no_discriminators": ["distill.adversarial.enabled=false"],
    "per_teacher": ["distill.adversarial.per_teacher=true"],
    "spectral_norm": ["distill.adversarial.spectral_norm=true"],
    "d_steps3": ["distill.adversarial.d_steps=3"],
}


def _explored(
    lr: float, weight: float, norm: str = "log_softmax", d_steps: int = 1, cond: str = "teacher_class"
):
    return [
        f"distill.adversarial.lr={lr}",
        f"distill.adversarial.weight={weight}",
        f"distill.adversarial.input_norm={norm}",
        f"distill.adversarial.d_steps={d_steps}",
        f"distill.adversarial.condition={cond}",
    ]


# The search that chose the defaults (2026-12-03), every value spelled out so it reproduces whatever the
# defaults become: D lr, the student's adversarial weight, the stage block's input, n_critic.
SETTINGS |= {
    "x_lr1e-3_w1": _explored(1e-3, 1.0),  # the defaults before, conditioned
    "x_lr1e-3_w1_uncond": _explored(1e-3, 1.0, cond="none"),  # the defaults before
    "x_lr3e-3_w1": _explored(3e-3, 1.0),
    "x_lr1e-2_w1": _explored(1e-2, 1.0),
    "x_lr1e-3_w1_d3": _explored(1e-3, 1.0, d_steps=3),
    "x_lr1e-3_w0.1": _explored(1e-3, 0.1),
    "x_lr3e-3_w0.3": _explored(3e-3, 0.3),
    "x_lr1e-2_w0.1": _explored(1e-2, 0.1),
    "x_lr1e-3_w0.1_d3": _explored(1e-3, 0.1, d_steps=3),
    "x_lr1e-3_w0.1_auto": _explored(1e-3, 0.1, "auto"),
    "x_lr1e-2_w0.1_auto": _explored(1e-2, 0.1, "auto"),  # = the new default
    "x_lr1e-2_w0.1_auto_d3": _explored(1e-2, 0.1, "auto", d_steps=3),
    "x_lr1e-2_w0.03_auto": _explored(1e-2, 0.03, "auto"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the pool run's config.yaml (its teachers/ is used)")
    p.add_argument("--out", required=True, help="folder for the student runs (d_NAME)")
    p.add_argument("--settings", default="default,unconditional", help=f"of {', '.join(SETTINGS)}")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the config's)")
    p.add_argument("--max-steps", type=int, default=None, help="steps per epoch (default: all)")
    p.add_argument("--publish", default="", help="write benchmarks/results/NAME.csv")
    args = p.parse_args()
    unknown = [n for n in args.settings.split(",") if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; known: {', '.join(SETTINGS)}")
    logging.basicConfig(level=logging.WARNING)
    from distill.train import distill
    from imat.config import load_config
    from imat.io import write_csv

    pool_run = Path(args.config).resolve().parent
    results = ROOT / "benchmarks" / "results"
    table_path = results / f"{args.publish}.csv" if args.publish else Path(args.out) / "discriminators.csv"
    frames = []
    for name in args.settings.split(","):
        overrides = SETTINGS[name]
        # the adversarial section starts from imat's defaults, not from the pool config's (a resolved
        # config.yaml spells out the defaults of the day it was written)
        fixed = [
            f"run_dir={Path(args.out).resolve() / f'd_{name}'}",
            f"distill.pool={pool_run / 'teachers'}",
            "distill.adversarial={}",
        ]
        if args.epochs is not None:
            fixed.append(f"distill.train.epochs={args.epochs}")
        if args.max_steps is not None:
            fixed.append(f"distill.train.max_steps_per_epoch={args.max_steps}")
        cfg = load_config(args.config, [*fixed, *overrides])
        summary = distill(cfg, resume=True, progress=False)
        keep = ["epoch", "val_top1", "train_d_loss", "train_sim", "adversarial"]
        keep += [c for c in summary.columns if c.startswith("d_acc_b")]
        frames.append(
            summary[[c for c in keep if c in summary]].assign(setting=name, overrides=" ".join(overrides))
        )
        print(frames[-1].to_string(index=False), flush=True)
        table = pd.concat(frames, ignore_index=True)  # written after every setting: a cut run keeps its rows
        write_csv(table_path, table)


if __name__ == "__main__":
    main()
