"""``imat submit PREDICTIONS --format F --test FILE --out submission.csv``: a validated leaderboard file.

See :mod:`submit.formats` for each format's header and rows, the id order and the fallback for
images without a prediction. The file is checked (header, every test id once and in order, integer
labels, label count) before it is written; an invalid one is never written."""

from __future__ import annotations

import argparse

from submit.commands._common import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", metavar="PREDICTIONS", help="predictions .parquet from imat predict")
    parser.add_argument("--format", required=True, choices=("product2019", "furniture2018", "coco"))
    parser.add_argument("--test", required=True, metavar="FILE", help="the competition's test file")
    parser.add_argument("--out", required=True, metavar="FILE", help="submission .csv to write")
    parser.add_argument("--sample", metavar="CSV", help="sample submission: its id order and header are used")
    parser.add_argument(
        "--train", metavar="MANIFEST_OR_FILE", help="training labels: fallback classes and prior frequencies"
    )
    parser.add_argument(
        "--prior-correction",
        action="store_true",
        help="re-weight from training to uniform class frequencies (needs --train and predict --save-probs)",
    )
    parser.add_argument("--topk", type=int, default=None, help="coco only: labels per row (default 3)")


def run(args: argparse.Namespace) -> int:
    setup_logging()
    from submit.formats import write_submission

    stats = write_submission(
        args.predictions,
        args.format,
        args.test,
        args.out,
        sample=args.sample,
        train=args.train,
        prior_correction=args.prior_correction,
        topk=args.topk,
    )
    print(
        f"wrote {args.out}: {stats['rows']} rows ({stats['format']}), {stats['fallback_rows']} filled with the "
        f"{stats['fallback_from']} ({' '.join(stats['fallback_labels'])})"
        + (", prior-corrected" if stats["prior_correction"] else "")
    )
    return 0
