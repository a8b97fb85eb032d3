"""`imat report RUN_DIR`: one self-contained HTML page with the run's plots and tables."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (run_dir of a config)")
    parser.add_argument("--out", help="where to write the page (default RUN_DIR/report.html)")


def run(args: argparse.Namespace) -> int:
    from imat.app.report import build_report

    path = build_report(args.run_dir, args.out)
    print(f"report: {path}")
    return 0
