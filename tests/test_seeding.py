"""One seed, one start: every distillation method builds its student (and heads, discriminators)
after the run's seed is set, so runs that differ only in the method start from the same weights."""

from __future__ import annotations

import pandas as pd
import torch
from scale_kit import make_run

from imat.app.cli import main


def test_every_method_starts_from_the_same_student(tmp_path, monkeypatch):
    from imat.engine import Engine

    starts: list[dict[str, dict[str, torch.Tensor]]] = []

    def record_start(self, resume=False):  # the weights fit() would start from; no training needed
        starts.append(
            {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in self.task.modules().items()}
        )
        return pd.DataFrame()

    monkeypatch.setattr(Engine, "fit", record_start)
    cfg = make_run(tmp_path, extra={"distill.blocks": [{"index": "logits"}]})
    runs = [("ce", "0"), ("meal", "0"), ("meal", "0"), ("ce", "1")]
    for method, seed in runs:
        torch.rand(7)  # whatever ran before in the process must not matter
        code = main(
            ["distill", str(cfg), f"distill.method={method}", f"distill.train.seed={seed}", "--quiet"]
        )
        assert code == 0
    ce, meal, meal_again, ce_seed1 = starts
    for key, value in ce["model"].items():
        assert torch.equal(value, meal["model"][key]), key  # CE and MEAL: the same initial student
    assert "disc" in meal and all(torch.equal(v, meal_again["disc"][k]) for k, v in meal["disc"].items())
    assert any(not torch.equal(v, ce_seed1["model"][k]) for k, v in ce["model"].items())  # the seed counts
