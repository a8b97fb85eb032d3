"""`imat data audit [POOL_DIR] [--config CONFIG] [--top N]`: rank training images by how likely their
label is wrong (cleanlab's label quality on teacher probabilities); writes audit.csv, audit.html and
audit.json.

With ``--config`` and no POOL_DIR the probabilities are out-of-sample: ``audit.folds`` cross-fitted
teachers (trained, resumably, under RUN_DIR/audit/folds). With POOL_DIR they are the trained pool's
own (in-sample: quick, but teachers that memorised a wrong label no longer flag it)."""

from __future__ import annotations

import argparse

from imat.cli_options import add_progress_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "pool_dir", nargs="?", help="in-sample audit of this teacher pool (with pool.json); omit to cross-fit"
    )
    parser.add_argument(
        "--config",
        help="run config: cross-fitting (audit:), images root, label noise, teacher subset, run dir",
    )
    parser.add_argument("--folds", type=int, help="cross-fitting folds (overrides audit.folds)")
    parser.add_argument("--top", type=int, default=100, help="images in the HTML gallery (default 100)")
    parser.add_argument("--out", help="output folder (default RUN_DIR/audit, or POOL_DIR/../audit)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--force", action="store_true", help="cross-fitting: retrain every fold's teachers")
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    from distill.audit import audit, crossfit_audit
    from imat.config import load_config
    from imat.errors import ImatError, require_dir

    overrides = [f"audit.folds={args.folds}"] if args.folds is not None else []
    cfg = load_config(args.config, overrides) if args.config else None
    if args.pool_dir is not None:
        require_dir(args.pool_dir, "teacher pool")
        if args.folds is not None:
            raise ImatError("--folds cross-fits: give --config and no POOL_DIR (POOL_DIR audits in-sample)")
        res = audit(
            args.pool_dir,
            cfg,
            top=args.top,
            out_dir=args.out,
            batch_size=args.batch_size,
            device=args.device,
            progress=not args.no_progress,
        )
    elif cfg is not None:
        res = crossfit_audit(
            cfg,
            top=args.top,
            out_dir=args.out,
            batch_size=args.batch_size,
            device=args.device,
            num_workers=cfg.data.num_workers,
            force=args.force,
        )
    else:
        raise ImatError("give a teacher pool (in-sample audit) or --config CONFIG (cross-fitted audit)")
    info = res.info
    source = (
        f"out-of-sample, {info['folds']}-fold cross-fitted"
        if "folds" in info
        else "in-sample (the pool itself)"
    )
    print(
        f"audited {len(res.table)} training images ({source} probabilities): {info['issues']} likely label "
        f"issues (cleanlab); {res.csv}, {res.html}"
    )
    head = res.table.head(min(args.top, 10))
    for _, r in head.iterrows():
        print(
            f"  #{r['rank']:<4} {r['image_id']}: given {r['given_label']} p={r['p_given']:.3f}, suggested "
            f"{r['suggested_label']} p={r['p_suggested']:.3f}, quality {r['label_quality']:.3f}"
        )
    if res.precision_at_top is not None:
        print(
            f"known flipped labels among the top {min(args.top, len(res.table))}: {100 * res.precision_at_top:.1f}%"
        )
        if info.get("precision_at_flips") is not None:
            print(
                f"of the {info['flips']} flips, {100 * info['recall_at_flips']:.1f}% are among the worst "
                f"{info['flips']} labels; cleanlab's issues: precision "
                + ("n/a" if info["issues_precision"] is None else f"{100 * info['issues_precision']:.1f}%")
                + f", recall {100 * info['issues_recall']:.1f}%"
            )
    return 0
