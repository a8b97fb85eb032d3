"""`distill:` — the student, the method (MEAL v1/v2, KD, CE), blocks, losses and the adversarial game."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from imat.config.base import Section
from imat.config.models import ModelSpec
from imat.config.train import TrainConfig


class BlockSpec(Section):
    """One matched block: a stage index of both networks (or "logits"), its pooled length and weights."""

    index: int | Literal["logits"] = "logits"
    """Stage index into timm's forward_intermediates (negative counts from the end, per network), or `logits`."""
    length: int | None = Field(None, ge=1)
    """Pooled length L of a stage's aligned vector; ignored for logits (the class count is used)."""
    gamma: float = Field(1.0, ge=0)
    """Weight of this block's similarity loss."""
    eta: float = Field(1.0, ge=0)
    """Weight of this block's discriminator loss."""
    temperature: float | None = Field(None, gt=0)
    """A stage block's own softmax temperature; unset: distill.block_temperature (the logits block always uses distill.temperature)."""


class AdversarialConfig(Section):
    """The discriminators. Defaults are the ones under which they learn (distill/discriminator.py)."""

    enabled: bool = True
    """Train one discriminator per block against the student (MEAL's adversarial term)."""
    mode: Literal["alternating", "grl", "joint"] = "alternating"
    """alternating: a D step, then a student step; grl: one step through a gradient-reversal layer; joint: the official code's cooperative update."""
    widths: list[int] | Literal["paper"] | None = None
    """Hidden widths of each discriminator; unset: max(64, d/2), max(32, d/4) with LeakyReLU; `paper`: d/2, d/4 with ReLU."""
    input_norm: Literal["auto", "log_softmax", "standardize", "none"] = "auto"
    """What a discriminator sees: auto is log_softmax for the logits block, standardize for a stage block."""
    spectral_norm: bool = False
    """Spectral normalisation on the discriminators' linear layers."""
    # 1e-2 with the student's adversarial weight 0.1: D separates early and drifts toward chance as the
    # student catches up; at 1e-3 it stayed near chance, and at weight 1 a D that learns tore the student
    # down (docs/BENCHMARKS.md, Discriminators)
    lr: float = Field(1e-2, gt=0)
    """The discriminators' own base learning rate, scheduled like the student's."""
    weight_decay: float = Field(0.0, ge=0)
    """The discriminators' weight decay."""
    # SGD at lr 1e-3 never leaves chance
    optimizer: Literal["auto", "same", "sgd", "adam", "adamw"] = "auto"
    """Alternating mode: the discriminators' optimiser; auto is adam there, same is the student's recipe optimiser."""
    betas: tuple[float, float] = (0.5, 0.999)
    """Adam/AdamW betas of the discriminators' optimiser."""
    grl_lambda: float = Field(1.0, gt=0)
    """grl mode: the gradient-reversal layer's scale."""
    # joint mode adds the discriminators' loss as it is (the official code), so any other weight is refused
    weight: float | None = Field(None, ge=0)
    """Scale of the student's adversarial loss; unset: 0.1, and 1 in joint mode."""
    d_steps: int = Field(1, ge=1)
    """Alternating mode: discriminator updates per student step (GANs' n_critic)."""
    per_teacher: bool = False
    """One discriminator per block and teacher when one teacher is drawn per step (random or weighted)."""
    # the paper's unconditional D is fooled by confident-looking outputs from the first epoch
    condition: Literal["teacher_class", "none"] = "teacher_class"
    """teacher_class: D also gets the class the teacher predicts (a projection discriminator); none: the paper's."""

    def student_weight(self) -> float:
        """The weight actually used: the configured one, else 1 in joint mode and 0.1 otherwise."""
        if self.weight is not None:
            return self.weight
        return 1.0 if self.mode == "joint" else 0.1


