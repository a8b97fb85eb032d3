"""`imat data kit NAME --out DIR`: write an embedded data set as a ready competition folder."""

from __future__ import annotations

import argparse

from imat.kit import KITS, kit_summary, write_kit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help=f"kit to write: {', '.join(sorted(KITS))}")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to create (new, empty, or a kit)")
    parser.add_argument("--seed", type=int, default=0, help="split and id seed (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of each class for val")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of each class for test")
    parser.add_argument("--size", type=int, default=28, help="side of the written images in pixels")
    parser.add_argument("--limit", type=int, default=None, help="keep a class-balanced subset of N images")


def run(args: argparse.Namespace) -> int:
    paths = write_kit(
        args.name,
        args.out,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        size=args.size,
        limit=args.limit,
    )
    print(kit_summary(paths))
    return 0
