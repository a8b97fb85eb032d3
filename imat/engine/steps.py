"""One optimisation step: autocast, backward (through the fp16 grad scaler when there is one),
gradient averaging across ranks, clipping and the optimiser step. Mixed into
:class:`imat.engine.loop.Engine`; tasks with ``manual_optimization`` call ``ctx.optimize`` which lands
in :meth:`StepsMixin._optimize`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from imat.engine import distributed as dist_utils
from imat.errors import ImatError


class StepsMixin:
    """Needs the engine's ``optimizers``, ``scaler``, ``amp_dtype``, ``device``, ``cfg``, ``distributed``,
    ``ddp``, ``_grad_norms``, ``_micro``, ``_optimized`` and ``_pending``; the guards (:class:`imat.engine.guards.GuardsMixin`) check the loss and
    the gradients."""

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _step_optimizer(self, name: str) -> None:
        opt = self.optimizers[name]
        if self.distributed and self.ddp is None:  # DDP has averaged them already
            dist_utils.average_gradients(p for g in opt.param_groups for p in g["params"])
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm: torch.Tensor | None = None
        if self.cfg.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if self.scaler is not None:  # it skips steps with inf/NaN gradients itself (and lowers its scale)
            self.scaler.step(opt)
            self._scaler_stepped = True
        else:
            if norm is None:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else None
            if norm is not None and not bool(torch.isfinite(norm)):
                self._skip_nonfinite_step(name, norm)
                opt.zero_grad(set_to_none=True)
                return
            self._bad_grad_streak[name] = 0
            opt.step()
        if norm is not None and self.cfg.grad_clip is not None:
            self._grad_norms.setdefault(name, []).append(norm.detach().float())
        opt.zero_grad(set_to_none=True)

    def _backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward(retain_graph=retain_graph)
        else:
            loss.backward(retain_graph=retain_graph)

    def _optimize(self, name: str, loss: torch.Tensor, retain_graph: bool = False) -> None:
        if name not in self.optimizers:
            raise ValueError(f"unknown optimizer {name!r}; the task declared {sorted(self.optimizers)}")
        self._check_loss(loss)
        if self.cfg.accum_steps == 1:
            self.optimizers[name].zero_grad(set_to_none=True)
            self._backward(loss, retain_graph=retain_graph)
            self._step_optimizer(name)
            return
        self._accumulate(name, loss, retain_graph)

    def _accumulate(self, name: str, loss: torch.Tensor, retain_graph: bool) -> None:
        """``train.accum_steps`` for a task that optimises by hand (MEAL's alternating discriminators):
        add this batch's share of ``loss``'s gradient to optimiser ``name``'s parameters only; after the
        cycle's last batch the engine steps the optimisers in the order the task called them. So in
        every batch of a cycle the student meets the discriminators of the cycle's start (with
        ``accum_steps=1`` the student meets the just-updated ones).

        ``autograd.grad`` rather than ``backward``: the student's loss also reaches the discriminators'
        parameters (through the adversarial term), and a backward would add that into gradients the
        discriminators are accumulating for their own loss."""
        first, last, cycle = self._micro
        if name in self._optimized:
            raise ImatError(
                f"train.accum_steps={self.cfg.accum_steps}: the task updates optimiser {name!r} more than "
                "once per batch (e.g. distill.adversarial.d_steps > 1); use accum_steps=1 for it"
            )
        self._optimized.add(name)
        opt = self.optimizers[name]
        if first:
            opt.zero_grad(set_to_none=True)
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        share = loss / cycle
        if self.scaler is not None:
            share = self.scaler.scale(share)
        grads = torch.autograd.grad(share, params, retain_graph=retain_graph, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        if last:  # stepped after the task's step: every batch of the cycle saw the same networks
            self._pending.append(name)
