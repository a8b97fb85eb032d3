"""`imat pipeline CONFIG [k=v ...] [--force STEP] [--until STEP]`: every step, skipping steps whose
outputs exist."""

from __future__ import annotations

import argparse

from imat.app.pipeline import STEP_NAMES
from imat.config import RunConfig


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        choices=STEP_NAMES,
        metavar="STEP",
        help=f"rerun this step and every later one ({', '.join(STEP_NAMES)})",
    )
    parser.add_argument("--until", choices=STEP_NAMES, metavar="STEP", help="stop after this step")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (pipeline.progress=false)"
    )


def progress_overrides(args: argparse.Namespace) -> list[str]:
    """``--no-progress`` as the config override it stands for (``pipeline.progress``)."""
    return ["pipeline.progress=false"] if args.no_progress else []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="the run's YAML config")
    parser.add_argument("overrides", nargs="*", metavar="k=v", help="override config keys by dotted path")
    add_step_arguments(parser)


def _val_images(cfg: RunConfig) -> int:
    """Labelled validation images in the run's manifest (0 when there is none yet)."""
    import pandas as pd

    if not cfg.manifest_path.is_file():
        return 0
    frame = pd.read_parquet(cfg.manifest_path, columns=["split"])
    return int((frame["split"] == "val").sum())


def print_summary(cfg: RunConfig, rows: list[tuple[str, str, float]]) -> None:
    """The steps with their status, the comparison table when the run has one, and the key outputs."""
    import pandas as pd

    from imat.app.results import format_table
    from imat.app.submission_choice import (
        distillation_note,
        find_candidates,
        format_candidates,
        read_choice,
    )

    print("\nstep        status         seconds")
    for name, status, seconds in rows:
        print(f"{name:<11} {status:<14} {seconds:7.1f}")
    results = cfg.run_path / "results.csv"
    if results.is_file():
        print("\nvalidation split; images/s = model compute on this machine's CPU at batch 32")
        print(format_table(pd.read_csv(results)))
    choice = read_choice(cfg.run_path)
    if choice and any(
        c.get("measured_on", "checkpoint") != "checkpoint" for c in choice.get("candidates", [])
    ):
        print(f"\ncandidates (validation; budget: {choice.get('budget', '')}; images/s on submit.provider)")
        print(format_candidates(choice))
    if choice and choice.get("reason"):
        print(f"\n{choice['reason']}")
    note = distillation_note(find_candidates(cfg), _val_images(cfg)) if choice else None
    if note:
        print(note)
    print()
    for name in ("submission.csv", "submission.json", "score.json", "report.html"):
        path = cfg.run_path / name
        if path.is_file():
            print(f"{name + ':':<17}{path}")


def run(args: argparse.Namespace) -> int:
    from imat.app.pipeline import run_pipeline
    from imat.config import load_config

    cfg = load_config(args.config, [*args.overrides, *progress_overrides(args)])
    print_summary(cfg, run_pipeline(cfg, force=args.force, until=args.until))
    return 0
