"""`imat data audit POOL_DIR [--config CONFIG] [--top N]`: rank training images by how strongly the
teacher ensemble disagrees with their given label; writes audit.csv and a self-contained audit.html."""

from __future__ import annotations

import argparse

from imat.commands.options import add_progress_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool_dir", help="teacher pool folder (with pool.json)")
    parser.add_argument("--config", help="run config: images root, label noise, teacher subset, run dir")
    parser.add_argument("--top", type=int, default=100, help="images in the HTML gallery (default 100)")
    parser.add_argument("--out", help="output folder (default RUN_DIR/audit, or POOL_DIR/../audit)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    from distill.audit import audit
    from imat.config import load_config
    from imat.errors import require_dir

    require_dir(args.pool_dir, "teacher pool")
    cfg = load_config(args.config) if args.config else None
    res = audit(
        args.pool_dir,
        cfg,
        top=args.top,
        out_dir=args.out,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
    )
    print(f"audited {len(res.table)} training images: {res.csv} and {res.html}")
    head = res.table.head(min(args.top, 10))
    for _, r in head.iterrows():
        print(
            f"  #{r['rank']:<4} {r['image_id']}: given {r['given_label']} p={r['p_given']:.3f}, ensemble says "
            f"{r['predicted_label']} p={r['p_predicted']:.3f}"
        )
    if res.precision_at_top is not None:
        print(
            f"known flipped labels among the top {min(args.top, len(res.table))}: {100 * res.precision_at_top:.1f}%"
        )
    return 0
