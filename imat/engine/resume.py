"""``last.ckpt``: what the engine writes after every epoch (and every ``train.ckpt_every_steps``) and
how it continues from it. See :mod:`imat.engine.loop` for how a mid-epoch resume replays the epoch.
Mixed into :class:`imat.engine.loop.Engine`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from imat.engine import distributed as dist_utils
from imat.engine.checkpoint import (
    get_rng_state,
    load_checkpoint,
    load_module_state,
    save_checkpoint,
    set_rng_state,
)
from imat.engine.ema import ModelEma
from imat.errors import ImatError

log = logging.getLogger("imat.engine")


class ResumeMixin:
    """Needs the engine's ``task``, ``optimizers``, ``scaler``, ``ema``, ``cfg``, ``history``,
    ``best_value`` / ``best_epoch``, ``epoch`` / ``global_step``, ``is_main`` and ``ckpt_path``."""

    def _save_last(self, epoch: int, step_in_epoch: int, epoch_rng: dict | None, acc: dict | None) -> None:
        """``epoch``/``step_in_epoch``: where training continues (0-based epoch, batches done in it)."""
        rng = get_rng_state()
        # mid-epoch, every rank's streams are its own (see imat.engine.loop): keep them all
        rng_ranks = dist_utils.gather_objects(rng) if self.distributed and step_in_epoch else None
        if not self.is_main:
            return
        self._assert_finite_weights()
        state = {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": self.global_step,
            "update_step": self.update_step,
            "modules": {name: m.state_dict() for name, m in self.task.modules().items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.ema_state() if self.ema is not None else None,
            "rng": rng,
            "rng_ranks": rng_ranks,
            "epoch_rng": epoch_rng,
            "epoch_acc": acc,
            "history": self.history,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "task": self.task.state_dict(),
            "config": self.cfg.model_dump(mode="json"),
        }
        save_checkpoint(self.ckpt_path, state)

    def _restore(self, path: Path) -> dict[str, Any] | None:
        """Load ``path`` into the task, optimisers, scaler and EMA. Returns the mid-epoch state to
        continue from, or None at an epoch boundary (RNG states are then restored right away)."""
        ckpt = load_checkpoint(path)
        modules = ckpt.get("modules", {})
        for name, module in self.task.modules().items():
            if name not in modules:
                raise ImatError(
                    f"{path}: checkpoint has no module {name!r} (has {sorted(modules)}); another task?"
                )
            load_module_state(module, modules[name], path, name)
        saved_opts = ckpt.get("optimizers", {})
        if set(saved_opts) != set(self.optimizers):
            raise ImatError(
                f"{path}: checkpoint optimizers {sorted(saved_opts)} do not match the task's {sorted(self.optimizers)}"
            )
        for name, opt in self.optimizers.items():
            # the config's base lrs win over the checkpoint's (a PBT trial resumes with a mutated lr)
            base_lrs = [g["base_lr"] for g in opt.param_groups]
            try:
                opt.load_state_dict(saved_opts[name])
                for group, base in zip(opt.param_groups, base_lrs, strict=True):
                    group["base_lr"] = base
            except (ValueError, KeyError) as exc:
                raise ImatError(f"{path}: optimizer {name!r} does not match the checkpoint ({exc})") from None
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema"):
                try:
                    self.ema.load_ema_state(ckpt["ema"])
                except RuntimeError as exc:
                    raise ImatError(
                        f"{path}: EMA weights do not match the model ({str(exc).splitlines()[0]})"
                    ) from None
            else:  # EMA switched on after the fact: start it from the restored weights
                self.ema = ModelEma(self.task.model, self.cfg.ema_decay)
        self.task.load_state_dict(ckpt.get("task") or {})
        self.history = list(ckpt.get("history") or [])
        self.best_value = ckpt.get("best_value")
        self.best_epoch = ckpt.get("best_epoch")
        self.epoch = int(ckpt["epoch"])
        self.global_step = int(ckpt["global_step"])
        self.update_step = int(ckpt.get("update_step", self.global_step))
        step = int(ckpt.get("step_in_epoch") or 0)
        if step:
            return {
                "step": step,
                "rng": ckpt["rng"],
                "rng_ranks": ckpt.get("rng_ranks"),
                "epoch_rng": ckpt["epoch_rng"],
                "acc": ckpt["epoch_acc"],
            }
        set_rng_state(ckpt["rng"])
        return None

    def _own_rng(self, resumed: dict[str, Any]) -> dict[str, Any]:
        """This rank's RNG state at the checkpoint (rank 0's for a checkpoint from another world size)."""
        ranks = resumed.get("rng_ranks")
        world, rank = dist_utils.world_size(), dist_utils.rank()
        if ranks and len(ranks) == world:
            return ranks[rank]
        if world > 1:
            log.warning(
                "%s: the checkpoint holds %s RNG state(s), not one per rank of %d: every rank resumes "
                "rank 0's streams",
                self.ckpt_path,
                len(ranks) if ranks else 1,
                world,
            )
        return resumed["rng"]
