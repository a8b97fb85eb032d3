"""`distill:` — the student, the method (MEAL v1/v2, KD, CE), blocks, losses and the adversarial game."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from imat.config.base import Section
from imat.config.models import ModelSpec
from imat.config.train import TrainConfig


class BlockSpec(Section):
    """One matched block: a stage index of both networks (or "logits"), its pooled length and weights."""

    index: int | Literal["logits"] = "logits"  # stage index into forward_intermediates, negatives allowed
    length: int | None = Field(None, ge=1)  # L_k; ignored for logits (the class count is used)
    gamma: float = Field(1.0, ge=0)  # similarity weight
    eta: float = Field(1.0, ge=0)  # discriminator weight


class AdversarialConfig(Section):
    """The discriminators. Defaults are the ones under which they learn (distill/discriminator.py)."""

    enabled: bool = True
    mode: Literal["alternating", "grl", "joint"] = "alternating"
    # hidden widths; default max(64, d/2), max(32, d/4) with LeakyReLU; "paper": d/2, d/4 with ReLU
    widths: list[int] | Literal["paper"] | None = None
    # auto: log_softmax for the logits block, standardize for a stage block (distill/discriminator.py)
    input_norm: Literal["auto", "log_softmax", "standardize", "none"] = "auto"
    spectral_norm: bool = False
    # the discriminators' own base lr, scheduled like the student's. 1e-2 with the student's adversarial
    # weight 0.1: D separates early and drifts toward chance as the student catches up; at 1e-3 it stayed
    # near chance, and at weight 1 a D that learns tore the student down (docs/BENCHMARKS.md)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # alternating mode only (D has its own optimiser there). auto: adam in alternating mode, the student's
    # optimiser otherwise; "same" = the student's recipe optimiser (SGD at lr 1e-3 never leaves chance)
    optimizer: Literal["auto", "same", "sgd", "adam", "adamw"] = "auto"
    betas: tuple[float, float] = (0.5, 0.999)  # for adam/adamw
    grl_lambda: float = Field(1.0, gt=0)
    # scale of the student's adversarial loss (see lr); unset: 0.1, and 1 in joint mode, which adds the
    # discriminators' loss as it is (the official code) so any other weight is refused there
    weight: float | None = Field(None, ge=0)
    d_steps: int = Field(1, ge=1)  # alternating: discriminator updates per student step (GANs' n_critic)
    # one discriminator per block AND teacher when one teacher is drawn per step (random/weighted)
    per_teacher: bool = False
    # teacher_class: D also gets the class the teacher predicts for the image (a projection
    # discriminator); none: the paper's unconditional D, which a student fools with confident-looking
    # outputs from the first epoch (distill/discriminator.py)
    condition: Literal["teacher_class", "none"] = "teacher_class"

    def student_weight(self) -> float:
        """The weight actually used: the configured one, else 1 in joint mode and 0.1 otherwise."""
        if self.weight is not None:
            return self.weight
        return 1.0 if self.mode == "joint" else 0.1


class CacheConfig(Section):
    """Offline teacher outputs: top-k probabilities per image and random crop, reused across epochs."""

    enabled: bool = False
    topk: int = Field(10, ge=1)
    views_per_image: int = Field(4, ge=1)
    dir: str | None = None  # default RUN_DIR/student/teacher_cache


class DistillConfig(Section):
    method: Literal["meal", "meal-v2", "kd", "ce"] = "meal"
    student: ModelSpec = ModelSpec(arch="resnet18")
    pool: str | None = None  # teacher pool dir; default the run's teachers dir
    # subset of the pool by name; "selected": the pool's greedy selection (`imat teachers eval`); default all
    teachers: list[str] | Literal["selected"] | None = None
    # weighted: one teacher per step, drawn with probability softmax(val_top1 / selection_temperature)
    # from pool.json; random: one drawn uniformly; mean: all. Default: weighted for meal when pool.json
    # has every teacher's val_top1 (else random), mean for the other methods (distill.settings)
    selection: Literal["random", "weighted", "mean"] | None = None
    selection_temperature: float = Field(0.03, gt=0)
    blocks: list[BlockSpec] = [BlockSpec()]
    spatial_pool: Literal["avg", "max"] = "avg"
    channel_reduce: Literal["avg", "max"] = "avg"
    similarity: Literal["ce", "kl", "l1", "l2", "l1_soft", "l2_soft"] = "ce"
    temperature: float = Field(1.0, gt=0)
    hard_label_weight: float = Field(0.0, ge=0)
    kd_alpha: float = Field(0.9, ge=0, le=1)  # kd: weight of the soft loss (1 - alpha on hard labels)
    teacher_train_mode: bool = False  # legacy: teachers' BN in train mode, as MEAL v1's code did
    # The student must be a timm ResNet (ResNet/ResNeXt/SE-ResNet/ResNet-D/wide variants): that is what the
    # method was validated on and what export/inference is tuned for. Set true to distil into any timm
    # model that has forward_intermediates (at your own risk).
    allow_any_student: bool = False
    seed: int | None = None  # teacher-selection RNG; default train.seed
    # Unlabelled images that join the student's training data with teacher targets only: "test" (the
    # manifest's test split), or a folder, a manifest (.parquet) or a competition file (images under
    # data.images). Whether a competition's rules allow training on its test images is the team's call.
    extra_images: str | None = None
    adversarial: AdversarialConfig = AdversarialConfig()
    cache: CacheConfig = CacheConfig()
    train: TrainConfig = TrainConfig()
