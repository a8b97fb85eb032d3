"""``last.ckpt``: everything needed to resume, as tensors and plain Python values only.

The file is written with ``torch.save`` through :func:`imat.io.atomic_path` (temp + fsync + rename), so
a killed run leaves the previous checkpoint intact, and it loads with ``torch.load(weights_only=True)``:
nothing is unpickled. RNG states are converted to tensors and lists for that reason.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imat.errors import ImatError, require_file
from imat.io import atomic_path

FORMAT = "imat.engine/1"


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream named by ``(seed, *keys)``, e.g. ``(seed, rank, epoch)``.

    numpy's ``SeedSequence`` hashes the tuple, so neighbouring keys give unrelated streams (``seed +
    rank`` would make rank 1 of seed 0 replay rank 0 of seed 1)."""
    words = np.random.SeedSequence([int(seed) % 2**63, *(int(k) for k in keys)]).generate_state(2, np.uint64)
    return int(words[0] >> np.uint64(1))


def rank_epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of rank ``rank``'s own random streams in ``epoch`` (augmentation, dropout, drop-path,
    mixup, loader workers): different on every rank, a pure function of the three for exact resume."""
    return derive_seed(seed, 0x52414E4B, rank, epoch)  # 0x52414E4B: a tag, so no other use collides


def get_rng_state() -> dict[str, Any]:
    """All global RNG states in a ``weights_only``-loadable form."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [int(version), list(internal), gauss],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA states only if the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["gauss"]),
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Atomically ``torch.save`` ``state`` (tagged with the format version) to ``path``."""
    payload = {"format": FORMAT, **state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load an imat checkpoint with ``weights_only=True`` on the CPU; one-line ImatError otherwise."""
    p = require_file(path, "checkpoint")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImatError(f"{p}: not a readable imat checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ImatError(f"{p}: not an imat engine checkpoint (expected format {FORMAT})")
    return state


def load_module_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Strictly load ``state`` into ``module``; a key or shape mismatch is a one-line ImatError
    naming the file (a checkpoint from another model or class count)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[0]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) e.g. {shapes[0]} (checkpoint vs model)")
        raise ImatError(f"{path}: checkpoint does not match {name!r} (another model?): {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)
