"""The one training loop of imat: teachers and every distillation method run through :class:`Engine`.

Resume is exact where the hardware allows: ``last.ckpt`` holds the position inside the epoch, the RNG
states at the start of that epoch and at the checkpoint. On resume the epoch's data order is rebuilt
from the epoch-start state (the sampler's generator is re-seeded from ``(seed, epoch)`` every epoch),
the batches already trained on are drawn and discarded (so loader workers' augmentation streams line
up again), then the checkpoint's RNG states are restored. On a CPU a killed-and-resumed run ends with
the same weights, bit for bit, as an uninterrupted one (tested), provided the loader's dataset is
deterministic given the global RNGs (a dataset with its own RNG can expose ``set_epoch(epoch)``,
which the engine calls every epoch) and workers are not persistent.

Random streams. What must agree across ranks is shared: the initial weights (broadcast from rank 0),
the sampler's permutation (seeded from ``(seed, epoch)``) and anything a task seeds itself (MEAL's
teacher draw). Everything else is rank-local: at the start of every epoch python ``random``, numpy and
torch, the loader's own generator (its workers' seeds) and an in-process albumentations pipeline are
seeded from ``(seed, rank, epoch)``, so two ranks never share crops, flips, mixup draws, drop-path or
dropout masks. A mid-epoch checkpoint holds every rank's RNG state, so each rank resumes its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from imat.config.train import TrainConfig
from imat.engine import distributed as dist_utils
from imat.engine.best import BestMixin
from imat.engine.checkpoint import derive_seed, get_rng_state, rank_epoch_seed, seed_everything, set_rng_state
from imat.engine.ema import ModelEma
from imat.engine.evaluation import EvaluationMixin
from imat.engine.guards import GuardsMixin
from imat.engine.hooks import run_epoch_end_hooks
from imat.engine.logs import RunLogger, console_table, history_frame
from imat.engine.optim import (
    LrSchedule,
    build_optimizer,
    lr_base_batch,
    lr_factor,
    lr_scale_rule,
    no_decay_params,
)
from imat.engine.resume import ResumeMixin
from imat.engine.runtime import (
    as_dict_batch,
    batch_size_of,
    batch_to_device,
    configure_cuda,
    is_main_process,
    resolve_precision,
    skipped_in,
)
from imat.engine.steps import StepsMixin
from imat.engine.task import StepContext, Task
from imat.errors import ImatError
from imat.io import write_text

log = logging.getLogger("imat.engine")


class Engine(GuardsMixin, StepsMixin, EvaluationMixin, ResumeMixin, BestMixin):
    """Train ``task`` with the recipe ``cfg``, writing ``summary.csv``, ``last.ckpt``,
    ``best.safetensors`` and ``tensorboard/`` under ``out_dir``.

    ``meta`` is stored in ``best.safetensors`` (arch, num_classes, input_size, mean, std, crop_pct,
    model_kwargs, classes; see imat.weights) together with the epoch and metrics of the best epoch.
    """

    def __init__(
        self,
        task: Task,
        cfg: TrainConfig,
        out_dir: str | Path,
        train_loader: Any,
        val_loader: Any | None = None,
        meta: dict[str, Any] | None = None,
        log_name: str = "train",
        progress: bool = True,
        tensorboard: bool = True,
    ) -> None:
        self.task = task
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.meta = dict(meta or {})
        self.log_name = log_name
        self.progress = progress
        self.tensorboard = tensorboard
        # torchrun / Ray Train: join the process group, shard the loaders (see engine/distributed.py)
        self.distributed = dist_utils.init_from_env()
        if self.distributed:
            self.train_loader = dist_utils.shard_loader(train_loader, pad=True)
            if val_loader is not None:
                self.val_loader = dist_utils.shard_loader(val_loader, pad=False)
        if hasattr(self.train_loader, "replace_unreadable"):  # same step count on every rank (SkipLoader)
            self.train_loader.replace_unreadable = True

        self.device = dist_utils.process_device(cfg.device)  # a rank's own GPU when distributed
        configure_cuda(self.device)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.channels_last = cfg.channels_last
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        if cfg.sync_bn and self.distributed:
            if self.device.type != "cuda":
                raise ImatError("train.sync_bn needs CUDA ranks; on CPUs the running statistics are averaged")
            dist_utils.convert_sync_batchnorm(task.modules())  # in place: BN children replaced, params shared
        self.task.to(self.device, torch.channels_last if self.channels_last else None)

        self.steps_per_epoch = self._count_steps()
        self.accum_steps = int(cfg.accum_steps)
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / self.accum_steps)
        self.world_size = dist_utils.world_size()
        self.global_batch = cfg.batch_size * self.world_size * self.accum_steps
        options = task.optimizer_options()
        groups = task.param_groups()
        unknown = set(options) - set(groups)
        if unknown:
            raise ImatError(
                f"optimizer_options names unknown optimizer(s) {sorted(unknown)}; known: {sorted(groups)}"
            )
        exempt = None if cfg.decay_norm_and_bias else no_decay_params(task.modules())
        self.optimizers = {
            name: build_optimizer(name, list(g), cfg, options.get(name), exempt, self.global_batch)
            for name, g in groups.items()
        }
        self.scaling = self._scaling(options)
        self.schedule = LrSchedule(cfg, self.updates_per_epoch)  # per optimiser update
        self.ema = ModelEma(task.model, cfg.ema_decay) if cfg.ema else None
        if cfg.compile:
            task.model.compile()  # in place: state_dict keys stay unprefixed
        # one-backward tasks train inside DDP (gradients reduced while backward runs), built when fit
        # starts (its constructor is a collective; an engine built only to evaluate needs none)
        self.ddp: torch.nn.Module | None = None

        self.ctx = StepContext(self)
        self.history: list[dict[str, Any]] = []
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.epoch = 0  # next epoch to train (0-based)
        self.global_step = 0  # batches trained on, across epochs
        self.update_step = 0  # optimiser updates (global_step / accum_steps, rounded up per epoch)
        self._ckpt_step = 0  # global_step at the last write of last.ckpt
        self._micro: tuple[bool, bool, int] = (True, True, 1)  # first / last of its cycle, cycle length
        self._optimized: set[str] = set()  # optimisers a manual task updated in this batch
        self._pending: list[str] = []  # their steps, due after the batch (end of an accumulation cycle)
        self._logger: RunLogger | None = None
        self._grad_norms: dict[str, list[torch.Tensor]] = {}
        self._bad_grad_streak: dict[str, int] = {}  # consecutive skipped steps, per optimiser
        self._bad_grad_steps = 0  # skipped steps this epoch, all optimisers
        self._scaler_stepped = False

    # --- paths and process role ----------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Only the main process writes files (keeps a later DDP wrapper simple)."""
        return is_main_process()

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "last.ckpt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.safetensors"

    @property
    def summary_path(self) -> Path:
        return self.out_dir / "summary.csv"

    def _scaling(self, options: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The global batch and each optimiser's lr rule, factor and peak lr (printed, logged, saved)."""
        out: dict[str, Any] = {
            "world_size": self.world_size,
            "batch_size": self.cfg.batch_size,
            "accum_steps": self.accum_steps,
            "global_batch": self.global_batch,
            "lr_base_batch": lr_base_batch(self.cfg),
        }
        for name, opt in self.optimizers.items():
            kind = (options.get(name) or {}).get("optimizer", self.cfg.optimizer)
            rule = lr_scale_rule(self.cfg.lr_scale, kind)
            out[f"lr_{name}"] = float(opt.param_groups[0]["base_lr"])
            out[f"lr_rule_{name}"] = rule
            out[f"lr_factor_{name}"] = lr_factor(rule, self.global_batch, lr_base_batch(self.cfg))
        return out

    def _announce_scaling(self) -> None:
        """Print the effective lr and global batch, and note them in the run's ``config.yaml``."""
        sc = self.scaling
        lrs = ", ".join(
            f"{name} {sc[f'lr_{name}']:.4g} ({sc[f'lr_rule_{name}']} x{sc[f'lr_factor_{name}']:.4g})"
            for name in self.optimizers
        )
        line = (
            f"global batch {sc['global_batch']} = {sc['batch_size']} x {sc['world_size']} rank(s) x "
            f"{sc['accum_steps']} accumulation step(s); lr set for batch {sc['lr_base_batch']}; "
            f"effective lr: {lrs}"
        )
        log.info("%s: %s", self.log_name, line)
        if self.progress:
            print(f"{self.log_name}: {line}", file=sys.stderr)
        config = self.out_dir / "config.yaml"
        if config.is_file():  # the caller's resolved config: add what it cannot know (world size)
            marker = "# imat.engine scaling:"
            text = config.read_text().split(marker)[0].rstrip("\n")
            note = "\n".join(f"#   {k}: {v}" for k, v in sc.items())
            write_text(config, f"{text}\n{marker} what this run trained with\n{note}\n")

    def _count_steps(self) -> int:
        try:
            n: int | None = len(self.train_loader)
        except TypeError:
            n = None
        cap = self.cfg.max_steps_per_epoch
        if cap is not None:
            n = cap if n is None else min(n, cap)
        if n is None:
            raise ImatError("the training loader has no length; set train.max_steps_per_epoch")
        if n <= 0:
            raise ImatError(
                "the training loader is empty (no batches): check the training split and batch size"
            )
        return n

    # --- the loop ------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> pd.DataFrame:
        """Train to ``cfg.epochs``; returns the per-epoch summary (also in ``summary.csv``).

        ``resume=True`` continues from ``last.ckpt`` when it exists (a finished run is a no-op that
        returns its history) and starts fresh otherwise.
        """
        resumed = None
        if resume and self.ckpt_path.exists():
            resumed = self._restore(self.ckpt_path)
            log.info("%s: resuming from %s at epoch %d", self.log_name, self.ckpt_path, self.epoch + 1)
        else:
            seed_everything(self.cfg.seed)
            self.history, self.best_value, self.best_epoch = [], None, None
            self.epoch, self.global_step, self.update_step = 0, 0, 0
        self._ckpt_step = self.global_step  # batches trained when last.ckpt was last written
        if self.distributed:  # every rank starts from rank 0's weights, as DDP does
            dist_utils.broadcast_modules(self.task.modules())
            if self.ema is not None:
                dist_utils.broadcast_modules({"ema": self.ema.module})
            if self.ddp is None:
                self.ddp = dist_utils.wrap_ddp(self.task, self.device, accumulate=self.accum_steps > 1)
        if self.epoch >= self.cfg.epochs and resumed is None:
            if self.is_main and self.history and not self.summary_path.exists():
                RunLogger(self.out_dir, tensorboard=False).write_summary(self.history)
            return history_frame(self.history)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._announce_scaling()
            self._logger = RunLogger(self.out_dir, tensorboard=self.tensorboard)
            if self.history:
                self._logger.write_summary(self.history)
        try:
            for epoch in range(self.epoch, self.cfg.epochs):
                self._run_epoch(epoch, resumed)
                resumed = None
        finally:
            if self._logger is not None:
                self._logger.close()
                self._logger = None
        df = history_frame(self.history)
        if self.is_main and self.progress:
            print(console_table(df, f"{self.log_name}: {len(df)} epoch(s), summary in {self.summary_path}"))
        return df

    def _prepare_loader(self, epoch: int, rank_seed: int) -> None:
        """Make this epoch's sample order a function of (seed, epoch) only, the same on every rank, and
        the loader's own randomness (worker seeds, an in-process augmentation pipeline) one of
        ``rank_seed``, this rank's own."""
        seed = (self.cfg.seed * 1_000_003 + epoch) % (2**63)
        loader = self.train_loader
        seen: set[int] = set()
        order = [  # the generators that draw the sample order: shared by all ranks
            getattr(getattr(loader, "sampler", None), "generator", None),
            getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None),
        ]
        for gen in order:
            if isinstance(gen, torch.Generator) and id(gen) not in seen:
                gen.manual_seed(seed)
                seen.add(id(gen))
        own = getattr(loader, "generator", None)  # draws the workers' base seed
        if isinstance(own, torch.Generator) and id(own) not in seen:  # one process: it is the sampler's
            own.manual_seed(derive_seed(rank_seed, 1))
            seen.add(id(own))
        transform = getattr(getattr(loader, "dataset", None), "transform", None)
        if callable(getattr(transform, "set_random_seed", None)):
            # the main process's copy: all of it with no workers, and replacement batches with them
            # (workers seed their own copies)
            transform.set_random_seed(derive_seed(rank_seed, 2) % 2**32)
        for obj in (
            getattr(loader, "sampler", None),
            getattr(loader, "batch_sampler", None),
            getattr(getattr(loader, "batch_sampler", None), "sampler", None),
            getattr(loader, "dataset", None),
        ):
            if obj is not None and id(obj) not in seen and callable(getattr(obj, "set_epoch", None)):
                obj.set_epoch(epoch)
                seen.add(id(obj))

    def _run_epoch(self, epoch: int, resumed: dict[str, Any] | None) -> None:
        cfg, task, ctx = self.cfg, self.task, self.ctx
        ctx.epoch = epoch
        rank_seed = rank_epoch_seed(cfg.seed, dist_utils.rank(), epoch)
        seed_everything(rank_seed)
        epoch_rng = get_rng_state()
        task.train(True)
        self._prepare_loader(epoch, rank_seed)
        task.on_epoch_start(epoch)
        iterator: Iterator[Any] = iter(self.train_loader)
        start = resumed["step"] if resumed else 0
        acc = dict(resumed["acc"]) if resumed else {"sums": {}, "images": 0, "skipped": 0, "train_time": 0.0}
        for done in range(start):  # replay the consumed part of the epoch (see module docstring)
            try:
                next(iterator)
            except StopIteration:
                raise ImatError(
                    f"{self.ckpt_path}: checkpoint is {start} steps into epoch {epoch + 1} but the loader "
                    f"has only {done} batches (different data or batch size?)"
                ) from None
        if resumed is not None:
            set_rng_state(self._own_rng(resumed))
        sums: dict[str, torch.Tensor | float] = dict(acc["sums"])
        n_images, skipped = int(acc["images"]), int(acc["skipped"])
        self._grad_norms = {}
        self._bad_grad_steps = int(acc.get("bad_grad_steps", 0))
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=start,
            desc=f"{self.log_name} {epoch + 1}/{cfg.epochs}",
            disable=not (self.progress and self.is_main),
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        normalize = getattr(self.train_loader, "device_normalize", None)
        step_fn = self.ddp if self.ddp is not None else task.step
        t0 = time.perf_counter()
        last_loss: torch.Tensor | None = None
        try:
            for step in range(start, self.steps_per_epoch):
                try:
                    raw = next(iterator)
                except StopIteration:
                    if self.distributed:  # the other ranks would wait for this one in the next collective
                        raise ImatError(
                            f"rank {dist_utils.rank()}: the training loader ended after {step} of "
                            f"{self.steps_per_epoch} batches in epoch {epoch + 1}; every rank must yield "
                            "the same number (use imat.data.build_loader, or max_steps_per_epoch)"
                        ) from None
                    log.warning(
                        "%s: the loader ended after %d of %d batches",
                        self.log_name,
                        step,
                        self.steps_per_epoch,
                    )
                    break
                batch = batch_to_device(as_dict_batch(raw), self.device, self.channels_last, normalize)
                ctx.step, ctx.step_in_epoch = self.global_step, step
                cycle_start = step - step % self.accum_steps
                cycle = min(self.accum_steps, self.steps_per_epoch - cycle_start)
                first, last = step == cycle_start, step == cycle_start + cycle - 1
                self._micro, self._optimized, self._pending = (first, last, cycle), set(), []
                if first:
                    self.schedule.apply(self.optimizers, self.update_step)
                if task.manual_optimization:
                    out = task.step(batch, ctx)
                    self._check_loss(out["loss"])
                    for name in self._pending:  # accumulated updates, in the order the task asked
                        self._step_optimizer(name)
                else:
                    if first:
                        for opt in self.optimizers.values():
                            opt.zero_grad(set_to_none=True)
                    # DDP: all-reduce only on the cycle's last batch; the others accumulate locally
                    sync = (
                        self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
                    )
                    with sync:
                        with self.autocast():
                            out = step_fn(batch, ctx)
                        self._check_loss(out["loss"])
                        self._backward(out["loss"] / cycle if cycle > 1 else out["loss"])
                    if last:
                        for name in self.optimizers:
                            self._step_optimizer(name)
                if last:
                    if self.scaler is not None and self._scaler_stepped:  # once per update, after all steps
                        self.scaler.update()
                        self._scaler_stepped = False
                    if self.ema is not None:
                        self.ema.update(task.model)
                    self.update_step += 1
                bs = batch_size_of(batch)
                for key, value in out.items():
                    v = value.detach().float().mean() if isinstance(value, torch.Tensor) else float(value)
                    sums[key] = sums.get(key, 0.0) + v * bs
                n_images += bs
                skipped += skipped_in(batch)
                self.global_step += 1
                last_loss = out["loss"]
                bar.update(1)
                if step % 10 == 0 or step + 1 == self.steps_per_epoch:
                    loss_value = float(last_loss.detach().float())
                    bar.set_postfix(loss=f"{loss_value:.4f}")
                    if self._logger is not None:
                        self._logger.scalar("step/loss", loss_value, self.global_step)
                if (
                    cfg.ckpt_every_steps
                    # counted from the last save: with accumulation a multiple of it may never be a boundary
                    and self.global_step - self._ckpt_step >= cfg.ckpt_every_steps
                    and step + 1 < self.steps_per_epoch
                    and last  # never inside an accumulation cycle: its gradients are not saved
                ):
                    acc_now = {
                        "sums": {k: float(v) for k, v in sums.items()},
                        "images": n_images,
                        "skipped": skipped,
                        "bad_grad_steps": self._bad_grad_steps,
                        "train_time": acc["train_time"] + time.perf_counter() - t0,
                    }
                    self._save_last(epoch, step + 1, epoch_rng, acc_now)
                    self._ckpt_step = self.global_step
        finally:
            bar.close()
            del iterator  # shuts loader workers down before evaluation starts its own
        train_time = acc["train_time"] + time.perf_counter() - t0
        self._end_epoch(epoch, sums, n_images, skipped, train_time)

    def _end_epoch(
        self, epoch: int, sums: dict[str, Any], n_images: int, skipped: int, train_time: float
    ) -> None:
        t_eval = time.perf_counter()
        # training batches with no readable image, replaced by re-read ones (imat.data.loader.SkipLoader)
        replaced = int(getattr(self.train_loader, "epoch_replaced", 0))
        if self.distributed:  # whole-epoch sums over ranks; BatchNorm statistics averaged over ranks
            totals = dist_utils.sum_across_ranks(
                {
                    **{f"sum_{k}": v for k, v in sums.items()},
                    "_images": n_images,
                    "_skipped": skipped,
                    "_replaced": replaced,
                },
                self.device,
            )
            sums = {k: totals[f"sum_{k}"] for k in sums}
            n_images, skipped = int(totals["_images"]), int(totals["_skipped"])
            replaced = int(totals["_replaced"])
            train_time = dist_utils.max_across_ranks(train_time, self.device)
            if not self.cfg.sync_bn:
                dist_utils.average_norm_stats(self.task.modules())
            dist_utils.broadcast_modules(self.task.modules(), buffers_only=True)  # other buffers: rank 0's
        if n_images == 0 and skipped > 0:
            raise ImatError(
                f"epoch {epoch + 1}: none of the {skipped} training images could be read "
                "(are the images downloaded, and is data.images right?)"
            )
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "global_step": self.global_step,
            "global_batch": self.global_batch,
        }
        for key, total in sums.items():
            row[f"train_{key}"] = float(total) / n_images if n_images else float("nan")
        for name, opt in self.optimizers.items():
            seen = {opt.param_groups[0]["base_lr"]}
            row[f"lr_{name}"] = float(opt.param_groups[0]["lr"])
            for i, group in enumerate(opt.param_groups[1:], start=1):
                if group["base_lr"] not in seen:  # one column per distinct lr (no-decay twins share theirs)
                    seen.add(group["base_lr"])
                    row[f"lr_{name}_{i}"] = float(group["lr"])
        for name, norms in self._grad_norms.items():
            row[f"grad_norm_{name}"] = float(torch.stack(norms).mean()) if norms else float("nan")
        if self.val_loader is not None:
            res = self.evaluate(self.val_loader)
            for key in ("loss", "top1", "top3", "top1_err", "top3_err"):
                row[f"val_{key}"] = res[key]
            skipped += res["skipped"]
            if self.ema is not None:
                raw = self.evaluate(self.val_loader, use_ema=False)
                for key in ("loss", "top1", "top3"):
                    row[f"val_raw_{key}"] = raw[key]
        for key, value in self.task.epoch_extras().items():
            if hasattr(value, "item"):  # tensors and numpy scalars -> plain Python for the checkpoint
                value = value.item()
            row[key if key not in row else f"task_{key}"] = value
        row["skipped"] = skipped
        row["replaced_batches"] = replaced
        row["nonfinite_grad_steps"] = self._bad_grad_steps
        row["train_images"] = n_images
        row["images_per_s"] = n_images / train_time if train_time > 0 else float("nan")
        row["train_time_s"] = train_time
        row["epoch_time_s"] = train_time + time.perf_counter() - t_eval

        improved = self._update_best(row)
        row["is_best"] = improved
        self.history.append(row)
        # on every rank (only rank 0 writes last.ckpt): they decide the next mid-epoch save alike
        self._ckpt_step = self.global_step
        if self.is_main:
            if improved:
                self._save_best(row)
            self._save_last(epoch + 1, 0, None, None)
            assert self._logger is not None
            self._logger.write_summary(self.history)
            self._logger.epoch(row)
            if self.progress:
                parts = [
                    f"{k}={row[k]:.4g}"
                    for k in ("train_loss", "val_loss", "val_top1", "val_top3")
                    if k in row
                ]
                tqdm.write(
                    f"{self.log_name} epoch {epoch + 1}/{self.cfg.epochs}: " + " ".join(parts),
                    file=sys.stderr,
                )
        if self.distributed:
            dist_utils.barrier()  # rank 0's checkpoint is on disk before any rank goes on
        run_epoch_end_hooks(self, row)
