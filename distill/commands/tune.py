"""`imat tune CONFIG [--samples N] [--address ADDR] [--restart] [k=v ...]`: Ray Tune sweep of `imat distill`.

The search space, scheduler (asha | pbt | fifo), metric and per-trial resources come from the config's
``tune:`` section. Rerunning the command after the driver was killed restores the experiment found in
the storage path (default ``RUN_DIR/tune``) and finishes it; ``--restart`` discards it first.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="run config (YAML) with distill: and tune: sections")
    parser.add_argument(
        "overrides", nargs="*", metavar="k=v", help="dotted overrides, e.g. tune.scheduler=pbt"
    )
    parser.add_argument("--samples", type=int, default=None, help="number of trials (default tune.samples)")
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default tune.address, RAY_ADDRESS, or local Ray)",
    )
    parser.add_argument(
        "--restart", action="store_true", help="discard an existing experiment and start over"
    )
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=None,
        metavar="N",
        help="checkpoints kept per trial, the best by tune.metric, and always the latest "
        "(default tune.keep_checkpoints, 2)",
    )
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs of the local Ray started here (default: all)"
    )
    parser.add_argument(
        "--quiet",
        "--no-progress",
        dest="quiet",
        action="store_true",
        help="no Ray progress table while trials run",
    )


def run(args: argparse.Namespace) -> int:
    import logging

    from distill.tune import tune_distill
    from imat.config import load_config
    from imat.errors import ImatError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.samples is not None and args.samples < 1:
        raise ImatError(f"--samples must be >= 1, got {args.samples}")
    overrides = list(args.overrides)
    if args.keep_checkpoints is not None:
        overrides.append(f"tune.keep_checkpoints={args.keep_checkpoints}")
    cfg = load_config(args.config, overrides)
    out = tune_distill(
        cfg,
        samples=args.samples,
        address=args.address,
        restart=args.restart,
        num_cpus=args.num_cpus,
        verbose=0 if args.quiet else 1,
    )
    what = "restored and finished" if out.restored else "finished"
    print(f"tune: sweep {what}; {len(out.trials)} trial(s) in {out.storage}")
    print(out.trials.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    best = ", ".join(f"{k}={v}" for k, v in out.best_config.items())
    print(f"best: {best}")
    print(f"best config: {out.best_yaml}  (run it with `imat distill {out.best_yaml}`)")
    if out.best_checkpoint is not None:
        print(f"best checkpoint: {out.best_checkpoint}")
    return 0
