"""``imat export CKPT --out student.onnx``: ONNX export, checked and verified against PyTorch.

CKPT may also be a teacher pool folder (``RUN_DIR/teachers``, with its ``pool.json``): the whole pool,
or its greedy selection with ``--selected``, becomes one ONNX model that runs every teacher on the same
image and averages their probabilities (:mod:`submit.pool_export`).

Verification (and int8 calibration) needs real images: ``--images`` (a folder, or a manifest whose
``val`` rows verify and ``train`` rows calibrate) or ``--config`` (its run's manifest, else its
``data.val``/``data.train`` files with ``data.images``). Without either, the checkpoint's own run
supplies them: the ``config.yaml`` imat wrote beside it (``RUN_DIR/student/config.yaml``) or one folder
up (``RUN_DIR/config.yaml``). Settings come from that config's ``export`` section, then from the flags."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from imat.cli_options import add_progress_argument
from imat.errors import ImatError
from submit.commands._common import setup_logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ckpt",
        metavar="CKPT",
        help="best.safetensors written by imat (weights + metadata), or a teacher pool folder",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="the .onnx to write (plus FILE.json)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None)
    parser.add_argument(
        "--target",
        choices=("cpu", "gpu"),
        default=None,
        help="where the model will run: int8 U8S8 for the CPU provider, symmetric S8S8 for TensorRT/CUDA",
    )
    parser.add_argument(
        "--config",
        metavar="CONFIG",
        help="run config (default: the config.yaml beside CKPT or one folder up)",
    )
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
        "--calibration-method",
        choices=("minmax", "percentile", "entropy"),
        default=None,
        help="int8 calibration: minmax (default), percentile (clips outliers) or entropy",
    )
    parser.add_argument(
        "--exclude-nodes",
        metavar="NODE[,NODE]",
        default=None,
        help="int8: nodes kept in float (names in the pre-processed graph, e.g. /model/conv1/conv1.0/Conv)",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=None,
        metavar="POINTS",
        help="refuse when top-1 or top-3 accuracy on labelled images drops by more (0.5 points)",
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        help="without labelled images: refuse below this top-3 agreement (0.99)",
    )
    parser.add_argument(
        "--cpu-flags",
        metavar="FLAGS_OR_CPUINFO",
        default=None,
        help="int8 --target cpu: the deployment CPU's flags (avx2,avx512_vnni) or a copy of its "
        "/proc/cpuinfo, when it is not this machine (decides reduce_range)",
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
    parser.add_argument(
        "--selected",
        action="store_true",
        help="pool: only the teachers of its greedy selection (imat teachers eval)",
    )
    parser.add_argument(
        "--method",
        choices=("mean", "geomean"),
        default=None,
        help="pool: how the probabilities are combined (default mean, or the selection's)",
    )
    add_progress_argument(parser)


def _manifest_split(path: Path, root: str | None, split: str) -> pd.DataFrame:
    from submit.inputs import read_images

    df = pd.read_parquet(path, columns=None)
    if "split" in df.columns and (df["split"].astype(str) == split).any():
        return read_images(path, root, split)
    return read_images(path, root)


def run_config_of(ckpt: str | Path) -> Path | None:
    """The config.yaml imat wrote with the checkpoint: beside it, else one folder up (the run dir)."""
    here = Path(ckpt).resolve().parent
    for folder in (here, here.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def _rebase_run_dir(cfg: Any, config_path: Path, ckpt: str | Path) -> Any:
    """A run's config may hold a relative ``run_dir`` written from another working directory: when its
    manifest is not there, use the run folder the checkpoint is in (the one that has ``data/manifest``)."""
    if cfg.manifest_path.is_file():
        return cfg
    for folder in (config_path.parent, Path(ckpt).resolve().parent.parent):
        if (folder / "data" / "manifest.parquet").is_file():
            return cfg.model_copy(update={"run_dir": str(folder)})
    return cfg


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
        raise ImatError(
            f"export verifies on real images: no config.yaml beside {args.ckpt} or one folder up; "
            "pass --images DIR_OR_MANIFEST or --config CONFIG"
        )
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
    from submit.pool_export import export_pool, is_pool

    pool = is_pool(args.ckpt)
    if not pool and (args.selected or args.method):
        raise ImatError(f"--selected and --method are for a teacher pool folder; {args.ckpt} is not one")
    config_path = Path(args.config) if args.config else run_config_of(args.ckpt)
    if args.overrides and config_path is None:
        raise ImatError("k=v overrides need --config")
    cfg = load_config(config_path, args.overrides) if config_path is not None else None
    if cfg is not None and not args.config:
        cfg = _rebase_run_dir(cfg, config_path, args.ckpt)  # type: ignore[arg-type]
        log.info("export: settings and images from the checkpoint's run config %s", config_path)
    export_cfg = cfg.export if cfg is not None else ExportConfig()
    updates = {
        "precision": args.precision,
        "target": args.target,
        "min_top3_agreement": args.min_agreement,
        "max_accuracy_drop": args.max_accuracy_drop,
        "calibration_method": args.calibration_method,
        "exclude_nodes": [n for n in args.exclude_nodes.split(",") if n] if args.exclude_nodes else None,
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
    if pool and cfg is None and not args.images:
        from teachers.evaluate import pool_data

        # a pool without its run's config: the manifest and images pool.json recorded
        manifest, recorded_images, decoder = pool_data(args.ckpt)
        args.images, args.images_root = str(manifest), args.images_root or recorded_images
    verify, calib = _sources(args, cfg)
    flags = None
    if args.cpu_flags:
        from submit.quantize import parse_cpu_flags

        flags = parse_cpu_flags(args.cpu_flags)
    if pool:
        report = export_pool(
            args.ckpt,
            args.out,
            verify,
            calib,
            export_cfg,
            selected=args.selected,
            method=args.method,
            workers=workers,
            decoder=decoder,
            cpu_flags=flags,
            progress=not args.no_progress,
        )
    else:
        report = export_model(
            args.ckpt,
            args.out,
            verify,
            calib,
            export_cfg,
            workers=workers,
            decoder=decoder,
            cpu_flags=flags,
            progress=not args.no_progress,
        )
    v = report["verification"]
    diff = f", max |logit diff| {v['max_abs_diff']:.2e}" if export_cfg.precision == "fp32" else ""
    form = f" {report['int8']['name']} for {export_cfg.target}" if report.get("int8") else ""
    acc = v.get("accuracy")
    change = ""
    if acc:
        change = (
            f"; top-1 accuracy {acc['reference_top1_accuracy']:.4f} -> {acc['candidate_top1_accuracy']:.4f}"
        )
        if "candidate_top3_accuracy" in acc:
            change += f", top-3 {acc['reference_top3_accuracy']:.4f} -> {acc['candidate_top3_accuracy']:.4f}"
        change += f" on {acc['labelled_images']} labelled images"
    members = report.get("pool")
    what = f"pool of {len(members['members'])} ({members['method']}), " if members else ""
    print(
        f"wrote {args.out} ({what}{export_cfg.precision}{form}, {report['exporter']} exporter, "
        f"{report['size_bytes'] / 1e6:.1f} MB): "
        f"top-1 agreement {v['top1_agreement']:.4f}, top-3 agreement {v.get('top3_agreement', 1.0):.4f} "
        f"on {v['images']} images{diff}{change}; details in {sidecar_path(args.out)}"
    )
    return 0
