"""``imat score SUBMISSION --solution CSV [--metric top1|top3]``: the competitions' metrics."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("submission", metavar="SUBMISSION", help="submission .csv (id,predicted)")
    parser.add_argument(
        "--solution", required=True, metavar="CSV", help="answers: id,expected (or label/predicted)[,Usage]"
    )
    parser.add_argument("--metric", choices=("top1", "top3"), default="top3", help="headline metric")
    parser.add_argument(
        "--format",
        choices=("product2019", "furniture2018", "coco"),
        default=None,
        help="enforce its label count (furniture2018: 1, others: 3)",
    )
    parser.add_argument("--max-labels", type=int, default=None, help="most labels a row may have (default 3)")
    parser.add_argument("--out", metavar="FILE", help="write the scores as JSON")


def run(args: argparse.Namespace) -> int:
    from imat.io import write_json
    from submit.formats import get_format
    from submit.score import score, usage_summary

    max_labels = args.max_labels or (get_format(args.format).labels if args.format else 3)
    result = score(args.submission, args.solution, args.metric, max_labels=max_labels)
    print(
        f"{result['images']} images: top-1 accuracy {result['top1_accuracy']:.4f} (error {result['top1_error']:.4f}), "
        f"top-3 accuracy {result['top3_accuracy']:.4f} (error {result['top3_error']:.4f}); "
        f"score ({args.metric} error) {result['score']:.5f}"
    )
    by_usage = usage_summary(result)
    if by_usage:
        print(by_usage)
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0
