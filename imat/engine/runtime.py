"""Where and how a step runs: device and precision choice, rank, moving batches, reading batch fields."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
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


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: AVX512-BF16 or AMX on x86. Without them (AVX2-only
    x86) oneDNN emulates bf16 and a training step runs several times slower than in fp32 (5.3x for a
    ResNet-18 at 32 px on an AVX2 EPYC, docs/BENCHMARKS.md). Other architectures are trusted."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(p is None for p in probes):  # a torch without the probes: keep what was asked for
        return True
    return any(bool(p()) for p in probes if p is not None)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None = fp32).

    fp16 needs a GradScaler and is CUDA-only here: on a CPU it falls back to bf16 with a warning, so a
    GPU recipe still runs (slowly) on a laptop instead of failing. bf16 on a GPU without bf16 support
    falls back to fp16 likewise, and bf16 on a CPU without bf16 hardware (:func:`cpu_has_fast_bf16`)
    to fp32: emulated bf16 would only make the same recipe several times slower.
    """
    if precision == "fp32":
        return None
    if device.type != "cuda" and not cpu_has_fast_bf16():
        warnings.warn(
            f"precision={precision}: this CPU has no bf16 hardware (AVX512-BF16 or AMX), where autocast "
            "is several times slower than fp32; using fp32",
            stacklevel=3,
        )
        return None
    if precision == "fp16" and device.type != "cuda":
        warnings.warn("precision=fp16 needs CUDA; using bf16 autocast on the CPU instead", stacklevel=3)
        return torch.bfloat16
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU has no bf16 support; using fp16 with a GradScaler instead", stacklevel=3)
        return torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def configure_cuda(device: torch.device) -> bool:
    """On a GPU: cuDNN autotuning (``benchmark``: fixed input sizes are the norm here, so the fastest
    convolution algorithm is searched once per shape) and TF32 for float32 matmuls and convolutions
    (Ampere and later; the 10-bit mantissa is well inside SGD's noise). Returns whether it set them."""
    if device.type != "cuda":
        return False
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def normalize_on_device(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], channels_last: bool = False
) -> torch.Tensor:
    """uint8 N x C x H x W images (already on their device) -> float32 ``(x - 255 mean) / (255 std)``,
    what albumentations' ``Normalize`` computes on the CPU. A uint8 batch is a quarter of a float one
    to copy to the GPU; the normalisation there is one fused elementwise op."""
    if images.dtype != torch.uint8:
        raise ImatError(f"device normalisation expects uint8 images, got {images.dtype}")
    m = torch.tensor([255.0 * float(v) for v in mean], device=images.device).view(1, -1, 1, 1)
    s = torch.tensor([255.0 * float(v) for v in std], device=images.device).view(1, -1, 1, 1)
    out = (images.float() - m) / s
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def batch_to_device(
    batch: dict[str, Any],
    device: torch.device,
    channels_last: bool = False,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
) -> dict[str, Any]:
    """:func:`move_to_device` for a batch dict; a uint8 ``image`` is normalised on the device with
    ``normalize = (mean, std)`` (loaders built with ``device_normalize``, see imat.data.recipe). A batch
    of encoded JPEGs (``data.decode: gpu``) is decoded and cropped on the device first."""
    if batch.get("decode") is not None:  # data.decode: gpu - JPEG bytes, decoded and cropped on the device
        from imat.data.device_decode import ENCODED_KEYS, decode_on_device

        rest = {k: v for k, v in batch.items() if k not in ENCODED_KEYS}
        out = decode_on_device(
            {**move_to_device(rest, device), **{k: batch[k] for k in ENCODED_KEYS}}, device
        )
    else:
        out = move_to_device(batch, device, channels_last)
    image = out.get("image")
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
        if normalize is None:
            raise ImatError("a batch of uint8 images came from a loader without device_normalize (mean, std)")
        out["image"] = normalize_on_device(image, normalize[0], normalize[1], channels_last)
    return out


def is_main_process() -> bool:
    """Rank 0 of a torch.distributed job, or True when not distributed: only it writes files."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def is_main_rank() -> bool:
    """Rank 0 (or not distributed). Checked before the engine joins the process group too, through
    torchrun's RANK variable, so only one process writes the manifest, configs and pool.json."""
    return is_main_process() and int(os.environ.get("RANK", "0") or 0) == 0


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