class CacheConfig(Section):
    """Offline teacher outputs: top-k probabilities per image and random crop, reused across epochs."""

    enabled: bool = False
    """Distil from cached teacher outputs instead of running the teachers every step (kd, meal-v2)."""
    topk: int = Field(10, ge=1)
    """Probabilities kept per cached view: the teacher's top k."""
    views_per_image: int = Field(4, ge=1)
    """Random crops cached per training image."""
    dir: str | None = None
    """Where the cache is written; unset: RUN_DIR/student/teacher_cache."""


class DistillConfig(Section):
    """The student, the distillation method and its losses."""

    # checked by the registry in distill.methods: the core config cannot know the methods a later layer
    # registers
    method: str = Field("meal", min_length=1)
    """A registered method: meal (v1: blocks, one teacher per step, discriminators), meal-v2 (mean of the teachers on the logits), kd (Hinton), ce (no teachers), or one of your own (docs/ARCHITECTURE.md)."""
    student: ModelSpec = ModelSpec(arch="resnet18")
    """The student network: a timm ResNet unless allow_any_student."""
    pool: str | None = None
    """The teacher pool directory; unset: the run's teachers directory."""
    teachers: list[str] | Literal["selected"] | None = None
    """A subset of the pool by name, or `selected` for the pool's greedy selection; unset: every teacher."""
    # default (distill.settings): weighted for meal when pool.json has every teacher's val_top1, else
    # random; mean for the other methods
    selection: Literal["random", "weighted", "mean"] | None = None
    """How teachers are used each step: weighted (one, drawn by validation accuracy), random (one, uniform), mean (all); unset: weighted for meal when pool.json has every teacher's accuracy, else random; mean for the others."""
    selection_temperature: float = Field(0.03, gt=0)
    """weighted: a teacher is drawn with probability softmax(val_top1 / this)."""
    blocks: list[BlockSpec] = [BlockSpec()]
    """The matched blocks (meal): stages and/or the logits, each with its weights."""
    spatial_pool: Literal["avg", "max"] = "avg"
    """Aligner: how a stage's spatial positions are pooled to the block's length."""
    # max: a stage's channel mean is nearly flat over positions, so its softmax is nearly uniform and the
    # block teaches nothing; the strongest channel per position is not (docs/MEAL.md, stage blocks)
    channel_reduce: Literal["avg", "max"] = "max"
    """Aligner: how the pooled channels are reduced to one vector (avg is MEAL's official aligner)."""
    similarity: Literal["ce", "kl", "l1", "l2", "l1_soft", "l2_soft"] = "ce"
    """The similarity loss between teacher and student vectors (ce: soft cross-entropy)."""
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature of the soft targets."""
    block_temperature: float = Field(0.5, gt=0)
    """Softmax temperature of the stage blocks (a block's own temperature overrides it); below 1 because a stage's aligned vector varies far less than logits do."""
    hard_label_weight: float = Field(0.0, ge=0)
    """Weight of cross-entropy on the labels beside the teachers' targets (both MEAL papers use none)."""
    kd_alpha: float = Field(0.9, ge=0, le=1)
    """kd: weight of the soft loss (1 - kd_alpha goes to the hard labels)."""
    teacher_train_mode: bool = False
    """Legacy: run the teachers' BatchNorm in train mode, as MEAL v1's code did."""
    # a timm ResNet is what the method was validated on and what export/inference is tuned for
    allow_any_student: bool = False
    """Allow any timm model with forward_intermediates as the student, not only ResNets (at your own risk)."""
    seed: int | None = None
    """Seed of the teacher draw; unset: train.seed."""
    # whether a competition's rules allow training on its test images is the team's call
    extra_images: str | None = None
    """Unlabelled images the student learns from the teachers' targets only: `test`, a folder, a manifest or a competition file."""
    adversarial: AdversarialConfig = AdversarialConfig()
    """The discriminators (meal, meal-v2)."""
    cache: CacheConfig = CacheConfig()
    """Offline teacher outputs (kd, meal-v2)."""
    train: TrainConfig = TrainConfig()
    """The student's training recipe."""
    options: dict[str, Any] = {}
    """A registered method's own settings by name; each method declares the ones it takes, with defaults, and checks them (distill/methods/)."""
