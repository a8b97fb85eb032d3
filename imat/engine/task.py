"""What one training step computes. The engine owns everything else (epochs, AMP, optimisers, ...).

A task is the only thing a teacher recipe or a distillation method writes: ``step`` returns the loss
(and named parts to log), ``param_groups`` says what is trained and with which learning rates.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from imat.engine.loop import Engine


class StepContext:
    """What a task's ``step`` sees of the engine: device, autocast, the position, and ``optimize``."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.epoch = 0  # 0-based epoch being trained
        self.step = 0  # 0-based global iteration (across epochs)
        self.step_in_epoch = 0

    @property
    def device(self) -> torch.device:
        return self._engine.device

    @property
    def num_epochs(self) -> int:
        return self._engine.cfg.epochs

    @property
    def steps_per_epoch(self) -> int:
        return self._engine.steps_per_epoch

    @property
    def progress(self) -> float:
        """Fractional epochs done (e.g. 2.5), for loss-weight schedules."""
        return self.step / self.steps_per_epoch

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._engine.optimizers

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The run's mixed-precision context (a no-op for fp32)."""
        return self._engine.autocast()

    def optimize(self, name: str, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Update optimiser ``name`` with exactly the gradient of ``loss``: zero its grads, check the
        loss is finite, backward (scaled for fp16), unscale + clip, step, zero grads again."""
        self._engine._optimize(name, loss, retain_graph=retain_graph)


class Task:
    """Base class of every training task.

    ``model`` is the network being trained: the engine evaluates it, keeps its EMA, saves it to
    ``best.safetensors``. ``manual_optimization = True`` means ``step`` calls ``ctx.optimize(name,
    loss)`` itself (alternating GAN-style updates); otherwise the engine runs ``step`` under autocast,
    back-propagates ``out["loss"]`` once and steps every optimiser.
    """

    manual_optimization: bool = False
    # Distributed, a task without manual optimisation runs its step inside DistributedDataParallel; True
    # (DDP's static_graph) when every step gives gradients to the same parameters, False when that set
    # changes between steps (DDP then searches the graph each step).
    ddp_static_graph: bool = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- what is trained and saved -------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        """Every module whose state goes into ``last.ckpt`` (frozen teachers need not be listed)."""
        return {"model": self.model}

    def param_groups(self) -> dict[str, list[dict[str, Any]]]:
        """Optimiser name -> torch param groups. A group may carry its own base ``lr`` and
        ``weight_decay``; the schedule scales each group from its own base lr."""
        return {"main": [{"params": [p for p in self.model.parameters() if p.requires_grad]}]}

    def optimizer_options(self) -> dict[str, dict[str, Any]]:
        """Per-optimiser overrides of the TrainConfig recipe, e.g. ``{"disc": {"optimizer": "adam",
        "betas": (0.5, 0.999), "weight_decay": 0.0}}``. Keys: optimizer (sgd|adamw|adam), lr,
        weight_decay, momentum, nesterov, betas, eps."""
        return {}

    # --- device and mode -----------------------------------------------------------------------
    def to(self, device: torch.device, memory_format: torch.memory_format | None = None) -> Task:
        """Move every module to ``device`` (override to move frozen teachers too)."""
        for module in self.modules().values():
            module.to(device)
            if memory_format is not None:
                module.to(memory_format=memory_format)
        return self

    def train(self, mode: bool = True) -> Task:
        """Put trained modules in train (or eval) mode; frozen teachers should stay in eval."""
        for module in self.modules().values():
            module.train(mode)
        return self

    # --- the step --------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Compute ``{"loss": total, other scalar parts...}``; every part is logged as an epoch mean."""
        raise NotImplementedError

    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits used for validation (N x C)."""
        return self.model(images)

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each training epoch (0-based), e.g. to anneal a loss weight."""

    def epoch_extras(self) -> dict[str, float]:
        """Extra per-epoch summary columns (then reset your counters)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Extra task state for resume (tensors and plain Python values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class ClassificationTask(Task):
    """Plain cross-entropy training of one classifier (every teacher, and the student's CE baseline).

    ``mixup`` is a timm ``Mixup`` (or any callable ``(images, labels) -> (images, soft_targets)``);
    with it the loss is soft-target cross-entropy and label smoothing is the Mixup's own business
    (timm folds it into the soft targets), otherwise ``label_smoothing`` goes to the cross-entropy.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, mixup: Any | None = None) -> None:
        super().__init__(model)
        self.label_smoothing = float(label_smoothing)
        self.mixup = mixup

    def step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        if self.mixup is not None:
            if images.shape[0] % 2:  # timm's Mixup pairs samples: drop one from an odd last batch
                images, labels = images[:-1], labels[:-1]
            if images.shape[0] == 0:
                raise ValueError("a batch of one image cannot be mixed; use drop_last or an even batch size")
            images, targets = self.mixup(images, labels)
            logits = self.model(images)
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            return {"loss": loss}
        logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        top1 = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "top1": top1}
