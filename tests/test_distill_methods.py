"""A distillation method is one file: a toy method registered from this test file runs through
`imat distill`, with its own option, check, teacher selection and tune space; unknown names and options
are one-line errors."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_distill_cli import run_cfg, run_dir  # noqa: F401  (run_cfg is a fixture)

from distill.methods import DistillMethod, MethodInputs, get_method, method_names, register_method
from distill.tasks import DistillTaskBase, hard_loss
from distill.teachers_runtime import FrozenTeacher
from imat.app.cli import main
from imat.config.distill import DistillConfig
from imat.errors import ImatError
from imat.weights import read_meta


class LogitRegressionTask(DistillTaskBase):
    """The student's logits regress the teachers' mean logits (scaled), plus the hard labels."""

    def __init__(self, inputs: MethodInputs, scale: float, smoothing: float) -> None:
        super().__init__(inputs.student, smoothing)
        assert inputs.ensemble is not None
        self.ensemble = inputs.ensemble
        self.mean, self.std = inputs.student_data["mean"], inputs.student_data["std"]
        self.scale = scale

    def frozen_teachers(self) -> list[FrozenTeacher]:
        return self.ensemble.teachers

    def step(self, batch: dict[str, Any], ctx: Any) -> dict[str, torch.Tensor]:
        x = batch["image"]
        with self._autocast(ctx):
            logits = self.model(x)
            outs = [
                self.ensemble.teachers[i].blocks(x, ["logits"], self.mean, self.std)[0]
                for i in self.ensemble.pick()
            ]
        target = torch.stack([o.float() for o in outs]).mean(0)
        mse = F.mse_loss(logits.float(), target)
        ce = hard_loss(logits, batch["label"], self.label_smoothing)
        return {"loss": self.scale * mse + ce, "logit_mse": mse.detach(), "ce": ce.detach()}


@register_method
class ToyLogitRegression(DistillMethod):
    name = "toy-mse"
    options = {"scale": 1.0}

    @classmethod
    def check(cls, dcfg: DistillConfig) -> None:
        if cls.settings(dcfg)["scale"] <= 0:
            raise ImatError(f"distill.options.scale: must be > 0 (got {dcfg.options['scale']})")

    @classmethod
    def tune_space(cls, cfg: Any) -> dict[str, dict[str, Any]]:
        return {"distill.options.scale": {"type": "loguniform", "low": 0.1, "high": 10.0}}

    @classmethod
    def build_task(cls, dcfg: DistillConfig, inputs: MethodInputs) -> DistillTaskBase:
        return LogitRegressionTask(inputs, float(cls.settings(dcfg)["scale"]), dcfg.train.aug.label_smoothing)


def test_the_built_in_methods_are_registered_by_name():
    assert {"ce", "kd", "meal", "meal-v2"} <= set(method_names())
    assert not get_method("ce").needs_teachers and get_method("kd").uses_cache
    assert get_method("meal-v2").uses_cache and not get_method("meal").uses_cache


def test_a_method_registered_from_a_test_file_runs_through_imat_distill(run_cfg, capsys):  # noqa: F811
    out = run_dir(run_cfg) / "student"
    for f in ("summary.csv", "best.safetensors", "last.ckpt"):
        (out / f).unlink(missing_ok=True)
    code = main(["distill", str(run_cfg), "distill.method=toy-mse", "distill.options.scale=0.5", "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = pd.read_csv(out / "summary.csv")
    assert {"train_logit_mse", "train_ce", "val_top1"} <= set(summary.columns)
    assert (summary["train_logit_mse"] > 0).all()
    meta = read_meta(out / "best.safetensors")
    assert meta["method"] == "toy-mse" and meta["teacher_selection"] == "mean"
    assert meta["teachers"] == ["ta", "tb"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["distill.method=toy-mse", "distill.options.scale=-1"], "distill.options.scale: must be > 0"),
        (
            ["distill.method=kd", "distill.options.scale=2"],
            "distill.options.scale: method kd takes no option",
        ),
        (["distill.method=toy-mse", "distill.options.beta=2"], "takes no option 'beta' (takes: scale)"),
    ],
)
def test_a_methods_options_are_checked_in_one_line(run_cfg, overrides, message, capsys):  # noqa: F811
    code = main(["distill", str(run_cfg), *overrides, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.count("\n") == 1


def test_the_default_sweep_comes_from_the_method():
    from distill.tune_space import default_space
    from imat.config import RunConfig

    cfg = RunConfig.model_validate({"distill": {"method": "toy-mse"}})
    assert list(default_space(cfg)) == ["distill.train.lr", "distill.options.scale"]
    meal = RunConfig.model_validate({"distill": {"method": "meal"}})
    assert "distill.adversarial.lr" in default_space(meal)


def test_a_name_is_registered_once():
    class Other(DistillMethod):
        name = "toy-mse"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Other)
    with pytest.raises(ImatError, match="distill.method: unknown method 'nope'"):
        get_method("nope")
