"""`tune:`, `export:` and `submit:` — sweeping, exporting and writing the leaderboard file."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from imat.config.base import Section


class TuneConfig(Section):
    # dotted config key -> {type: loguniform|uniform|quniform|randint|choice, low/high/q or values};
    # empty: the default space (distill.tune_space.default_space: the student's lr, MEAL's D lr and gamma)
    space: dict[str, Any] = {}
    samples: int = Field(4, ge=1)
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    search: Literal["random", "optuna"] = "random"  # optuna: TPE through Ray Tune's OptunaSearch
    max_failures: int = Field(1, ge=-1)  # retries of a failed trial (-1: unlimited), from its checkpoint
    # > 1: each trial is a TorchTrainer of this many data-parallel workers (Ray Train inside Tune)
    workers_per_trial: int = Field(1, ge=1)
    metric: str = "val_top3_err"  # any numeric column of the student's summary.csv
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(1, ge=1)  # asha: epochs every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)  # asha
    perturbation_interval: int = Field(1, ge=1)  # pbt: epochs between exploit/explore steps
    keep_checkpoints: int = Field(2, ge=1)  # per trial, the most recent ones (pbt: at least 3)
    cpus_per_trial: float | None = Field(None, gt=0)  # per worker when workers_per_trial > 1
    gpus_per_trial: float | None = Field(None, ge=0)  # fractions share a GPU; per worker likewise
    max_concurrent: int | None = Field(None, ge=1)
    storage: str | None = None  # default RUN_DIR/tune
    address: str | None = None  # Ray cluster; default RAY_ADDRESS or a local Ray


class ExportConfig(Section):
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    # where the model will run: int8 is U8S8 for the CPU provider, symmetric S8S8 for TensorRT/CUDA
    target: Literal["cpu", "gpu"] = "cpu"
    opset: int = Field(18, ge=11)  # the dynamo exporter needs >= 18 and raises it to 18 when lower
    exporter: Literal["auto", "dynamo", "legacy"] = "auto"  # auto: dynamo, falling back to legacy
    with_softmax: bool = False
    topk_in_graph: int | None = Field(None, ge=1)
    calibration_images: int = Field(256, ge=1)  # int8: training images for static quantisation
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    quantize_head: bool = False  # int8: also quantise the final classifier (default: keep it float)
    verify_images: int = Field(256, ge=1)  # validation images compared against PyTorch
    min_top3_agreement: float = Field(0.99, ge=0, le=1)  # same top-3 set as PyTorch; below: refuse


class SubmitConfig(Section):
    format: Literal["product2019", "furniture2018", "coco"] = "product2019"
    topk: int = Field(3, ge=1)
    provider: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"
    batch_size: int = Field(64, ge=1)
    tta_flip: bool = False
    prior_correction: bool = False
    sample_submission: str | None = None  # id order and header to follow, when the competition has one
    # the validation metric that picks the submitted student (pipeline.submit_model=best); default the
    # format's leaderboard metric: top3 for product2019 and coco, top1 for furniture2018 and coco topk=1
    select_by: Literal["top1", "top3"] | None = None
