"""Build timm networks from a ModelSpec and load weights into them with strict, one-line errors.

Every network in imat (teachers and the student) is a timm model created with ``pretrained=False``:
nothing is downloaded unless a user explicitly asks for ``pretrained: hub``. Weights come from local
files: imat's own ``best.safetensors``, timm's safetensors, or torch/timm/torchvision state dicts read
with ``torch.load(weights_only=True)`` (never full pickle).
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imat.config.models import ModelSpec
from imat.errors import ImatError, require_file

log = logging.getLogger(__name__)

# What torchvision/timm/lightning checkpoints wrap their weights in, and prefixes added by wrappers
# (DataParallel/DDP: "module.", torch.compile: "_orig_mod.").
_STATE_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")


def _timm() -> Any:
    import timm

    return timm


def check_arch(arch: str) -> None:
    """Raise a one-line ImatError for a name timm does not know, suggesting close names."""
    timm = _timm()
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise ImatError(f"unknown model {arch!r}: timm has no such architecture{hint}")


def create_model(spec: ModelSpec, num_classes: int, *, load_weights: bool = True) -> nn.Module:
    """A timm network for ``spec`` with a ``num_classes``-way head.

    ``spec.pretrained`` (a local file, or ``"hub"`` for users who are online) is loaded when
    ``load_weights`` is true; a head whose only difference is the class count is re-initialised."""
    check_arch(spec.arch)
    if num_classes < 1:
        raise ImatError(f"model {spec.arch}: num_classes must be >= 1, got {num_classes}")
    hub = load_weights and spec.pretrained == "hub"
    kwargs = dict(spec.model_kwargs)
    try:
        model = _timm().create_model(
            spec.arch,
            pretrained=hub,
            num_classes=num_classes,
            drop_rate=spec.drop_rate,
            drop_path_rate=spec.drop_path_rate,
            **kwargs,
        )
    except TypeError as exc:
        # timm passes unknown kwargs down to the model's constructor, which raises TypeError.
        raise ImatError(f"model {spec.arch}: bad model_kwargs {kwargs} ({exc})") from None
    if load_weights and spec.pretrained and not hub:
        load_pretrained(model, spec.pretrained)
    return model


def resolve_data_config(spec: ModelSpec) -> dict[str, Any]:
    """The input pipeline a network expects: input_size, mean, std, crop_pct.

    What the spec sets wins; what it leaves None comes from timm's pretrained_cfg of the arch (ImageNet
    statistics for almost every arch), so a teacher is always evaluated the way it was trained."""
    check_arch(spec.arch)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.arch)
    default_mean = tuple(cfg.mean) if cfg is not None else (0.485, 0.456, 0.406)
    default_std = tuple(cfg.std) if cfg is not None else (0.229, 0.224, 0.225)
    default_crop = float(cfg.crop_pct) if cfg is not None else 0.875
    default_size = int(cfg.input_size[-1]) if cfg is not None else 224
    input_size = getattr(spec, "input_size", None)
    crop_pct = getattr(spec, "crop_pct", None)
    return {
        "input_size": int(input_size) if input_size is not None else default_size,
        "mean": [float(x) for x in (spec.mean if spec.mean is not None else default_mean)],
        "std": [float(x) for x in (spec.std if spec.std is not None else default_std)],
        "crop_pct": float(crop_pct) if crop_pct is not None else default_crop,
    }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    head = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if head is None:
        return ()
    names = (head,) if isinstance(head, str) else tuple(head)
    return tuple(f"{n}." for n in names)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Weights of a local file as a flat ``name -> tensor`` dict, whatever wrapped them.

    ``.safetensors`` is read as such; anything else with ``torch.load(weights_only=True)``, taking a raw
    state dict or one under ``state_dict``/``model``/... and stripping ``module.``/``_orig_mod.``."""
    p = require_file(path, "weights")
    if p.suffix == ".safetensors":
        from imat.weights import load_weights

        state, _ = load_weights(p)
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle/zip errors have many types
            msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise ImatError(f"{p}: not a loadable weights file ({msg[:200]})") from None
        state = _unwrap(obj, p)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ImatError(f"{p}: holds no tensors")
    return _strip_prefixes(tensors)


def _unwrap(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise ImatError(f"{path}: expected a state dict, got a {type(obj).__name__}")
    for key in _STATE_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    return dict(obj)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _first(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, *, allow_head_mismatch: bool
) -> list[str]:
    """Compare ``state`` with the model's own keys and shapes; raise one line on the first problems.

    Returns the head keys to skip: those of the classifier whose shapes differ only in the class count
    (allowed when ``allow_head_mismatch``: fine-tuning ImageNet weights on a competition)."""
    own = model.state_dict()
    heads = _head_prefixes(model)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shape: list[str] = []
    skip: list[str] = []
    for key, value in state.items():
        if key not in own or tuple(own[key].shape) == tuple(value.shape):
            continue
        target = tuple(own[key].shape)
        got = tuple(value.shape)
        is_head = any(key.startswith(h) for h in heads)
        if allow_head_mismatch and is_head and len(got) == len(target) and got[1:] == target[1:]:
            skip.append(key)
        else:
            bad_shape.append(f"{key} {list(got)} vs model {list(target)}")
    if bad_shape:
        raise ImatError(f"{source}: shape mismatch for {_first(bad_shape)}: weights are from another model")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_first(unexpected)}")
        raise ImatError(f"{source}: {'; '.join(parts)}: weights are from another model")
    return skip


def load_pretrained(
    model: nn.Module,
    path_or_hub: str | os.PathLike[str],
    *,
    allow_head_mismatch: bool = True,
) -> nn.Module:
    """Load a local weights file into ``model`` in place, strictly.

    Every key and shape must match, except (when ``allow_head_mismatch``) the classifier head when only
    its class count differs: it keeps its fresh initialisation and a log line says so. ``"hub"`` means
    timm's own pretrained weights (needs the internet) and is handled by :func:`create_model`."""
    if str(path_or_hub) == "hub":
        raise ImatError("pretrained: hub is only possible when building the model (create_model)")
    state = read_state_dict(path_or_hub)
    skip = check_state_dict(model, state, str(path_or_hub), allow_head_mismatch=allow_head_mismatch)
    if skip:
        own = model.state_dict()
        log.warning(
            "%s: classifier head has %s classes, the model %s: head re-initialised (%s)",
            path_or_hub,
            state[skip[0]].shape[0],
            own[skip[0]].shape[0],
            ", ".join(skip),
        )
        state = {k: (own[k] if k in skip else v) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model
