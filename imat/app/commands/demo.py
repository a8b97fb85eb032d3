"""`imat demo [--out DIR]`: the whole pipeline on the embedded kit (MNIST digits), CPU-sized."""

from __future__ import annotations

import argparse

from imat.app.commands.pipeline import add_step_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="run directory (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="kit split seed")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="a class-balanced subset of N digits (quick look)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="k=v", help="override demo config keys by dotted path"
    )
    add_step_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from imat.app.api import demo_config
    from imat.app.commands.pipeline import print_summary, progress_overrides
    from imat.app.pipeline import run_pipeline

    cfg = demo_config(
        args.out, [*args.overrides, *progress_overrides(args)], seed=args.seed, limit=args.limit
    )
    print_summary(cfg, run_pipeline(cfg, force=args.force, until=args.until))
    return 0
