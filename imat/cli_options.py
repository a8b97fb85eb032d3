"""Command-line options shared by several commands (argparse only: no heavy imports at parse time)."""

from __future__ import annotations

import argparse


def add_scale_out_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray-workers N``, ``--max-failures N``, ``--keep-checkpoints N`` and ``--address``, shared by
    every training command."""
    parser.add_argument(
        "--ray-workers",
        type=int,
        default=0,
        metavar="N",
        help="data-parallel over N Ray Train workers (for torchrun just launch this command with torchrun)",
    )
    parser.add_argument(
        "--max-failures",
        type=int,
        default=2,
        metavar="N",
        help="with --ray-workers: restarts from the last epoch's checkpoint when a worker or node fails "
        "(Ray Train's FailureConfig; -1 unlimited, 0 none; default 2)",
    )
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=2,
        metavar="N",
        help="with --ray-workers: epoch checkpoints Ray keeps, the best by train.best_metric, and always "
        "the latest (default 2)",
    )
    parser.add_argument(
        "--address", default=None, help="with --ray-workers: Ray cluster (default RAY_ADDRESS or local)"
    )


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``: no progress bars (logs and the final summary still print)."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
