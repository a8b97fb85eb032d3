"""`imat teachers train CONFIG [k=v ...] [--only NAME] [--resume] [--force]`: train the teacher pool.

Each teacher of ``teachers.pool`` is trained by the shared engine into ``POOL/<name>/`` and recorded in
``POOL/pool.json``; finished teachers are skipped, so the command can be rerun after an interruption.
"""

from __future__ import annotations

import argparse
import logging

from imat.cli_options import add_progress_argument, add_scale_out_arguments
from imat.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="run config (YAML) with a teachers.pool section")
    parser.add_argument(
        "overrides", nargs="*", metavar="k=v", help="override any config key, e.g. teachers.defaults.epochs=2"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="train only this teacher (repeat for several; default: the whole pool)",
    )
    parser.add_argument("--resume", action="store_true", help="continue unfinished teachers from last.ckpt")
    parser.add_argument("--force", action="store_true", help="retrain teachers that already finished")
    add_scale_out_arguments(parser)
    add_progress_argument(parser)


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")


def run(args: argparse.Namespace) -> int:
    from teachers.train import results_table, train_pool

    _setup_logging()
    cfg = load_config(args.config, args.overrides)
    source = str(args.config)
    if getattr(args, "ray_workers", 0):
        from imat.engine.ray_train import run_entry_on_ray

        kwargs = {"only": args.only, "resume": args.resume, "force": args.force, "source": source}
        kwargs["progress"] = not args.no_progress
        run_entry_on_ray(
            "teachers.train:train_pool",
            cfg,
            args.ray_workers,
            kwargs,
            args.address,
            max_failures=args.max_failures,
            keep_checkpoints=args.keep_checkpoints,
        )
        print(f"teacher pool: {cfg.pool_dir / 'pool.json'}")
        return 0
    results = train_pool(
        cfg,
        only=args.only,
        resume=args.resume,
        force=args.force,
        source=source,
        progress=not args.no_progress,
    )
    print(f"teacher pool: {cfg.pool_dir / 'pool.json'}")
    print(results_table(results))
    return 0
