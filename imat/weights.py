"""Weights meant for sharing: safetensors with the model's description in the file's metadata.

A ``best.safetensors`` written by imat carries, under the metadata key ``imat``, a JSON object with at
least ``arch``, ``num_classes``, ``input_size``, ``mean``, ``std``, ``crop_pct`` and ``model_kwargs``,
and where known ``classes`` (a ClassMap dict). With that, export and inference need no other file.
Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError as SafetensorsError
from safetensors.torch import load_file, save_file

from imat.errors import ImatError, require_file
from imat.io import write_with

META_KEY = "imat"


def save_weights(
    path: str | os.PathLike[str], state_dict: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Atomically write ``state_dict`` (made contiguous, detached, on CPU) with ``meta`` as metadata."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    # safetensors refuses tensors that share storage (tied weights); clone those.
    seen: set[int] = set()
    for key, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            tensors[key] = tensor.clone()
        seen.add(ptr)
    metadata = {META_KEY: json.dumps(meta)}
    return write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``imat`` metadata of a safetensors file ({} when it has none)."""
    from safetensors import safe_open

    p = require_file(path, "weights")
    try:
        with safe_open(str(p), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
    except (SafetensorsError, OSError, ValueError) as exc:
        raise ImatError(f"{p}: not a safetensors file ({exc})") from None
    return json.loads(raw) if raw else {}


def load_weights(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file: (state_dict on CPU, imat metadata)."""
    p = require_file(path, "weights")
    meta = read_meta(p)
    try:
        return load_file(str(p), device="cpu"), meta
    except (SafetensorsError, OSError, ValueError) as exc:
        raise ImatError(f"{p}: not a safetensors file ({exc})") from None
