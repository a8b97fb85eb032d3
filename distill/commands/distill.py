"""`imat distill CONFIG [k=v ...] [--resume]`: train the student (meal | meal-v2 | kd | ce)."""

from __future__ import annotations

import argparse

from imat.cli_options import add_scale_out_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML); its distill: section says what to train")
    parser.add_argument(
        "overrides", nargs="*", metavar="k=v", help="dotted overrides, e.g. distill.method=kd"
    )
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/student/last.ckpt")
    parser.add_argument(
        "--quiet",
        "--no-progress",
        dest="quiet",
        action="store_true",
        help="no progress bars or console table",
    )
    add_scale_out_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import logging

    from distill.train import STUDENT_DIR, distill
    from imat.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "ray_workers", 0):
        import pandas as pd

        from imat.engine.ray_train import run_entry_on_ray

        run_entry_on_ray(
            "distill.train:distill",
            cfg,
            args.ray_workers,
            {"resume": args.resume, "progress": False},
            args.address,
            max_failures=args.max_failures,
            keep_checkpoints=args.keep_checkpoints,
        )
        summary_path = cfg.run_path / STUDENT_DIR / "summary.csv"
        summary = pd.read_csv(summary_path) if summary_path.is_file() else pd.DataFrame()
    else:
        summary = distill(cfg, resume=args.resume, progress=not args.quiet)
    out = cfg.run_path / STUDENT_DIR
    last = summary.iloc[-1] if len(summary) else None
    if last is not None and "val_top1" in summary:
        print(
            f"student ({cfg.distill.method}): val top-1 {last['val_top1']:.4f}, top-3 {last['val_top3']:.4f}; {out}"
        )
    else:
        print(f"student ({cfg.distill.method}): {out}")
    if summary.get("adversarial") is not None and summary["adversarial"].iloc[-1] == "inert":
        print("adversarial term inert: every discriminator stayed at chance for the whole run")
    return 0
