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
        "--quality", type=int, default=None, help="cifar10 from the python archive: JPEG quality (75)"
    )
    # the embedded kits' options; None until given, so cifar10 can refuse them instead of ignoring them
    parser.add_argument("--seed", type=int, default=None, help="split and id seed (default 0)")
    parser.add_argument("--val-fraction", type=float, default=None, help="share of each class for val (0.1)")
    parser.add_argument(
        "--test-fraction", type=float, default=None, help="share of each class for test (0.2)"
    )
    parser.add_argument("--size", type=int, default=None, help="side of the written images in pixels (28)")
    parser.add_argument("--limit", type=int, default=None, help="keep a class-balanced subset of N images")


EMBEDDED_OPTIONS = {"seed": 0, "val_fraction": 0.1, "test_fraction": 0.2, "size": 28, "limit": None}


def run(args: argparse.Namespace) -> int:
    given = [f"--{k.replace('_', '-')}" for k in EMBEDDED_OPTIONS if getattr(args, k) is not None]
    if args.name == CIFAR10:
        if not args.source:
            raise ImatError(
                "imat data kit cifar10 needs --from ARCHIVE_OR_FOLDER (e.g. cifar-10-python.tar.gz)"
            )
        if given:
            raise ImatError(
                f"{', '.join(given)}: options of the embedded kits, not of cifar10 (it keeps every image)"
            )
        info = write_cifar10(args.source, args.out, quality=75 if args.quality is None else args.quality)
        print(cifar10_summary(info, args.out))
        return 0
    if args.source or args.quality is not None:
        raise ImatError(f"--from and --quality are for the cifar10 kit; {args.name!r} is embedded")
    options = {
        k: default if getattr(args, k) is None else getattr(args, k)
        for k, default in EMBEDDED_OPTIONS.items()
    }
    paths = write_kit(args.name, args.out, **options)
    print(kit_summary(paths))
    return 0
