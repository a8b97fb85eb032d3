"""`imat data download JSON --out DIR`: fetch the images of a URL-only competition file (resumable).

Run it again to retry what failed; files already on disk are never requested twice. The per-image
outcome is in ``DIR/download_status.csv``.
"""

from __future__ import annotations

import argparse

from imat.errors import ImatError, require_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "json", metavar="JSON", help="competition file with image URLs (train/validation/test)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder the images are written to")
    parser.add_argument(
        "--split",
        choices=["train", "val", "test"],
        default="test",
        help="read JSON as this split (default test: labels are not needed to download, so none are required)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="only the first N images (a trial run)"
    )
    parser.add_argument("--workers", type=int, default=32, help="concurrent downloads (default 32)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="read timeout in seconds (default 30)"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="connect timeout in seconds (default 10)",
    )
    parser.add_argument(
        "--retries", type=int, default=3, help="extra attempts on transient failures (default 3)"
    )
    parser.add_argument(
        "--max-side",
        type=int,
        default=None,
        metavar="PX",
        help="shrink so the longer side is <= PX (default: keep)",
    )
    parser.add_argument(
        "--max-bytes", type=int, default=20 * 1024 * 1024, help="largest body read per image (default 20 MiB)"
    )
    parser.add_argument(
        "--quality", type=int, default=90, help="JPEG quality of the written files (default 90)"
    )
    parser.add_argument(
        "--min-side", type=int, default=16, metavar="PX", help="smaller images are placeholders (default 16)"
    )
    parser.add_argument(
        "--placeholder-repeats",
        type=int,
        default=3,
        metavar="N",
        help="identical bytes from N distinct URLs are a placeholder (default 3, 0: off)",
    )
    parser.add_argument("--skip-failed", action="store_true", help="do not retry images that failed before")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from imat.download import DownloadConfig, download

    path = require_file(args.json, "competition file")
    cfg = DownloadConfig(
        workers=args.workers,
        connect_timeout=args.connect_timeout,
        read_timeout=args.timeout,
        retries=args.retries,
        max_bytes=args.max_bytes,
        max_side=args.max_side,
        quality=args.quality,
        min_side=args.min_side,
        placeholder_repeats=args.placeholder_repeats,
        limit=args.limit,
        skip_failed=args.skip_failed,
        progress=not args.no_progress,
    )
    from imat.formats import read_split

    try:
        df = read_split(path, args.split)
    except ImatError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImatError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if "url" not in df.columns or not df["url"].fillna("").astype(str).str.strip().ne("").any():
        raise ImatError(f"{path} has no image URLs to download")
    report = download(df, args.out, cfg)
    print(report.format())
    counts = report.counts
    # Nothing usable and something was tried: a script should notice (wrong file, no network).
    return 1 if counts.get("failed", 0) and not counts.get("ok", 0) and not counts.get("skipped", 0) else 0
