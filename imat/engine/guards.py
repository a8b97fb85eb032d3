"""The engine's guards: a run stops with a one-line error instead of training on NaNs.

A non-finite loss stops the run at once; a step with NaN/inf gradients is skipped (and counted in the
epoch's ``nonfinite_grad_steps``) up to ``train.nonfinite_grad_patience`` steps in a row; non-finite
weights are never written to ``last.ckpt``. Every message says where the run stopped and which
checkpoint is left. Mixed into :class:`imat.engine.loop.Engine`.
"""

from __future__ import annotations

import logging

import torch

from imat.errors import ImatError

log = logging.getLogger("imat.engine")


class GuardsMixin:
    """Needs the engine's ``ctx``, ``cfg``, ``task``, ``ckpt_path``, ``out_dir``, ``log_name`` and
    ``_bad_grad_streak`` / ``_bad_grad_steps`` counters."""

    def _position(self) -> str:
        return f"epoch {self.ctx.epoch + 1} step {self.ctx.step_in_epoch + 1}"

    def _checkpoint_note(self) -> str:
        """What a run stopped by a guard leaves behind, for its error message."""
        if self.ckpt_path.exists():
            return f"last good checkpoint kept at {self.ckpt_path}"
        return f"no checkpoint was written yet in {self.out_dir}"

    def _check_loss(self, loss: torch.Tensor) -> None:
        if bool(torch.isfinite(loss.detach()).all()):
            return
        value = loss.detach().float().mean().item()
        raise ImatError(
            f"non-finite loss at {self._position()}: loss={value}; "
            f"{self._checkpoint_note()} (lower the lr, set grad_clip, or use bf16 instead of fp16)"
        )

    def _skip_nonfinite_step(self, name: str, norm: torch.Tensor) -> None:
        """Count a step skipped for NaN/inf gradients; stop after ``nonfinite_grad_patience`` in a row."""
        streak = self._bad_grad_streak.get(name, 0) + 1
        self._bad_grad_streak[name] = streak
        self._bad_grad_steps += 1
        if streak > self.cfg.nonfinite_grad_patience:
            raise ImatError(
                f"non-finite gradients of optimiser {name!r} in {streak} steps in a row at {self._position()} "
                f"(gradient norm {float(norm)}); {self._checkpoint_note()} (lower the lr, set grad_clip, or use fp32)"
            )
        log.warning(
            "%s: optimiser %r step skipped at %s: gradient norm is %s",
            self.log_name,
            name,
            self._position(),
            float(norm),
        )

    def _assert_finite_weights(self) -> None:
        for name, module in self.task.modules().items():
            for key, value in module.state_dict().items():
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise ImatError(
                        f"non-finite weights in {name}.{key} at {self._position()}; {self._checkpoint_note()}"
                    )
