"""`imat teachers eval POOL_DIR`: each teacher's and the ensembles' top-1/top-3, and which teachers are
worth distilling (greedy forward selection by ensemble top-3). Writes ``POOL_DIR/pool_eval.csv``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from imat.cli_options import add_progress_argument
from imat.errors import ImatError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool", metavar="POOL_DIR", help="teacher pool folder (with pool.json)")
    parser.add_argument(
        "--config", metavar="CONFIG", help="run config: its data section and manifest (RUN_DIR/data)"
    )
    parser.add_argument("--manifest", metavar="PATH", help="manifest.parquet to evaluate on")
    parser.add_argument("--images", metavar="DIR", help="images root for relative manifest paths")
    parser.add_argument("--split", default="val", choices=["train", "val"], help="split (default val)")
    parser.add_argument("--teachers", metavar="A,B", help="comma-separated subset of the pool")
    parser.add_argument(
        "--tta-flip", action="store_true", default=None, help="average with the horizontally flipped image"
    )
    parser.add_argument("--metric", default="top3", choices=["top1", "top3"], help="selection metric")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument(
        "--num-workers", type=int, default=None, help="loader workers (default data.num_workers or 0)"
    )
    parser.add_argument(
        "--max-images", type=int, default=None, metavar="N", help="a seeded subset of N images"
    )
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    from teachers.evaluate import describe_selection, evaluate_pool, table_for_print

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.batch_size < 1:
        raise ImatError(f"--batch-size must be >= 1, got {args.batch_size}")
    manifest = args.manifest
    images = args.images
    decoder = None
    num_workers = args.num_workers
    tta_flip = args.tta_flip
    if args.config:
        from imat.config import load_config

        cfg = load_config(args.config)
        if manifest is None:
            manifest = str(cfg.manifest_path)
        if images is None:
            images = cfg.data.images
        decoder = cfg.data.decoder
        if num_workers is None:
            num_workers = cfg.data.num_workers
        if tta_flip is None:
            tta_flip = cfg.teachers.tta_flip
    names = [n.strip() for n in args.teachers.split(",") if n.strip()] if args.teachers else None
    result = evaluate_pool(
        Path(args.pool),
        manifest=manifest,
        images=images,
        decoder=decoder,
        split=args.split,
        names=names,
        tta_flip=bool(tta_flip),
        batch_size=args.batch_size,
        device=args.device,
        num_workers=num_workers or 0,
        metric=args.metric,
        max_images=args.max_images,
        progress=not args.no_progress,
    )
    from imat.engine.runtime import is_main_process

    if not is_main_process():  # under torchrun rank 0 reports for all
        return 0
    flip = " with flip TTA" if tta_flip else ""
    print(f"{args.split} split{flip}, {int((result.labels >= 0).sum())} images:")
    print(table_for_print(result.table))
    print(describe_selection(result.selection))
    print(f"wrote {result.path}")
    return 0
