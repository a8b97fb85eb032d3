"""A training recipe for the shared engine: used by every teacher and by the student."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from imat.config.base import Section


class AugConfig(Section):
    """Training augmentation (albumentations) and batch mixing (timm Mixup/CutMix)."""

    preset: Literal["none", "crop", "light", "medium", "heavy"] = "medium"
    """none: eval transform; crop: reflect-pad + random crop (CIFAR); light: random-resized crop (35-100% area); medium: + colour jitter and affine; heavy: 8-100% crops, stronger jitter and affine."""
    flips: bool = True
    """Random horizontal flips; false for classes a mirror image changes (digits, text)."""
    mixup: float = Field(0.0, ge=0.0)
    """timm Mixup alpha; 0 disables it."""
    cutmix: float = Field(0.0, ge=0.0)
    """timm CutMix alpha; 0 disables it."""
    mix_prob: float = Field(1.0, ge=0.0, le=1.0)
    """Probability that a batch is mixed when mixup or cutmix is on."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Label smoothing of the cross-entropy on labels."""
    balanced_sampler: bool = False
    """Sample classes uniformly (long-tailed training sets)."""


class TrainConfig(Section):
    """A training recipe for the shared engine: every teacher and the student have one."""

    epochs: int = Field(10, ge=1)
    """Training epochs."""
    batch_size: int = Field(64, ge=1)
    """Training batch size per rank."""
    eval_batch_size: int | None = Field(None, ge=1)
    """Validation batch size; unset: batch_size."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """The optimiser."""
    lr: float = Field(0.1, gt=0)
    """Base learning rate."""
    lr_base_batch: int | None = Field(None, ge=1)
    """The batch every lr is set for, rescaled to the global batch (batch_size x ranks x accum_steps); unset: batch_size."""
    lr_scale: Literal["auto", "linear", "sqrt", "none"] = "auto"
    """lr rule for global batch / lr_base_batch; auto: linear for SGD, sqrt for Adam-type optimisers."""
    accum_steps: int = Field(1, ge=1)
    """Gradient accumulation: batches per optimiser update."""
    weight_decay: float = Field(5e-4, ge=0)
    """Weight decay."""
    decay_norm_and_bias: bool = False
    """true: weight decay on every parameter; false: none on norms, biases and layer-scale (timm's rule)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    nesterov: bool = False
    """SGD with Nesterov momentum."""
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    """Learning-rate schedule after the warm-up."""
    milestones: list[int] = []
    """multistep: the epochs at which the lr is multiplied by lr_gamma."""
    lr_gamma: float = Field(0.1, gt=0)
    """multistep: the factor applied at each milestone."""
    warmup_epochs: float = Field(0.0, ge=0)
    """Linear warm-up, in epochs (fractions allowed)."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """cosine: the floor, as a fraction of lr."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision; bf16/fp16 fall back to fp32 with a warning on a CPU without fast bf16."""
    channels_last: bool = False
    """Channels-last memory layout for the model and its inputs."""
    compile: bool = False
    """torch.compile the model."""
    ema: bool = False
    """Keep an exponential moving average of the weights (timm ModelEmaV3) and evaluate it."""
    ema_decay: float = Field(0.999, gt=0, lt=1)
    """ema: decay per step."""
    grad_clip: float | None = Field(None, gt=0)
    """Clip the gradients' global norm to this; unset: no clipping."""
    # skipped as fp16's GradScaler does: a rare bad gradient (overflow, a faulty kernel) costs one step
    nonfinite_grad_patience: int = Field(5, ge=0)
    """Steps with NaN/inf gradients (finite loss) are skipped; this many in a row stop the run."""
    ckpt_every_steps: int = Field(0, ge=0)
    """Also write last.ckpt every this many steps; 0: only at the end of each epoch."""
    best_metric: Literal["top1", "top3", "loss"] = "top1"
    """The validation metric that picks the epoch kept as best.safetensors."""
    seed: int = 0
    """Seed of initialisation, data order and augmentation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto: a GPU when there is one (distributed: each rank's own GPU)."""
    sync_bn: bool = False
    """Distributed GPUs: SyncBatchNorm instead of averaging every rank's BN statistics at each epoch end."""
    max_steps_per_epoch: int | None = Field(None, ge=1)
    """Cap on steps per epoch, for smoke runs and CPU-sized benchmarks."""
    aug: AugConfig = AugConfig()
    """Training augmentation."""
