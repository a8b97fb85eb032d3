"""``imat predict MODEL INPUT --out predictions.parquet``: batched onnxruntime top-k inference.

INPUT is a folder of images, a manifest Parquet or a competition file whose images are under
``--images``. The provider is chosen explicitly (``auto`` = the best that really initialises) and
recorded in the output's metadata."""

from __future__ import annotations

import argparse

from imat.data.decode import DEFAULT_MAX_PIXELS
from submit.commands._common import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="an .onnx written by imat export")
    parser.add_argument(
        "input", metavar="INPUT", help="folder of images, manifest .parquet, or competition file"
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="predictions .parquet to write")
    parser.add_argument("--images", metavar="DIR", help="images folder of a competition file or manifest")
    parser.add_argument("--split", default=None, help="manifest/competition split to predict (default: test)")
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda", "tensorrt"), default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--tta-flip", action="store_true", help="mean of the probabilities of image and mirror"
    )
    parser.add_argument(
        "--tta-scales",
        default=None,
        metavar="S,S",
        help="also resize-then-centre-crop at these scales (1.0,1.15); mean of the probabilities",
    )
    parser.add_argument("--workers", type=int, default=2, help="decoding/preprocessing worker processes")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--save-probs", action="store_true", help="store every class probability (prior correction)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--ray",
        action="store_true",
        help="run over Ray Data: one onnxruntime session per actor (same output)",
    )
    parser.add_argument(
        "--address", default=None, help="with --ray: Ray cluster (default RAY_ADDRESS or local)"
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="larger images (by their header) are not decoded: fallback rows (default %(default)s)",
    )
    parser.add_argument(
        "--actors",
        type=int,
        default=None,
        help="with --ray: inference actors (default: one per GPU of the cluster, else CPU actors of "
        "--threads cores, up to 4 each)",
    )


def run(args: argparse.Namespace) -> int:
    setup_logging()
    from pathlib import Path

    from submit.predict import predict

    split = args.split
    if split is None and Path(args.input).suffix.lower() != ".parquet" and not Path(args.input).is_dir():
        split = "test"
    if args.ray:
        from submit.ray_predict import ray_predict

        frame = ray_predict(
            args.model,
            args.input,
            args.out,
            images=args.images,
            split=split,
            topk=args.topk,
            provider=args.provider,
            batch_size=args.batch_size,
            tta_flip=args.tta_flip,
            tta_scales=args.tta_scales,
            save_probs=args.save_probs,
            threads=args.threads,
            actors=args.actors,
            address=args.address,
            max_pixels=args.max_pixels,
        )
    else:
        frame = predict(
            args.model,
            args.input,
            args.out,
            images=args.images,
            split=split,
            topk=args.topk,
            provider=args.provider,
            batch_size=args.batch_size,
            tta_flip=args.tta_flip,
            tta_scales=args.tta_scales,
            workers=args.workers,
            save_probs=args.save_probs,
            threads=args.threads,
            progress=not args.no_progress,
            max_pixels=args.max_pixels,
        )
    info = frame.attrs["imat"]
    large = f", {info['too_large']} of them too large" if info.get("too_large") else ""
    print(
        f"wrote {args.out}: {info['images']} images ({info['missing']} missing{large}: fallback rows), "
        f"top-{info['topk']}, provider {info['provider']}"
        + (f", TTA {info['tta']['label']}" if info["tta"]["views"] > 1 else "")
    )
    return 0
