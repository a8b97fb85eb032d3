"""`imat data kit NAME --out DIR`: write a ready data set: an embedded kit as a competition folder, or
CIFAR-10 prepared from files the user has (`imat data kit cifar10 --from ARCHIVE_OR_FOLDER --out DIR`)."""

from __future__ import annotations

import argparse

from imat.cifar10 import KIT_NAME as CIFAR10
from imat.cifar10 import cifar10_summary, write_cifar10
from imat.errors import ImatError
from imat.kit import KITS, kit_summary, write_kit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join([*sorted(KITS), CIFAR10])
    parser.add_argument("name", metavar="NAME", help=f"kit to write: {names}")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to create (new, empty, or a kit)")
    parser.add_argument(
        "--from",
        dest="source",
        metavar="ARCHIVE_OR_FOLDER",
        help="cifar10 only: cifar-10-python.tar.gz, a tar.gz of a {train,test}/<class>/ image folder, or that folder",
    )
    parser.add_argument(
        "--quality", type=int, default=75, help="cifar10 from the python archive: JPEG quality"
    )
    parser.add_argument("--seed", type=int, default=0, help="split and id seed (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of each class for val")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of each class for test")
    parser.add_argument("--size", type=int, default=28, help="side of the written images in pixels")
    parser.add_argument("--limit", type=int, default=None, help="keep a class-balanced subset of N images")


def run(args: argparse.Namespace) -> int:
    if args.name == CIFAR10:
        if not args.source:
            raise ImatError(
                "imat data kit cifar10 needs --from ARCHIVE_OR_FOLDER (e.g. cifar-10-python.tar.gz)"
            )
        info = write_cifar10(args.source, args.out, quality=args.quality)
        print(cifar10_summary(info, args.out))
        return 0
    if args.source:
        raise ImatError(f"--from is for the cifar10 kit; {args.name!r} is embedded")
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
