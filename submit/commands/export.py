"""``imat export CKPT --out student.onnx``: ONNX export, checked and verified against PyTorch.

Verification (and int8 calibration) needs real images: ``--images`` (a folder, or a manifest whose
``val`` rows verify and ``train`` rows calibrate) or ``--config`` (its run's manifest, else its
``data.val``/``data.train`` files with ``data.images``). Settings come from the config's ``export``
section, then from the flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from imat.errors import ImatError
from submit.commands._common import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", metavar="CKPT", help="best.safetensors written by imat (weights + metadata)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the .onnx to write (plus FILE.json)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None)
    parser.add_argument("--config", metavar="CONFIG", help="run config: export section and image lists")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="k=v",
        help="config overrides, right after CKPT (export.precision=int8)",
    )
    parser.add_argument(
        "--images",
        metavar="DIR_OR_MANIFEST",
        help="verification (and calibration) images: folder or manifest",
    )
    parser.add_argument("--images-root", metavar="DIR", help="root of a manifest's relative paths")
    parser.add_argument(
        "--calibration", metavar="DIR_OR_MANIFEST", help="int8 calibration images (default: train rows)"
    )
    parser.add_argument(
        "--min-agreement", type=float, default=None, help="refuse below this top-3 agreement (0.99)"
    )
    parser.add_argument("--softmax", action="store_true", default=None, help="softmax inside the graph")
    parser.add_argument(
        "--topk-in-graph", type=int, default=None, metavar="K", help="top-k outputs in the graph"
    )
    parser.add_argument("--exporter", choices=("auto", "dynamo", "legacy"), default=None)
    parser.add_argument("--opset", type=int, default=None)
    parser.add_argument("--verify-images", type=int, default=None, metavar="N")
    parser.add_argument("--calibration-images", type=int, default=None, metavar="N")
    parser.add_argument("--workers", type=int, default=None, help="image decoding workers")


def _manifest_split(path: Path, root: str | None, split: str) -> pd.DataFrame:
    from submit.inputs import read_images

    df = pd.read_parquet(path, columns=None)
    if "split" in df.columns and (df["split"].astype(str) == split).any():
        return read_images(path, root, split)
    return read_images(path, root)


def _sources(args: argparse.Namespace, cfg: object) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(verification rows, calibration rows or None)."""
    from submit.inputs import read_images

    data = getattr(cfg, "data", None)
    root = args.images_root or (data.images if data is not None else None)
    if args.images:
        src = Path(args.images)
        if src.suffix.lower() == ".parquet" and src.is_file():
            verify, calib = _manifest_split(src, root, "val"), _manifest_split(src, root, "train")
        else:
            verify = read_images(src, root, "val")
            calib = None
    elif cfg is not None and data is not None:
        manifest = cfg.manifest_path  # type: ignore[attr-defined]
        if manifest.is_file():
            verify, calib = _manifest_split(manifest, root, "val"), _manifest_split(manifest, root, "train")
        elif data.val or data.train:
            verify = read_images(data.val or data.train, root, "val" if data.val else "train")
            calib = read_images(data.train, root, "train") if data.train else None
        else:
            raise ImatError("the config has no data.val or data.train to verify the export on")
    else:
        raise ImatError("export verifies on real images: pass --images DIR_OR_MANIFEST or --config CONFIG")
    if args.calibration:
        cal = Path(args.calibration)
        calib = (
            _manifest_split(cal, root, "train")
            if cal.suffix.lower() == ".parquet"
            else read_images(cal, root)
        )
    return verify, calib


def run(args: argparse.Namespace) -> int:
    setup_logging()
    from pydantic import ValidationError

    from imat.config import ExportConfig, load_config
    from imat.config.loader import format_validation_error
    from submit.export import export_model, sidecar_path

    if args.overrides and not args.config:
        raise ImatError("k=v overrides need --config")
    cfg = load_config(args.config, args.overrides) if args.config else None
    export_cfg = cfg.export if cfg is not None else ExportConfig()
    updates = {
        "precision": args.precision,
        "min_top3_agreement": args.min_agreement,
        "with_softmax": args.softmax,
        "topk_in_graph": args.topk_in_graph,
        "exporter": args.exporter,
        "opset": args.opset,
        "verify_images": args.verify_images,
        "calibration_images": args.calibration_images,
    }
    raw = export_cfg.model_dump()
    raw.update({k: v for k, v in updates.items() if v is not None})
    try:
        export_cfg = ExportConfig.model_validate(raw)
    except ValidationError as exc:
        raise ImatError(format_validation_error("export options", exc)) from None
    workers = args.workers if args.workers is not None else (cfg.data.num_workers if cfg is not None else 2)
    decoder = cfg.data.decoder if cfg is not None else "cv2"
    verify, calib = _sources(args, cfg)
    report = export_model(args.ckpt, args.out, verify, calib, export_cfg, workers=workers, decoder=decoder)
    v = report["verification"]
    diff = f", max |logit diff| {v['max_abs_diff']:.2e}" if export_cfg.precision == "fp32" else ""
    print(
        f"wrote {args.out} ({export_cfg.precision}, {report['exporter']} exporter, {report['size_bytes'] / 1e6:.1f} MB): "
        f"top-1 agreement {v['top1_agreement']:.4f}, top-3 agreement {v['top3_agreement']:.4f} "
        f"on {v['images']} images{diff}; details in {sidecar_path(args.out)}"
    )
    return 0
