"""Optimisers (one per task param-group key) and per-iteration learning-rate schedules.

Every param group remembers its own base learning rate under ``"base_lr"`` and the schedule sets
``lr = base_lr * factor(step)`` for each group. So a MEAL discriminator with ``lr=1e-3`` next to a
student at ``lr=0.1`` keeps its 1:100 ratio through warm-up, cosine or step decay; nothing ever
overwrites one group's lr with another's (the MEAL v2 bug, issue #9 there). The schedule is a pure
function of the global step, so resuming needs only the step count.

Weight decay skips norm weights, biases, layer-scale gains and a model's own ``no_weight_decay()``
names (ViT position embeddings, tokens): timm's ``param_groups_weight_decay`` decides which
(:func:`no_decay_params`), and :func:`build_optimizer` splits every decayed group into its decayed part
and a weight-decay-0 part with the same lr (decaying a norm's scale towards 0 only fights the
normalisation; ConvNeXt-S with AdamW at 0.05 would shrink every LayerNorm and layer-scale).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from imat.config.train import TrainConfig
from imat.errors import ImatError


def no_decay_params(modules: dict[str, torch.nn.Module] | list[torch.nn.Module]) -> set[int]:
    """``id()`` of every trainable parameter of ``modules`` that timm exempts from weight decay: 1-D
    tensors (norm weights, biases, layer-scale), names ending in ``.bias`` and the module's own
    ``no_weight_decay()`` list."""
    from timm.optim import param_groups_weight_decay

    out: set[int] = set()
    for module in modules.values() if isinstance(modules, dict) else modules:
        fn = getattr(module, "no_weight_decay", None)
        skip = set(fn()) if callable(fn) else set()
        for group in param_groups_weight_decay(module, weight_decay=1.0, no_weight_decay_list=skip):
            if group["weight_decay"] == 0.0:
                out.update(id(p) for p in group["params"])
    return out


def lr_scale_rule(rule: str, kind: str) -> str:
    """The rule for an optimiser of ``kind`` under ``train.lr_scale`` ``rule``: ``auto`` is linear for
    SGD (Goyal et al. 2017) and square root for Adam-type optimisers (their update is normalised by
    the gradient's scale, so its noise, not its size, shrinks with the batch)."""
    if rule != "auto":
        return rule
    return "linear" if kind == "sgd" else "sqrt"


def lr_factor(rule: str, global_batch: int, base_batch: int) -> float:
    """The multiplier of a learning rate set for ``base_batch`` when training at ``global_batch``."""
    ratio = global_batch / base_batch
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "none":
        return 1.0
    raise ImatError(f"train.lr_scale: unknown rule {rule!r}; use auto, linear, sqrt or none")


def lr_base_batch(cfg: TrainConfig) -> int:
    """The global batch ``cfg.lr`` (and every lr of its tasks) is meant for."""
    return int(cfg.lr_base_batch or cfg.batch_size)


OPTIMIZER_KEYS = {"optimizer", "lr", "weight_decay", "momentum", "nesterov", "betas", "eps"}


def build_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    cfg: TrainConfig,
    options: dict[str, Any] | None = None,
    no_decay: set[int] | None = None,
    global_batch: int | None = None,
) -> torch.optim.Optimizer:
    """One optimiser for ``groups``: TrainConfig's recipe, overridden by ``options`` (see
    ``Task.optimizer_options``), groups' own ``lr``/``weight_decay`` winning over both.

    Every lr is read as set for the batch :func:`lr_base_batch` and multiplied by
    :func:`lr_factor` for ``global_batch`` (None: no rescaling) under this optimiser's rule
    (:func:`lr_scale_rule`); groups remember the rescaled value as ``base_lr``.

    Parameters in ``no_decay`` (ids, see :func:`no_decay_params`) of a group with weight decay go to an
    extra group with ``weight_decay=0`` and the same other settings, appended after all given groups so
    a task's group indices keep their meaning."""
    options = dict(options or {})
    unknown = set(options) - OPTIMIZER_KEYS
    if unknown:
        raise ImatError(
            f"optimizer {name!r}: unknown option(s) {sorted(unknown)}; known: {sorted(OPTIMIZER_KEYS)}"
        )
    kind = options.get("optimizer", cfg.optimizer)
    factor = 1.0
    if global_batch is not None:
        factor = lr_factor(lr_scale_rule(cfg.lr_scale, kind), global_batch, lr_base_batch(cfg))
    lr = float(options.get("lr", cfg.lr))
    wd = float(options.get("weight_decay", cfg.weight_decay))
    prepared = []
    for group in groups:
        g = dict(group)
        g["params"] = [p for p in g["params"] if p.requires_grad]
        if not g["params"]:
            continue
        g.setdefault("lr", lr)
        g.setdefault("weight_decay", wd)
        g["lr"] = float(g["lr"]) * factor
        g["base_lr"] = g["lr"]
        prepared.append(g)
    exempt = []
    for g in prepared if no_decay else []:
        if float(g["weight_decay"]) > 0 and any(id(p) in no_decay for p in g["params"]):
            free = [p for p in g["params"] if id(p) in no_decay]
            g["params"] = [p for p in g["params"] if id(p) not in no_decay]
            exempt.append({**g, "params": free, "weight_decay": 0.0})
    prepared += exempt  # a group left empty stays, so the task's group indices keep their meaning
    if not prepared:
        raise ImatError(f"optimizer {name!r}: no trainable parameters")
    if kind == "sgd":
        return torch.optim.SGD(
            prepared,
            lr=lr * factor,
            momentum=float(options.get("momentum", cfg.momentum)),
            nesterov=bool(options.get("nesterov", cfg.nesterov)),
            weight_decay=wd,
        )
    if kind in ("adamw", "adam"):
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        return cls(
            prepared,
            lr=lr * factor,
            betas=tuple(options.get("betas", (0.9, 0.999))),
            eps=float(options.get("eps", 1e-8)),
            weight_decay=wd,
        )
    raise ImatError(f"optimizer {name!r}: unknown optimizer {kind!r}; use sgd, adamw or adam")


class LrSchedule:
    """``factor(step)``: linear warm-up over ``warmup_epochs``, then cosine (down to ``min_lr_ratio``),
    multistep (``lr_gamma`` at each of ``milestones``, in epochs) or constant; stepped per iteration."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.kind = cfg.schedule
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = min(round(cfg.warmup_epochs * self.steps_per_epoch), self.total_steps)
        self.min_ratio = cfg.min_lr_ratio
        self.milestones = sorted(cfg.milestones)
        self.gamma = cfg.lr_gamma

    def factor(self, step: int) -> float:
        """Multiplier of every group's base lr at global (0-based) iteration ``step``."""
        warm = (step + 1) / self.warmup_steps if self.warmup_steps and step < self.warmup_steps else 1.0
        if self.kind == "constant":
            main = 1.0
        elif self.kind == "multistep":
            epoch = step // self.steps_per_epoch
            main = self.gamma ** sum(1 for m in self.milestones if epoch >= m)
        else:  # cosine after warm-up, reaching the floor at the last step
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
            main = self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return warm * main

    def apply(self, optimizers: dict[str, torch.optim.Optimizer], step: int) -> float:
        """Set every group's lr for ``step`` from its own ``base_lr``; returns the factor."""
        f = self.factor(step)
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * f
        return f
