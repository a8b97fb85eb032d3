"""A training recipe for the shared engine: used by every teacher and by the student."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from imat.config.base import Section


class AugConfig(Section):
    preset: Literal["none", "crop", "light", "medium", "heavy"] = "medium"
    flips: bool = True  # false for classes a mirror image changes (digits, text)
    mixup: float = Field(0.0, ge=0.0)  # timm Mixup alpha; 0 disables
    cutmix: float = Field(0.0, ge=0.0)  # timm CutMix alpha; 0 disables
    mix_prob: float = Field(1.0, ge=0.0, le=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    balanced_sampler: bool = False  # sample classes uniformly (long-tailed training sets)


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    # true: weight decay on every parameter; false: none on norms, biases, layer-scale (timm's rule)
    decay_norm_and_bias: bool = False
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[int] = []  # epochs, for multistep
    lr_gamma: float = Field(0.1, gt=0)  # multistep factor
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine floor as a fraction of lr
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    ema: bool = False
    ema_decay: float = Field(0.999, gt=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    # Steps whose gradients are NaN/inf (the loss being finite) are skipped, as fp16's GradScaler does;
    # this many in a row stop the run. A rare bad gradient (overflow, a faulty kernel) costs one step.
    nonfinite_grad_patience: int = Field(5, ge=0)
    ckpt_every_steps: int = Field(0, ge=0)  # 0: only at the end of each epoch
    best_metric: Literal["top1", "top3", "loss"] = "top1"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # distributed: auto/cuda = each rank's own GPU
    # distributed on GPUs: SyncBatchNorm (batch statistics over all ranks every step) instead of
    # averaging every rank's running statistics at each epoch end
    sync_bn: bool = False
    max_steps_per_epoch: int | None = Field(None, ge=1)  # cap for smoke runs and CPU-sized benchmarks
    aug: AugConfig = AugConfig()
