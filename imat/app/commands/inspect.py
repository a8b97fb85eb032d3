"""``imat data inspect PATH``: counts per split and class, and missing/corrupt/too large/tiny image files.

PATH is a competition file or folder, a ``manifest.parquet`` (with its ``classes.json``) or a config
YAML (its ``data`` section). Problems are reported (and written with ``--out``) but exit code is 0;
only bad input (a missing PATH, an unreadable file) is an error.
"""

from __future__ import annotations

import argparse

from imat.cli_options import add_progress_argument
from imat.inspection import format_report, inspect_input, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", metavar="PATH", help="competition file, folder, manifest.parquet or config YAML"
    )
    parser.add_argument("--images", metavar="DIR", help="images folder (default: the config's data.images)")
    parser.add_argument(
        "--out", metavar="FILE", help="write the report: .json (everything) or .csv (problems)"
    )
    parser.add_argument("--no-check", action="store_true", help="counts only; do not open the image files")
    parser.add_argument("--min-side", type=int, default=10, help="smaller images are flagged as placeholders")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="larger images are flagged too large, not decoded (default: data.max_pixels, 89478485)",
    )
    parser.add_argument("--workers", type=int, default=None, help="threads for the file check")
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    report = inspect_input(
        args.path,
        images=args.images,
        check=not args.no_check,
        min_side=args.min_side,
        workers=args.workers,
        max_pixels=args.max_pixels,
        progress=not args.no_progress,
    )
    print(format_report(report))
    if args.out:
        print(f"report written: {write_report(report, args.out)}")
    return 0
