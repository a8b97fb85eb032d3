"""Checkpoint -> verified ONNX model (+ ``<model>.json`` beside it).

Everything is built in a private temporary folder; ``out`` and its JSON are written (atomically) only
after the ONNX checker passed, batch sizes 1 and 37 ran, and the model agreed with PyTorch on real
validation images: on labelled images, top-1 and top-3 accuracy may drop by at most
``max_accuracy_drop`` points (without labels, the top-3 agreement must reach ``min_top3_agreement``).
int8 is calibrated on other images than those it is judged on, and when it loses too much, the most
sensitive layers (first conv, last layer) are kept in float and it is tried once more. A refused model
leaves nothing behind. The model also carries the same description in its ONNX ``metadata_props`` (key ``imat``), so
inference works from the ``.onnx`` file alone."""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import pandas as pd
import torch
from torch import nn

from imat.errors import ImatError
from imat.io import write_bytes, write_json
from imat.manifest import ClassMap
from submit.model import Preprocess, load_checkpoint
from submit.quantize import int8_scheme, preprocess, sensitive_nodes, to_fp16, to_int8
from submit.runtime import Runner, create_session
from submit.verify import accuracy_change, agreement

if TYPE_CHECKING:  # pydantic is not needed to export (benchmarks/gpu_check.py runs without it)
    from imat.config.stages import ExportConfig

log = logging.getLogger(__name__)

META_KEY = "imat"
DYNAMIC_BATCHES = (1, 37)


