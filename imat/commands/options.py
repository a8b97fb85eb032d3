"""Command-line options shared by several commands (argparse only: no heavy imports at parse time)."""

from __future__ import annotations

import argparse


def add_scale_out_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray-workers N`` and ``--address``, shared by every training command."""
    parser.add_argument(
        "--ray-workers",
        type=int,
        default=0,
        metavar="N",
        help="data-parallel over N Ray Train workers (for torchrun just launch this command with torchrun)",
    )
    parser.add_argument(
        "--address", default=None, help="with --ray-workers: Ray cluster (default RAY_ADDRESS or local)"
    )
