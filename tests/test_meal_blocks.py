"""MEAL's per-block information figures (teacher entropy against ln L, the KL term) and the warning for
a stage block pooled longer than its feature map."""

from __future__ import annotations

import logging
import math

import pytest
import timm
import torch
from meal_kit import Ctx, batch, make_meal, meal_task, tiny

from distill.methods.meal import stage_map_sizes, warn_small_blocks
from distill.teachers_runtime import FrozenTeacher, TeacherEnsemble
from imat.config.distill import DistillConfig


def test_each_block_logs_teacher_entropy_against_ln_l_and_the_kl_term():
    task = make_meal("alternating", teachers=1, adversarial=False)
    out = Ctx(task).run(task, batch(n=4))
    extras = task.epoch_extras()
    for k, width in enumerate((20, 5)):  # block 0: stage 2 pooled to 20; block 1: the logits of 5 classes
        assert extras[f"t_entropy_uniform_b{k}"] == pytest.approx(math.log(width))
        assert 0 <= extras[f"t_entropy_b{k}"] <= math.log(width) + 1e-5
        assert extras[f"sim_kl_b{k}"] >= 0
        # the soft CE is the teacher's entropy plus the KL: only the KL can be reduced by alignment
        got = extras[f"t_entropy_b{k}"] + extras[f"sim_kl_b{k}"]
        assert got == pytest.approx(float(out[f"sim_b{k}"]), rel=1e-4)
    assert "t_entropy_b0" not in task.epoch_extras()  # reset each epoch


def test_the_kl_term_falls_when_the_student_trains_on_the_block():
    task = make_meal("alternating", teachers=1, adversarial=False)
    ctx = Ctx(task, lr=0.02)
    b = batch(n=8)
    ctx.run(task, b)
    first = task.epoch_extras()["sim_kl_b0"]
    for _ in range(15):
        ctx.run(task, b)
    task.epoch_extras()
    ctx.run(task, b)
    assert task.epoch_extras()["sim_kl_b0"] < first


def test_a_stage_pooled_longer_than_its_map_is_named_with_a_stage_that_fits(caplog):
    model = timm.create_model("resnet10t", num_classes=3)
    assert stage_map_sizes(model, 32) == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    dcfg = DistillConfig(
        blocks=[{"index": -2, "length": 16}, {"index": 2, "length": 16}, {"index": "logits"}]
    )
    with caplog.at_level(logging.WARNING):
        msgs = warn_small_blocks(dcfg, "student resnet10t", model, (3, 32, 32), [3, 2, "logits"])
    assert msgs == [
        "distill.blocks.0: stage -2 of student resnet10t is 2x2 at 32 px (4 positions) for length 16: its "
        "vector repeats values; use stage 2 (4x4) or length <= 4"
    ]
    assert msgs[0] in caplog.text and "\n" not in msgs[0]
    assert warn_small_blocks(dcfg, "teacher t", model, 64, [3, 2, "logits"]) == []  # 4x4 at 64 px: fits


def test_a_stage_blocks_own_temperature_sharpens_its_targets_and_leaves_the_logits_alone():
    def extras(block_t):
        torch.manual_seed(0)
        ens = TeacherEnsemble([FrozenTeacher("t", tiny(1), 32, (0.5,) * 3, (0.25,) * 3)], "mean")
        temps = [block_t, None]
        task = meal_task(
            tiny(100),
            ens,
            [2, "logits"],
            [[2, "logits"]],
            [20, None],
            5,
            adversarial={"enabled": False},
            block_temperatures=temps,
        )
        Ctx(task).run(task, batch(n=4))
        return task.epoch_extras()

    base, sharp = extras(None), extras(0.05)
    assert sharp["t_entropy_b0"] < base["t_entropy_b0"] - 0.02
    assert sharp["t_entropy_b1"] == pytest.approx(
        base["t_entropy_b1"], rel=1e-4
    )  # logits: distill.temperature


def test_by_default_stage_blocks_take_the_strongest_channel_at_block_temperature_and_logits_keep_theirs():
    from distill.methods.meal import MealTask, ResolvedBlocks

    ens = TeacherEnsemble([FrozenTeacher("t", tiny(1), 32, (0.5,) * 3, (0.25,) * 3)], "mean")
    dcfg = DistillConfig(blocks=[{"index": 1, "length": 16}, {"index": "logits"}], temperature=2.0)
    blocks = ResolvedBlocks([1, "logits"], [[1, "logits"]])
    task = MealTask(tiny(100), ens, dcfg, blocks, {"mean": (0.5,) * 3, "std": (0.25,) * 3}, 5)
    assert [a.channel_reduce for a in task.aligners] == ["max", "max"]
    assert task.temperatures == [0.5, 2.0]
    own = dcfg.model_copy(
        update={"blocks": [dcfg.blocks[0].model_copy(update={"temperature": 0.2}), dcfg.blocks[1]]}
    )
    assert MealTask(
        tiny(100), ens, own, blocks, {"mean": (0.5,) * 3, "std": (0.25,) * 3}, 5
    ).temperatures == [0.2, 2.0]
