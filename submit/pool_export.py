"""A teacher pool (or its greedy selection) -> one ONNX model that runs every teacher and averages them.

The graph takes one shared input: RGB in [0, 1] (mean 0, std 1 in the description, so ``imat predict``
prepares it like any model's input) at the largest member's input size, centre-cropped with the largest
member's ``crop_pct``. Inside the graph each teacher gets its own view: the centre crop its
``crop_pct`` asks for, bilinear resize to its own input size, its own mean/std. The members' softmax
probabilities are combined as ``imat teachers eval`` combines them (``mean``, or ``geomean``: the
renormalised mean of log-probabilities) and the graph returns the log of the result as its ``logits``:
softmax gives the ensemble's probabilities back exactly, so predict, in-graph softmax/top-k, fp16/int8
and the verification against PyTorch (:func:`submit.export.export_model`) treat it like one network.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from imat.errors import ImatError
from imat.manifest import ClassMap
from submit.model import Preprocess, class_map_from_meta
from teachers.ensemble import METHODS
from teachers.pool import TeacherEntry, load_pool, load_teacher, read_pool_json

if TYPE_CHECKING:
    from imat.config.stages import ExportConfig

log = logging.getLogger(__name__)

_EPS = 1e-12


def is_pool(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a teacher pool folder (it holds ``pool.json``)."""
    return Path(path).is_dir() and (Path(path) / "pool.json").is_file()


class PoolModel(nn.Module):
    """Every teacher on the shared input, each with its own crop, size and normalisation; returns the
    log of the combined probabilities (``mean`` or ``geomean``)."""

    def __init__(self, teachers: list[nn.Module], entries: list[TeacherEntry], method: str = "mean") -> None:
        super().__init__()
        if method not in METHODS:
            raise ImatError(f"unknown ensemble method {method!r} (use {' or '.join(METHODS)})")
        if not teachers or len(teachers) != len(entries):
            raise ImatError("a pool model needs one network per teacher entry")
        self.members = nn.ModuleList(teachers)
        self.method = method
        self.input_size = max(int(e.input_size) for e in entries)
        self.crop_pct = max(float(e.crop_pct) for e in entries)
        # per member: (centre-crop side in shared pixels, output size); mean/std as buffers
        self.views: list[tuple[int, int]] = []
        for i, e in enumerate(entries):
            side = round(self.input_size * float(e.crop_pct) / self.crop_pct)
            self.views.append((max(1, min(side, self.input_size)), int(e.input_size)))
            self.register_buffer(f"mean{i}", torch.tensor(e.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer(f"std{i}", torch.tensor(e.std, dtype=torch.float32).view(1, 3, 1, 1))

    def member_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        side, size = self.views[i]
        if side != self.input_size:
            top = (self.input_size - side) // 2
            x = x[:, :, top : top + side, top : top + side]
        if side != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return (x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logps = [
            torch.log_softmax(m(self.member_input(x, i)).float(), dim=1) for i, m in enumerate(self.members)
        ]
        # element-wise over the members (no Reduce* over a stacked axis): onnxruntime's symbolic shape
        # inference, which int8 quantisation runs, cannot type ReduceMax/ReduceLogSumExp with opset 18 axes
        if self.method == "geomean":
            return torch.log_softmax(sum(logps[1:], logps[0]) / len(logps), dim=1)
        top = logps[0]
        for lp in logps[1:]:
            top = torch.maximum(top, lp)
        total = sum((torch.exp(lp - top) for lp in logps[1:]), torch.exp(logps[0] - top))
        return top + torch.log(total) - math.log(len(logps))


def pool_members(pool_dir: str | os.PathLike[str], selected: bool = False) -> tuple[list[TeacherEntry], str]:
    """(teachers, ensemble method): all of ``pool.json``, or the greedy selection of the last
    ``imat teachers eval`` (``selected``) with the method it was chosen with."""
    data = read_pool_json(pool_dir)
    if not selected:
        return load_pool(pool_dir), "mean"
    chosen = data.get("selected") or {}
    if not chosen.get("teachers"):
        raise ImatError(
            f"{Path(pool_dir) / 'pool.json'}: no greedy selection recorded (run `imat teachers eval` first)"
        )
    return load_pool(pool_dir, list(chosen["teachers"])), str(chosen.get("method") or "mean")


def build_pool_model(
    pool_dir: str | os.PathLike[str], selected: bool = False, method: str | None = None
) -> tuple[PoolModel, dict[str, Any], Preprocess, ClassMap]:
    """(pool model in eval mode, its metadata, the shared input's preprocessing, the class map), the
    same four things :func:`submit.model.load_checkpoint` returns for one network."""
    from imat.weights import read_meta

    entries, recorded = pool_members(pool_dir, selected)
    method = method or recorded
    sizes = {e.num_classes for e in entries}
    if len(sizes) > 1:
        raise ImatError(f"{pool_dir}: teachers disagree on the class count ({sorted(sizes)})")
    classes = None
    for e in entries:
        meta = read_meta(e.weights_path) if e.weights_path.suffix == ".safetensors" else {}
        if meta.get("classes"):
            found = class_map_from_meta(meta, e.num_classes, str(e.weights_path))
            if classes is not None and found.source_labels != classes.source_labels:
                raise ImatError(f"{e.weights_path}: its class map differs from the other teachers'")
            classes = classes or found
    classes = classes or class_map_from_meta({}, entries[0].num_classes, str(pool_dir))
    model = PoolModel([load_teacher(e, "cpu") for e in entries], entries, method).eval()
    members = [e.name for e in entries]
    meta = {
        "arch": f"ensemble_{method}(" + ",".join(f"{e.arch}@{e.input_size}" for e in entries) + ")",
        "kind": "pool",
        "members": members,
        "method": method,
        "selected": selected,
    }
    prep = Preprocess(model.input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), model.crop_pct)
    return model, meta, prep, classes


def pool_params(model: PoolModel) -> int:
    return sum(p.numel() for p in model.parameters())


def export_pool(
    pool_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    verify_df: pd.DataFrame,
    calib_df: pd.DataFrame | None = None,
    cfg: ExportConfig | None = None,
    *,
    selected: bool = False,
    method: str | None = None,
    workers: int = 0,
    decoder: str = "cv2",
    provider: str = "cpu",
    cpu_flags: set[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Export the pool (or its greedy selection) to ``out`` as one ONNX model, verified against the
    PyTorch ensemble exactly as :func:`submit.export.export_model` verifies one network; the report
    (``out.json``) also names the members, the method and the parameter count."""
    from imat.io import write_json
    from submit.export import export_model, sidecar_path

    loaded = build_pool_model(pool_dir, selected, method)
    report = export_model(
        pool_dir,
        out,
        verify_df,
        calib_df,
        cfg,
        workers=workers,
        decoder=decoder,
        provider=provider,
        cpu_flags=cpu_flags,
        progress=progress,
        loaded=loaded,
    )
    model, meta = loaded[0], loaded[1]
    report["pool"] = {
        "members": meta["members"],
        "method": meta["method"],
        "selected": selected,
        "params": pool_params(model),
    }
    write_json(sidecar_path(out), report)
    return report
