"""Cached teacher outputs: exact rebuild of soft labels, the student sees the view the teacher scored,
the cache is reused across runs, and kd/meal-v2 train from it end to end."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from test_distill_cli import make_run, run_dir

from distill.cache import CachedViewDataset, TeacherCache, build_cache, collate_cached
from distill.teachers_runtime import FrozenTeacher
from imat.cli import main
from imat.data import apply_view, decode_image, resolve_paths


def test_dense_rebuild_is_exact_with_full_topk_and_fills_the_rest():
    probs = F.softmax(torch.randn(4, 2, 6), -1)  # [B, teachers, C]
    top_p, top_i = probs.topk(6, -1)
    cache = TeacherCache(top_i, top_p, torch.zeros(4, 1, 5), 6, ["a", "b"])
    assert torch.allclose(cache.dense(top_i, top_p), probs.mean(1), atol=1e-6)
    t = 2.0
    want = (F.softmax(probs.log() / t, -1)).mean(1)
    assert torch.allclose(cache.dense(top_i, top_p, t), want, atol=1e-5)
    # top-2 of 6: the rest is spread uniformly and rows sum to one
    p2, i2 = probs.topk(2, -1)
    d = cache.dense(i2, p2, 1.0, chosen=[0])
    assert torch.allclose(d.sum(-1), torch.ones(4))
    row = d[0]
    kept = i2[0, 0]
    assert torch.allclose(row[kept], p2[0, 0], atol=1e-6)
    others = torch.ones(6, dtype=torch.bool)
    others[kept] = False
    assert torch.allclose(row[others], ((1 - p2[0, 0].sum()) / 4).expand(4), atol=1e-6)
    assert cache.pick_counts() == {"pick_a": 2.0, "pick_b": 2.0}  # an explicit choice is not re-counted


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("cache"), n_train=12, n_val=6)


def test_student_sees_the_view_the_teacher_scored(run_cfg):
    run = run_dir(run_cfg)
    df = pd.read_parquet(run / "data" / "manifest.parquet")
    train = df[df["split"] == "train"].reset_index(drop=True).head(4)
    images = yaml.safe_load(run_cfg.read_text())["data"]["images"]
    torch.manual_seed(0)
    teacher = FrozenTeacher(
        "t", timm.create_model("resnet10t", num_classes=3).eval(), 40, (0.4,) * 3, (0.2,) * 3
    )
    index, prob, views = build_cache(
        [teacher],
        train,
        images,
        num_classes=3,
        topk=3,
        views_per_image=2,
        seed=5,
        scale=(0.35, 1.0),
        batch_size=3,
    )
    assert index.shape == (4, 2, 1, 3) and views.shape == (4, 2, 5)
    paths = resolve_paths(train, images)
    i, v = 2, 1
    img = decode_image(paths[i])
    crop = apply_view(img, views[i, v].tolist(), 40)
    x = (torch.from_numpy(crop).permute(2, 0, 1).float()[None] / 255 - 0.4) / 0.2
    with torch.no_grad():
        p = F.softmax(teacher.model(x), -1)[0]
    dense = torch.zeros(3).scatter_(0, index[i, v, 0].long(), prob[i, v, 0].float())
    assert torch.allclose(dense, p, atol=2e-3)
    # the same seed gives the same views; another seed others
    _, _, again = build_cache(
        [teacher], train, images, num_classes=3, topk=3, views_per_image=2, seed=5, scale=(0.35, 1.0)
    )
    assert torch.equal(again, views)
    # the dataset crops exactly that view (at the student's size) and carries its soft label
    cache = TeacherCache(index, prob, views, 3, ["t"])
    ds = CachedViewDataset(train, images, cache, 32, (0.5,) * 3, (0.25,) * 3, seed=1)
    item = ds[i]
    want = (
        torch.from_numpy(apply_view(img, views[i, item["view"]].tolist(), 32)).permute(2, 0, 1).float() / 255
        - 0.5
    ) / 0.25
    assert torch.allclose(item["image"], want, atol=1e-5)
    assert torch.equal(item["soft_index"], index[i, item["view"]])
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        seen.add(ds.view_of(i))
    assert seen == {0, 1}  # views change across epochs
    batch = collate_cached([ds[0], None, ds[1]])
    assert batch["soft_prob"].shape == (2, 1, 3) and batch["skipped"] == 1


@pytest.mark.parametrize("method,extra", [("kd", []), ("meal-v2", ["distill.blocks=[{index: logits}]"])])
def test_distill_from_cache_end_to_end_and_reuse(run_cfg, method, extra, capsys):
    args = [
        "distill",
        str(run_cfg),
        f"distill.method={method}",
        "distill.cache.enabled=true",
        "distill.cache.topk=2",
        "distill.cache.views_per_image=2",
        *extra,
        "--quiet",
    ]
    assert main(args) == 0, capsys.readouterr().err
    out = run_dir(run_cfg) / "student"
    cache_file = out / "teacher_cache" / "teacher_cache.safetensors"
    assert cache_file.is_file()
    summary = pd.read_csv(out / "summary.csv")
    assert np.isfinite(summary["train_loss"]).all() and summary["pick_ta"].iloc[0] > 0
    stamp = os.stat(cache_file).st_mtime_ns
    assert main(args) == 0
    assert os.stat(cache_file).st_mtime_ns == stamp  # reused, not rebuilt
    assert main([*args[:-1], "distill.cache.topk=3", "--quiet"]) == 0
    assert os.stat(cache_file).st_mtime_ns != stamp  # another k: rebuilt


def test_views_follow_the_flip_setting(run_cfg):
    run = run_dir(run_cfg)
    df = pd.read_parquet(run / "data" / "manifest.parquet")
    train = df[df["split"] == "train"].reset_index(drop=True)
    images = yaml.safe_load(run_cfg.read_text())["data"]["images"]
    teacher = FrozenTeacher(
        "t", timm.create_model("resnet10t", num_classes=3).eval(), 32, (0.5,) * 3, (0.25,) * 3
    )
    common = {"num_classes": 3, "topk": 2, "views_per_image": 4, "seed": 0, "scale": (0.35, 1.0)}
    _, _, flipped = build_cache([teacher], train, images, **common)
    _, _, unflipped = build_cache([teacher], train, images, **common, hflip=0.0)
    assert flipped[..., 4].any() and not unflipped[..., 4].any()
    assert torch.equal(flipped[..., :4], unflipped[..., :4])  # the same crops, only the flips differ


@pytest.mark.parametrize(
    "override,message",
    [
        ("distill.train.aug.preset=heavy", "not 'heavy'"),
        ("distill.train.aug.balanced_sampler=true", "balanced_sampler: not supported"),
    ],
)
def test_cache_refuses_augmentation_it_cannot_replay(run_cfg, override, message, capsys):
    args = ["distill", str(run_cfg), "distill.method=kd", "distill.cache.enabled=true", override, "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_cache_with_stage_blocks_is_one_line_error(run_cfg, capsys):
    code = main(["distill", str(run_cfg), "distill.cache.enabled=true", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "final outputs only (kd, meal-v2), not meal" in err
