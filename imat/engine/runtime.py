"""Where and how a step runs: device and precision choice, rank, moving batches, reading batch fields."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from imat.errors import ImatError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a one-line error."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ImatError("device=cuda but no CUDA device is available (use device=auto or cpu)")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None = fp32).

    fp16 needs a GradScaler and is CUDA-only here: on a CPU it falls back to bf16 with a warning, so a
    GPU recipe still runs (slowly) on a laptop instead of failing. bf16 on a GPU without bf16 support
    falls back to fp16 likewise.
    """
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        warnings.warn("precision=fp16 needs CUDA; using bf16 autocast on the CPU instead", stacklevel=3)
        return torch.bfloat16
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU has no bf16 support; using fp16 with a GradScaler instead", stacklevel=3)
        return torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def is_main_process() -> bool:
    """Rank 0 of a torch.distributed job, or True when not distributed: only it writes files."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def move_to_device(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move every tensor inside dicts/lists/tuples to ``device``; 4-D float tensors become
    channels-last when asked."""
    if isinstance(obj, torch.Tensor):
        out = obj.to(device, non_blocking=True)
        if channels_last and out.ndim == 4 and out.is_floating_point():
            out = out.contiguous(memory_format=torch.channels_last)
        return out
    if isinstance(obj, Mapping):
        return {k: move_to_device(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(move_to_device(v, device, channels_last) for v in obj)
    return obj


def as_dict_batch(batch: Any) -> dict[str, Any]:
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, list | tuple) and len(batch) == 2:  # (images, labels), for quick experiments
        return {"image": batch[0], "label": batch[1], "skipped": 0}
    raise ImatError(
        f"a training batch must be a dict with image/label (or an (images, labels) pair), got {type(batch).__name__}"
    )


def batch_size_of(batch: dict[str, Any]) -> int:
    for key in ("label", "image"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.ndim:
            return int(value.shape[0])
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim:
            return int(value.shape[0])
    return 0


def skipped_in(batch: dict[str, Any]) -> int:
    value = batch.get("skipped", 0)
    return int(value.sum().item()) if isinstance(value, torch.Tensor) else int(value or 0)
