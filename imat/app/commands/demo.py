"""`imat demo [--out DIR]`: the whole pipeline on the embedded kit (MNIST digits), CPU-sized."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from imat.app.commands.pipeline import add_step_arguments

DEMO_CONFIG = "demo.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="run directory (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="kit split seed")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="a class-balanced subset of N digits (quick look)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="k=v", help="override demo config keys by dotted path"
    )
    add_step_arguments(parser)


def demo_config_path() -> Path:
    """The demo config shipped inside the package (configs/demo.yaml in the repository links to it)."""
    return Path(str(resources.files("imat") / "configs" / DEMO_CONFIG))


def run(args: argparse.Namespace) -> int:
    from imat.app.commands.pipeline import print_summary, progress_overrides
    from imat.app.pipeline import run_pipeline
    from imat.config import load_config
    from imat.kit import write_kit

    out = Path(args.out)
    kit = out / "kit"
    if not (kit / "train.json").is_file():
        write_kit("mnist5k", kit, seed=args.seed, limit=args.limit)
    overrides = [
        f"run_dir={out}",
        f"data.train={kit / 'train.json'}",
        f"data.val={kit / 'val.json'}",
        f"data.test={kit / 'test.json'}",
        f"data.solution={kit / 'solution.csv'}",
        f"data.images={out / 'images'}",
        *args.overrides,
        *progress_overrides(args),
    ]
    cfg = load_config(demo_config_path(), overrides)
    print_summary(cfg, run_pipeline(cfg, force=args.force, until=args.until))
    return 0
