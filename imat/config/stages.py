"""`tune:`, `export:` and `submit:` — sweeping, exporting and writing the leaderboard file."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from imat.config.base import Section


class TuneConfig(Section):
    """`imat tune`: a Ray Tune sweep of the distillation (docs/SCALING.md)."""

    space: dict[str, Any] = {}
    """Dotted config key -> {type: loguniform|uniform|quniform|randint|choice, low/high/q or values}; empty: the student's lr, MEAL's D lr and logits gamma."""
    samples: int = Field(4, ge=1)
    """Number of trials."""
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    """Trial scheduler: asha stops poor trials early, pbt perturbs the best, fifo runs every trial to the end."""
    search: Literal["random", "optuna"] = "random"
    """How trials are proposed: random, or optuna (TPE through Ray Tune's OptunaSearch)."""
    max_failures: int = Field(1, ge=-1)
    """Retries of a failed trial from its last checkpoint (-1: unlimited)."""
    workers_per_trial: int = Field(1, ge=1)
    """More than 1: each trial is a Ray Train TorchTrainer of this many data-parallel workers."""
    metric: str = "val_top3_err"
    """The metric the sweep optimises: any numeric column of the student's summary.csv."""
    mode: Literal["min", "max"] = "min"
    """Whether the metric is minimised or maximised."""
    grace_period: int = Field(1, ge=1)
    """asha: epochs every trial gets before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1)
    """asha: the factor by which each rung cuts the trials."""
    perturbation_interval: int = Field(1, ge=1)
    """pbt: epochs between exploit/explore steps."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept per trial: the best by metric, plus the latest (pbt: at least 3)."""
    cpus_per_trial: float | None = Field(None, gt=0)
    """CPUs per trial (per worker when workers_per_trial > 1); unset: Ray's default."""
    gpus_per_trial: float | None = Field(None, ge=0)
    """GPUs per trial (per worker likewise); fractions pack several trials on one GPU."""
    max_concurrent: int | None = Field(None, ge=1)
    """At most this many trials at once; unset: as many as the resources allow."""
    storage: str | None = None
    """Where Ray Tune keeps the sweep; unset: RUN_DIR/tune (shared storage on a cluster)."""
    address: str | None = None
    """Ray cluster address; unset: RAY_ADDRESS, or a local Ray."""


class ExportConfig(Section):
    """`imat export`: the student to ONNX, verified against PyTorch."""

    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    """Weights and arithmetic of the exported model."""
    target: Literal["cpu", "gpu"] = "cpu"
    """Where the model will run: int8 is U8S8 for the CPU provider, symmetric S8S8 for TensorRT and CUDA."""
    opset: int = Field(18, ge=11)
    """ONNX opset (the dynamo exporter needs 18 and raises a lower one to it)."""
    exporter: Literal["auto", "dynamo", "legacy"] = "auto"
    """torch.onnx exporter; auto: dynamo, falling back to the legacy one."""
    with_softmax: bool = False
    """Put a softmax in the graph: the model outputs probabilities instead of logits."""
    topk_in_graph: int | None = Field(None, ge=1)
    """Also output the top k scores and class indices from the graph."""
    calibration_images: int = Field(256, ge=1)
    """int8: training images for static quantisation."""
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    """int8: onnxruntime's calibration method (minmax, percentile, entropy)."""
    quantize_head: bool = False
    """int8: also quantise the final classifier (default: keep it in float)."""
    verify_images: int = Field(256, ge=1)
    """Validation images on which the exported model is compared with PyTorch."""
    max_accuracy_drop: float = Field(0.5, ge=0, le=100)
    """Points of top-1 or top-3 accuracy the model may lose on the labelled verification images; beyond, nothing is written."""
    min_top3_agreement: float = Field(0.99, ge=0, le=1)
    """Without labelled verification images: share whose top-3 set must equal PyTorch's; below it nothing is written."""
    exclude_nodes: list[str] = []
    """int8: nodes of the pre-processed graph kept in float (names as in --exclude-nodes)."""
    float_fallback: bool = True
    """int8: when the accuracy drop is too large, retry once with the first conv and the last layer in float."""


class BudgetLimits(Section):
    """`submit.budget` as limits: a candidate must meet every limit given."""

    images_per_s: float | None = Field(None, gt=0)
    """The slowest accepted: images/s at submit.batch_size on submit.provider, divided by the TTA views."""
    params: int | None = Field(None, ge=1)
    """The most parameters accepted (an ensemble counts every member)."""


class SubmitConfig(Section):
    """`imat predict` and `imat submit`: inference and the leaderboard file."""

    format: Literal["product2019", "furniture2018", "coco"] = "product2019"
    """The submission file's layout."""
    topk: int = Field(3, ge=1)
    """Labels per test image in the submission."""
    provider: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"
    """onnxruntime execution provider; auto: TensorRT, then CUDA, then CPU, whichever is available."""
    batch_size: int = Field(64, ge=1)
    """Inference batch size."""
    tta_flip: bool = False
    """Average each image's scores with its horizontal flip's."""
    tta_scales: list[float] = [1.0]
    """TTA: also resize then centre-crop at these scales (e.g. [1.0, 1.15]); probabilities averaged over the views."""
    prior_correction: bool | Literal["auto"] = False
    """Correct the scores for the training set's class frequencies (toward a uniform test prior); auto: only when the select step finds it helps on held-out validation."""
    sample_submission: str | None = None
    """The competition's sample submission, whose id order and header the file follows."""
    # default: the format's leaderboard metric: top3 for product2019 and coco, top1 for furniture2018 and
    # coco with topk 1
    select_by: Literal["top1", "top3"] | None = None
    """The validation metric that picks the submitted model (pipeline.submit_model best); unset: the format's."""
    budget: Literal["student", "none"] | BudgetLimits = "student"
    """What the select step may submit: student (a student without TTA, as before budgets), none (the most accurate candidate), or limits {images_per_s, params} (docs/SUBMISSION.md)."""
    tta_search: bool = True
    """Select step: also try each model with flip and multi-scale TTA (chosen on held-out validation)."""
    tta_search_scales: list[float] = [1.0, 1.15]
    """Select step: the scales of the multi-scale TTA tried."""
    pool_candidates: bool = True
    """Select step: also compare the teacher pool (and its greedy selection) exported as one model."""

    @field_validator("tta_scales", "tta_search_scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if not v or any(s <= 0 for s in v) or len(set(v)) != len(v):
            raise ValueError("scales must be distinct positive numbers, e.g. [1.0, 1.15]")
        return v
