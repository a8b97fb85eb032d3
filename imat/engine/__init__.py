"""The shared training engine: one loop for teachers and every distillation method.

Public API::

    from imat.engine import Engine, Task, ClassificationTask, StepContext
    engine = Engine(task, train_cfg, out_dir, train_loader, val_loader, meta=meta, log_name="teacher")
    summary = engine.fit(resume=True)          # pandas DataFrame, one row per epoch
    result = engine.evaluate(loader, return_outputs=True)  # loss/top1/top3 (+ logits, labels, index)
"""

from __future__ import annotations

from imat.engine.checkpoint import get_rng_state, load_checkpoint, seed_everything, set_rng_state
from imat.engine.ema import ModelEma
from imat.engine.loop import Engine
from imat.engine.optim import LrSchedule, build_optimizer
from imat.engine.runtime import is_main_process, move_to_device, resolve_device
from imat.engine.task import ClassificationTask, StepContext, Task

__all__ = [
    "ClassificationTask",
    "Engine",
    "LrSchedule",
    "ModelEma",
    "StepContext",
    "Task",
    "build_optimizer",
    "get_rng_state",
    "is_main_process",
    "load_checkpoint",
    "move_to_device",
    "resolve_device",
    "seed_everything",
    "set_rng_state",
]