class ExportWrapper(nn.Module):
    """The network plus optional in-graph softmax and top-k.

    Outputs, in order: ``logits`` (or ``probs`` with softmax), then ``topk_scores`` and
    ``topk_indices`` (int64) when ``topk`` is set. The first output is always the full score vector."""

    def __init__(self, model: nn.Module, softmax: bool = False, topk: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.softmax = softmax
        self.topk = topk

    def forward(self, x: torch.Tensor) -> Any:
        scores = self.model(x)
        if self.softmax:
            scores = torch.softmax(scores, dim=1)
        if not self.topk:
            return scores
        values, indices = torch.topk(scores, self.topk, dim=1)
        return scores, values, indices

    def output_names(self) -> list[str]:
        first = "probs" if self.softmax else "logits"
        return [first, "topk_scores", "topk_indices"] if self.topk else [first]


# Weights above this are written as ONNX external data (``MODEL.onnx.data`` beside the model, which
# onnxruntime and onnx.load read from the same folder): protobuf cannot hold a message over 2 GB, which
# a pool of large teachers exceeds; smaller models stay one self-contained file.
EXTERNAL_DATA_BYTES = 1 << 30


def data_path(model: str | os.PathLike[str]) -> Path:
    """Where a model written by :func:`save_onnx` keeps its external weights, if it has any."""
    return Path(str(model) + ".data")


def _weight_bytes(proto: onnx.ModelProto) -> int:
    return sum(
        len(t.raw_data) or 4 * (len(t.float_data) + len(t.int32_data)) for t in proto.graph.initializer
    )


def save_onnx(proto: onnx.ModelProto, dst: str | os.PathLike[str]) -> None:
    """Write ``proto`` to ``dst`` (the model file replaced atomically), its weights as external data in
    :func:`data_path` when they exceed ``EXTERNAL_DATA_BYTES``. ``proto`` may lose its weights."""
    dst = Path(dst)
    data, tmp = data_path(dst), dst.with_name(dst.name + ".tmp")
    data.unlink(missing_ok=True)  # onnx appends to an existing external data file
    if _weight_bytes(proto) > EXTERNAL_DATA_BYTES:
        onnx.save_model(
            proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name
        )
    else:
        onnx.save_model(proto, str(tmp))
    os.replace(tmp, dst)


def copy_onnx(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """``src`` (and its external data, which is renamed for ``dst``) to ``dst``."""
    src, dst = Path(src), Path(dst)
    if data_path(src).is_file() or _has_external(src):
        save_onnx(onnx.load(str(src)), dst)
    else:
        write_bytes(dst, src.read_bytes())
        data_path(dst).unlink(missing_ok=True)


def _has_external(model: Path) -> bool:
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(model), load_external_data=False)
    return any(uses_external_data(t) for t in proto.graph.initializer)


def onnx_bytes(model: str | os.PathLike[str]) -> int:
    """The model file's size plus its external data's, if any."""
    data = data_path(model)
    return Path(model).stat().st_size + (data.stat().st_size if data.is_file() else 0)


@contextlib.contextmanager
def _quiet_loggers() -> Any:
    """The dynamo exporter's optimiser logs every pass at INFO; keep that out of imat's output."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_fp32(
    wrapper: ExportWrapper, input_size: int, dst: Path, opset: int, exporter: str = "auto"
) -> str:
    """Export ``wrapper`` with a symbolic batch dimension; returns the exporter that succeeded.

    ``auto`` tries torch's dynamo exporter (the default since torch 2.9) and falls back to the legacy
    TorchScript one, which timm ResNets also export cleanly with (``dynamic_axes``). Weights over
    ``EXTERNAL_DATA_BYTES`` are written as external data beside ``dst``."""
    example = torch.randn(2, 3, input_size, input_size)
    tensors = [*wrapper.parameters(), *wrapper.buffers()]
    large = sum(t.numel() * t.element_size() for t in tensors) > EXTERNAL_DATA_BYTES
    names = wrapper.output_names()
    errors: list[str] = []
    order = {"auto": ("dynamo", "legacy"), "dynamo": ("dynamo",), "legacy": ("legacy",)}[exporter]
    for kind in order:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_loggers():
                warnings.simplefilter("ignore")
                if kind == "dynamo":
                    torch.onnx.export(
                        wrapper,
                        (example,),
                        str(dst),
                        dynamo=True,
                        input_names=["input"],
                        output_names=names,
                        opset_version=max(opset, 18),
                        dynamic_shapes=({0: torch.export.Dim("batch")},),
                        external_data=large,
                        verbose=False,
                    )
                else:
                    torch.onnx.export(
                        wrapper,
                        (example,),
                        str(dst),
                        dynamo=False,
                        input_names=["input"],
                        output_names=names,
                        opset_version=opset,
                        dynamic_axes={n: {0: "batch"} for n in ["input", *names]},
                        external_data=large,
                    )
            return kind
        except Exception as exc:  # exporter failures come in many types; the next exporter may work
            errors.append(f"{kind}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            log.warning("ONNX export with the %s exporter failed: %s", kind, errors[-1])
    raise ImatError(f"ONNX export failed ({'; '.join(errors)})")


def load_batches(
    df: pd.DataFrame,
    prep: Preprocess,
    batch_size: int = 32,
    workers: int = 0,
    decoder: str = "cv2",
    desc: str | None = None,
) -> tuple[list[np.ndarray], list[int]]:
    """Pre-processed image batches (the eval transform of imat.data) and the row indices they hold;
    ``desc`` shows a progress bar with that name."""
    from tqdm.auto import tqdm

    from imat.data import ImageDataset, build_eval_transform, build_loader

    transform = build_eval_transform(prep.input_size, prep.mean, prep.std, prep.crop_pct)
    dataset = ImageDataset(df, None, transform, decoder)
    loader = build_loader(dataset, batch_size, shuffle=False, num_workers=workers)
    batches, rows = [], []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=desc is None, leave=False):
        batches.append(batch["image"].numpy().astype(np.float32, copy=False))
        rows.extend(int(i) for i in batch["index"])
    return batches, rows


def _torch_scores(wrapper: ExportWrapper, batches: list[np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        outs = []
        for b in batches:
            out = wrapper(torch.from_numpy(b))
            outs.append((out[0] if isinstance(out, tuple) else out).float().numpy())
    return np.concatenate(outs)


def _onnx_scores(runner: Runner, batches: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([runner(b)[0] for b in batches])


def _check_dynamic_batch(runner: Runner, sample: np.ndarray, num_classes: int) -> list[int]:
    for size in DYNAMIC_BATCHES:
        reps = -(-size // len(sample))
        batch = np.concatenate([sample] * reps)[:size]
        out = runner(batch)[0]
        if out.shape != (size, num_classes):
            raise ImatError(f"exported model returned shape {out.shape} for batch {size}")
    return list(DYNAMIC_BATCHES)


def known_labels(rows: pd.DataFrame, classes: ClassMap) -> np.ndarray:
    """Class index of each row in the checkpoint's class map (-1 when unknown): by ``source_label``
    when the rows carry one (a manifest of another run may number classes differently), else ``label``."""
    out = np.full(len(rows), -1, dtype=np.int64)
    sources = rows["source_label"].astype(str).to_numpy() if "source_label" in rows.columns else None
    labels = rows["label"].to_numpy() if "label" in rows.columns else np.full(len(rows), -1)
    for i in range(len(rows)):
        if sources is not None and sources[i]:
            try:
                out[i] = classes.to_index(sources[i])
            except ImatError:
                out[i] = -1
        elif 0 <= int(labels[i]) < classes.num_classes:
            out[i] = int(labels[i])
    return out


def model_description(
    prep: Preprocess,
    classes: ClassMap,
    meta: dict[str, Any],
    precision: str,
    wrapper: ExportWrapper,
    target: str = "cpu",
    int8: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What inference needs to know about the model; stored in the ONNX file and the JSON beside it.

    ``target`` is where the export meant it to run (``cpu`` | ``gpu``); ``int8`` the quantisation form."""
    return {
        "format": "imat-onnx/1",
        "arch": meta.get("arch"),
        "num_classes": classes.num_classes,
        **prep.to_dict(),
        "classes": classes.to_dict(),
        "precision": precision,
        "target": target,
        "int8": int8,
        "outputs": wrapper.output_names(),
        "softmax_in_graph": wrapper.softmax,
        "topk_in_graph": wrapper.topk,
        "input_name": "input",
        "input_layout": "NCHW float32, normalised (mean/std above), RGB",
    }


def export_model(
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    verify_df: pd.DataFrame,
    calib_df: pd.DataFrame | None = None,
    cfg: ExportConfig | None = None,
    workers: int = 0,
    decoder: str = "cv2",
    provider: str = "cpu",
    cpu_flags: set[str] | None = None,
    progress: bool = True,
    loaded: tuple[nn.Module, dict[str, Any], Preprocess, ClassMap] | None = None,
) -> dict[str, Any]:
    """Export ``ckpt`` to ``out`` at ``cfg.precision``, verify it, write ``out`` + ``out.json``.

    ``verify_df``/``calib_df`` are image lists (``image_id``, absolute ``path``) as from
    :func:`submit.inputs.read_images`; int8 calibrates on ``calib_df`` rows that are not verified
    (:func:`split_rows`). Rows with a known label give the accuracy of both models and its change,
    which :func:`judge` gates on. int8 takes the form of ``cfg.target`` (``cpu_flags``: the deployment
    CPU's features; default this machine's). Returns the report written to ``<out>.json``. Raises
    ImatError (writing nothing) when any step fails or the model is refused. ``progress``: bars.
    ``loaded``: an already built (model, meta, preprocessing, class map) to export instead of loading
    ``ckpt`` (a teacher pool as one model, :mod:`submit.pool_export`)."""
    if cfg is None:
        from imat.config.stages import ExportConfig

        cfg = ExportConfig()
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ImatError(f"--out must end in .onnx, got {out}")
    model, meta, prep, classes = loaded if loaded is not None else load_checkpoint(ckpt)
    wrapper = ExportWrapper(model, cfg.with_softmax, cfg.topk_in_graph).eval()
    if cfg.topk_in_graph and cfg.topk_in_graph > classes.num_classes:
        raise ImatError(f"topk_in_graph={cfg.topk_in_graph} exceeds the {classes.num_classes} classes")

    verify_rows, calib_rows, calib_source = split_rows(verify_df, calib_df, cfg)
    verify_batches, kept = load_batches(
        verify_rows, prep, workers=workers, decoder=decoder, desc="verification images" if progress else None
    )
    if not kept:
        raise ImatError("none of the verification images could be read")
    log.info("verifying on %d images", len(kept))
    labels = known_labels(verify_rows.iloc[kept].reset_index(drop=True), classes)
    k = min(3, classes.num_classes)

    with tempfile.TemporaryDirectory(prefix="imat-export-") as tmp_name:
        tmp = Path(tmp_name)
        fp32 = tmp / "fp32.onnx"
        exporter = export_fp32(wrapper, prep.input_size, fp32, cfg.opset, cfg.exporter)
        reference = _torch_scores(wrapper, verify_batches)
        final = tmp / "model.onnx"
        scheme, calib_batches, attempts = None, None, [list(cfg.exclude_nodes)]
        if cfg.precision == "int8":
            calib_batches, calib_kept = load_batches(
                calib_rows,
                prep,
                workers=workers,
                decoder=decoder,
                desc="calibration images" if progress else None,
            )
            scheme = int8_scheme(cfg.target, cpu_flags)
            log.info(
                "int8 (%s, for %s) calibration (%s) on %d images from %s",
                scheme.name,
                cfg.target,
                cfg.calibration_method,
                len(calib_kept),
                calib_source,
            )
            if cfg.float_fallback:
                sensitive = sensitive_nodes(preprocess(fp32, tmp / "preprocessed.onnx"))
                wider = list(dict.fromkeys([*cfg.exclude_nodes, *sensitive]))
                if wider != attempts[0]:
                    attempts.append(wider)
        for attempt, excluded in enumerate(attempts):
            if cfg.precision == "fp32":
                final = fp32
            elif cfg.precision == "fp16":
                to_fp16(fp32, final)
            else:
                to_int8(
                    fp32,
                    final,
                    calib_batches or [],
                    tmp,
                    cfg.calibration_method,
                    not cfg.quantize_head,
                    scheme,
                    excluded,
                )
            int8 = None
            if scheme is not None:
                int8 = {
                    **scheme.to_dict(),
                    "calibration_method": cfg.calibration_method,
                    "calibration_images": len(calib_kept),
                    "calibration_source": calib_source,
                    "excluded_nodes": excluded,
                    "float_fallback": attempt > 0,
                }
            description = model_description(prep, classes, meta, cfg.precision, wrapper, cfg.target, int8)
            proto = onnx.load(str(final))
            del proto.metadata_props[:]
            entry = proto.metadata_props.add()
            entry.key, entry.value = META_KEY, json.dumps(description)
            save_onnx(proto, final)
            del proto
            try:  # by path: the checker reads external data from beside the model
                onnx.checker.check_model(str(final), full_check=True)
            except Exception as exc:  # onnx raises ValidationError and shape inference errors
                raise ImatError(
                    f"exported model fails the ONNX checker: {str(exc).splitlines()[0]}"
                ) from None

            session, active = create_session(final, provider, description=description, warn_target=False)
            # An int8 model for the GPU checked on the CPU: onnxruntime's fused CPU int8 kernels sum
            # through 16-bit intermediates that saturate on a CPU without VNNI (the S8S8 form has no
            # reduce_range), which TensorRT's int32 accumulation never does. The unfused QDQ graph
            # (dequantize, float op, quantize) computes what the GPU computes, so that is what runs.
            unfused = scheme is not None and scheme.target == "gpu" and active == "cpu"
            if unfused:
                session, active = create_session(
                    final, "cpu", description=description, warn_target=False, optimize=False
                )
            runner = Runner(session, active)
            batches_run = _check_dynamic_batch(runner, verify_batches[0], classes.num_classes)
            candidate = _onnx_scores(runner, verify_batches)
            figures = agreement(reference, candidate, k=k)
            accuracy = accuracy_change(reference, candidate, labels, k=k)
            refusal = judge(figures, accuracy, cfg, k)
            if refusal is None or attempt == len(attempts) - 1:
                break
            log.warning("%s; retrying with %s in float", refusal, ", ".join(attempts[attempt + 1]))
        report = {
            **description,
            "checkpoint": str(Path(ckpt)),
            "exporter": exporter,
            "opset": max(cfg.opset, 18) if exporter == "dynamo" else cfg.opset,
            "dynamic_batch_checked": batches_run,
            "providers_tested": [active],
            "verification": {
                **figures,
                "compared": "first output (" + description["outputs"][0] + ") vs PyTorch eval mode",
                "max_abs_logit_diff": figures["max_abs_diff"] if cfg.precision == "fp32" else None,
                "max_accuracy_drop": cfg.max_accuracy_drop,
                "min_top3_agreement": cfg.min_top3_agreement,
                "judged_by": "accuracy" if accuracy else f"top-{k} agreement",
                "accuracy": accuracy,
                # how the int8 graph was run for this check (see above): fused CPU kernels or unfused QDQ
                "int8_graph": ("unfused QDQ" if unfused else "fused") if scheme is not None else None,
            },
            "size_bytes": onnx_bytes(final),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if refusal is not None:
            raise ImatError(f"{refusal}; not written to {out}. {_remedies(cfg, len(attempts) > 1)}")
        copy_onnx(final, out)
        report["size_bytes"] = onnx_bytes(out)
        write_json(sidecar_path(out), report)
    log.info(
        "wrote %s (%s, top-1 agreement %.4f, top-%d agreement %.4f)",
        out,
        cfg.precision,
        figures["top1_agreement"],
        k,
        figures[f"top{k}_agreement"],
    )
    return report


def split_rows(
    verify_df: pd.DataFrame, calib_df: pd.DataFrame | None, cfg: ExportConfig
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(verification rows, calibration rows, where calibration comes from): int8 is never calibrated
    on the images it is judged on. Calibration takes ``calib_df`` (train rows, or ``--calibration``)
    minus the verification images; without any, the verification list is split in two (with a warning)."""
    from submit.inputs import sample_rows

    verify_rows = sample_rows(verify_df, cfg.verify_images, seed=0)
    if cfg.precision != "int8":
        return verify_rows, verify_rows.iloc[:0], "none"
    judged = set(verify_rows["path"].astype(str))
    if calib_df is not None and len(calib_df):
        rest = calib_df[~calib_df["path"].astype(str).isin(judged)]
        if len(rest):
            return verify_rows, sample_rows(rest, cfg.calibration_images, seed=1), "calibration rows"
    rest = verify_df[~verify_df["path"].astype(str).isin(judged)]
    if len(rest):
        return verify_rows, sample_rows(rest, cfg.calibration_images, seed=1), "unverified rows"
    if len(verify_rows) < 2:
        raise ImatError("int8 needs calibration images apart from the verification ones: pass --calibration")
    shuffled = verify_rows.sample(frac=1.0, random_state=1)
    n_cal = min(cfg.calibration_images, len(shuffled) // 2)
    log.warning(
        "no calibration images apart from the %d verification images (pass --calibration DIR): "
        "calibrating on %d of them and verifying on the other %d",
        len(verify_rows),
        n_cal,
        len(shuffled) - n_cal,
    )
    return shuffled.iloc[n_cal:], shuffled.iloc[:n_cal], "half of the verification rows"


def judge(figures: dict[str, Any], accuracy: dict[str, Any] | None, cfg: ExportConfig, k: int) -> str | None:
    """None when the exported model may be written, else why not (one line). With labelled images it
    is judged on what the leaderboard sees, the change in top-1 and top-k accuracy (at most
    ``cfg.max_accuracy_drop`` points lost); a swap of the 3rd and 4th classes that changes neither is
    not a loss. Without labels, on the top-k agreement with PyTorch."""
    if accuracy:
        drops = {
            "top-1": -100 * accuracy["top1_accuracy_change"],
            f"top-{k}": -100 * accuracy[f"top{k}_accuracy_change"],
        }
        worst = max(drops.values())
        if worst > cfg.max_accuracy_drop + 1e-9:
            return (
                f"{cfg.precision} model loses {drops['top-1'] + 0:.2f} top-1 and {drops[f'top-{k}'] + 0:.2f} "
                f"top-{k} accuracy points on {accuracy['labelled_images']} labelled images "
                f"(> export.max_accuracy_drop={cfg.max_accuracy_drop})"
            )
        return None
    agree = figures[f"top{k}_agreement"]
    if agree < cfg.min_top3_agreement:
        return (
            f"{cfg.precision} model agrees with PyTorch on the top-{k} of only {agree:.2%} of "
            f"{figures['images']} unlabelled images (< {cfg.min_top3_agreement:.2%})"
        )
    return None


def _remedies(cfg: ExportConfig, fell_back: bool) -> str:
    if cfg.precision == "int8":
        tried = " (the first conv and last layer were already kept in float)" if fell_back else ""
        return (
            f"Try --calibration-method percentile or entropy (was {cfg.calibration_method}), more "
            f"--calibration-images, --exclude-nodes NODE{tried}, or fp16"
        )
    return "Try fp32, or a larger --max-accuracy-drop / --min-agreement below the measured value"


def sidecar_path(model: str | os.PathLike[str]) -> Path:
    """``student.onnx`` -> ``student.onnx.json``."""
    p = Path(model)
    return p.with_name(p.name + ".json")


def read_description(model: str | os.PathLike[str]) -> dict[str, Any]:
    """The model description: the JSON beside the model, else the ONNX ``metadata_props``."""
    p = Path(model)
    side = sidecar_path(p)
    if side.is_file():
        try:
            return json.loads(side.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ImatError(f"{side}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ImatError(f"{p}: not an ONNX model ({exc.__class__.__name__})") from None
    for entry in proto.metadata_props:
        if entry.key == META_KEY:
            return json.loads(entry.value)
    raise ImatError(
        f"{p}: no imat description (neither {side.name} nor ONNX metadata); export it with imat export"
    )
