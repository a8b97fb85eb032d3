"""Cached teacher outputs: exact rebuild of soft labels, the student sees the view the teacher scored,
the cache is reused across runs, and kd/meal-v2 train from it end to end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from meal_kit import meal_task
from safetensors.torch import save_file
from test_distill_cli import make_run, run_dir

from distill.cache import TeacherCache, load_cache, save_cache, topk_entries
from distill.cache_build import CachedViewDataset, build_cache, collate_cached
from distill.discriminator import Discriminator, discriminator_loss
from distill.methods.kd import SoftTargets
from distill.methods.meal import MealTask
from distill.teachers_runtime import FrozenTeacher, TeacherEnsemble
from imat.app.cli import main
from imat.data import apply_view, decode_image, resolve_paths


def cache_of(logits: torch.Tensor, k: int, selection: str = "mean", temperatures=(1.0,)):
    """A cache of one view per image from full teacher logits [B, Tn, C], and the batch fields it feeds."""
    b, tn, c = logits.shape
    index, logit, tail = topk_entries(logits, k, tuple(temperatures))
    names = [f"t{i}" for i in range(tn)]
    cache = TeacherCache(
        index[:, None], logit[:, None], tail[:, None], torch.zeros(b, 1, 5), c, names, temperatures, selection
    )
    return cache, {"soft_index": index, "soft_logit": logit, "soft_tail": tail}


def test_cache_draws_weighted_teachers_by_their_probabilities():
    logits = torch.randn(4, 2, 6)
    index, logit, tail = topk_entries(logits, 3, (1.0,))
    cache = TeacherCache(
        index[:, None], logit[:, None], tail[:, None], torch.zeros(4, 1, 5), 6, ["good", "weak"],
        (1.0,), "weighted", seed=0, probabilities=[0.9, 0.1],
    )  # fmt: skip
    draws = [cache.choose() for _ in range(2000)]
    assert all(len(d) == 1 for d in draws)  # one teacher per step, not the mean of both
    assert 0.85 < cache.pick_counts()["pick_good"] / 2000 < 0.95


def test_dense_rebuild_is_exact_with_full_topk_and_fills_the_rest():
    logits = torch.randn(4, 2, 6) * 2  # [B, teachers, C]
    probs = F.softmax(logits, -1)
    cache, fields = cache_of(logits, 6, temperatures=(1.0, 2.0))
    assert torch.allclose(cache.dense(fields), probs.mean(1), atol=1e-6)
    t = 2.0
    want = (F.softmax(logits / t, -1)).mean(1)
    assert torch.allclose(cache.dense(fields, t), want, atol=1e-6)
    with pytest.raises(ValueError, match="not 3.0"):
        cache.dense(fields, 3.0)
    # top-2 of 6: the top-2 exact, the rest of the mass spread uniformly, rows sum to one
    cache, fields = cache_of(logits, 2)
    d = cache.dense(fields, 1.0, chosen=[0])
    assert torch.allclose(d.sum(-1), torch.ones(4))
    row, p = d[0], probs[0, 0]
    kept = fields["soft_index"][0, 0].long()
    assert torch.allclose(row[kept], p[kept], atol=1e-6)
    others = torch.ones(6, dtype=torch.bool)
    others[kept] = False
    assert torch.allclose(row[others], ((1 - p[kept].sum()) / 4).expand(4), atol=1e-6)
    assert cache.pick_counts() == {"pick_t0": 0.0, "pick_t1": 0.0}  # an explicit choice is not counted


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
    index, logit, tail, views = build_cache(
        [teacher],
        train,
        images,
        num_classes=3,
        topk=2,
        views_per_image=2,
        seed=5,
        scale=(0.35, 1.0),
        temperatures=(1.0, 3.0),
        batch_size=3,
    )
    assert (
        index.shape == logit.shape == (4, 2, 1, 2) and tail.shape == (4, 2, 1, 2) and views.shape == (4, 2, 5)
    )
    paths = resolve_paths(train, images)
    i, v = 2, 1
    img = decode_image(paths[i])
    crop = apply_view(img, views[i, v].tolist(), 40)
    x = (torch.from_numpy(crop).permute(2, 0, 1).float()[None] / 255 - 0.4) / 0.2
    with torch.no_grad():
        z = teacher.model(x)[0]
    assert torch.allclose(logit[i, v, 0], z.topk(2).values, atol=1e-4)  # the top-2 logits of that crop
    rest = z[[c for c in range(3) if c not in index[i, v, 0].tolist()]]
    assert torch.allclose(tail[i, v, 0], torch.stack([rest.logsumexp(0), (rest / 3).logsumexp(0)]), atol=1e-4)
    # the same seed gives the same views; another seed others
    _, _, _, again = build_cache(
        [teacher], train, images, num_classes=3, topk=3, views_per_image=2, seed=5, scale=(0.35, 1.0)
    )
    assert torch.equal(again, views)
    # the dataset crops exactly that view (at the student's size) and carries its soft label
    cache = TeacherCache(index, logit, tail, views, 3, ["t"], (1.0, 3.0))
    ds = CachedViewDataset(train, images, cache, 32, (0.5,) * 3, (0.25,) * 3, seed=1)
    item = ds[i]
    want = (
        torch.from_numpy(apply_view(img, views[i, item["view"]].tolist(), 32)).permute(2, 0, 1).float() / 255
        - 0.5
    ) / 0.25
    assert torch.allclose(item["image"], want, atol=1e-5)
    assert torch.equal(item["soft_index"], index[i, item["view"]])
    assert torch.equal(item["soft_tail"], tail[i, item["view"]])
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        seen.add(ds.view_of(i))
    assert seen == {0, 1}  # views change across epochs
    batch = collate_cached([ds[0], None, ds[1]])
    assert batch["soft_logit"].shape == (2, 1, 2) and batch["soft_tail"].shape == (2, 1, 2)
    assert batch["skipped"] == 1


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
    *_, flipped = build_cache([teacher], train, images, **common)
    *_, unflipped = build_cache([teacher], train, images, **common, hflip=0.0)
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


# -- the cache's soft labels, discriminator inputs, refusals and fingerprint -----------------


def test_topk_rebuild_is_exact_for_the_topk_classes_at_any_temperature():
    torch.manual_seed(0)
    c, k, t = 1000, 10, 4.0
    logits = torch.randn(8, 1, c) * 3
    logits[:, :, :5] += 8  # a confident teacher, as trained ones are
    cache, fields = cache_of(logits, k, temperatures=(1.0, t))
    targets = SoftTargets(None, (0.5,) * 3, (0.25,) * 3, cache)
    full = F.softmax(logits[:, 0] / t, -1)
    _, got = targets.logits_probs({"image": torch.zeros(8, 3, 4, 4), **fields}, t)
    top = full.topk(k, -1).indices
    assert torch.allclose(got.gather(1, top), full.gather(1, top), atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(8), atol=1e-5)
    tail = torch.ones_like(full, dtype=torch.bool).scatter_(1, top, False)
    assert torch.allclose((got * tail).sum(-1), (full * tail).sum(-1), atol=1e-5)  # the tail's exact mass


def meal_on_cache(cache, classes: int, teachers: int) -> MealTask:
    frozen = [
        FrozenTeacher(f"t{i}", torch.nn.Identity(), 32, (0.5,) * 3, (0.25,) * 3) for i in range(teachers)
    ]
    return meal_task(
        torch.nn.Identity(),  # the "student" returns its input: the test hands it the logits it must output
        TeacherEnsemble(frozen, cache.selection),
        ["logits"],
        [["logits"]] * teachers,
        [None],
        classes,
        cache=cache,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )


@pytest.mark.parametrize(
    "selection,teachers,conditional",
    [("random", 1, False), ("random", 3, False), ("mean", 3, False), ("random", 3, True), ("mean", 3, True)],
)
def test_discriminator_cannot_tell_a_student_identical_to_the_teacher(selection, teachers, conditional):
    torch.manual_seed(1)
    c, k, n = 20, 3, 64
    # teachers that mostly agree (a shared view of each image) and differ in detail
    logits = torch.randn(n, 1, c) * 3 + torch.randn(n, teachers, c)
    cache, fields = cache_of(logits, k, selection)
    task = meal_on_cache(cache, c, teachers)
    d = Discriminator(c, [32, 16], num_classes=c if conditional else None)
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)

    def cond():  # the class the step's teacher(s) predict, what a conditional D is given
        return task.teacher_class if conditional else None

    probs = F.softmax(logits, -1)
    losses = []
    for step in range(60):
        chosen = [step % teachers] if selection == "random" else list(range(teachers))
        cache.choose = lambda chosen=chosen: list(chosen)  # pin the draw so the student can match it
        student = probs[:, chosen].mean(1).log()  # exactly what the chosen teacher(s) say
        s_vecs, t_raw, _, _ = task.vectors({"image": student, **fields}, None)
        assert torch.allclose(s_vecs[0], t_raw[0], atol=1e-4), "the discriminator's two inputs differ"
        assert torch.equal(task.teacher_class, probs[:, chosen].mean(1).argmax(-1))
        loss = discriminator_loss(d, t_raw[0].detach(), s_vecs[0].detach(), cond())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert min(losses[-10:]) > 2 * np.log(2) - 1e-3  # chance, never below
    # a student that differs is told apart (D learns from real differences), through finite gradients
    other = torch.randn(n, c, requires_grad=True)
    for _ in range(60):
        s_vecs, t_raw, _, _ = task.vectors({"image": other, **fields}, None)
        loss = discriminator_loss(d, t_raw[0].detach(), s_vecs[0].detach(), cond())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 1.0
    d(s_vecs[0], cond()).sum().backward()
    assert other.grad is not None and torch.isfinite(other.grad).all() and other.grad.abs().sum() > 0


def test_discriminator_inputs_without_truncation_are_the_log_probabilities():
    logits = torch.randn(5, 2, 4)
    cache, fields = cache_of(logits, 4, "mean")  # k = C: nothing is truncated
    student = torch.randn(5, 4, requires_grad=True)
    s_vec, t_vec, probs = cache.meal_vectors(fields, student, 1.0)
    assert torch.allclose(t_vec, F.softmax(logits, -1).mean(1).log(), atol=1e-5)
    assert torch.allclose(s_vec, F.log_softmax(student, -1), atol=1e-6)
    assert torch.allclose(probs, F.softmax(logits, -1).mean(1), atol=1e-6)
    s_vec.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_old_or_foreign_cache_files_are_rebuilt_not_misread(tmp_path):
    tensors = {
        "index": torch.zeros(2, 1, 1, 2, dtype=torch.int32),
        "logit": torch.zeros(2, 1, 1, 2),
        "tail": torch.zeros(2, 1, 1, 2),
        "views": torch.zeros(2, 1, 5, dtype=torch.int32),
    }
    path = tmp_path / "teacher_cache.safetensors"
    save_cache(path, tensors, {"fingerprint": "abc", "temperatures": [1.0, 4.0]})
    loaded = load_cache(path, "abc", (1.0, 4.0))
    assert loaded is not None and loaded[1] == (1.0, 4.0) and torch.equal(loaded[0]["tail"], tensors["tail"])
    assert load_cache(path, "abc", (1.0, 2.0)) is None  # a temperature it does not hold
    assert load_cache(path, "other", (1.0,)) is None
    # a format-1 file (top-k probabilities) with the same fingerprint
    save_file(
        {"index": tensors["index"], "prob": torch.zeros(2, 1, 1, 2), "views": tensors["views"]},
        str(path),
        metadata={"imat_cache": json.dumps({"fingerprint": "abc"})},
    )
    assert load_cache(path, "abc", (1.0,)) is None


def test_l1_l2_similarity_with_the_cache_is_a_one_line_error(run_cfg, capsys):
    args = [
        "distill",
        str(run_cfg),
        "distill.method=meal-v2",
        "distill.blocks=[{index: logits}]",
        "distill.cache.enabled=true",
        "distill.similarity=l2",
        "--quiet",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "distill.similarity" in err and "l2" in err and "\n" not in err


def test_cache_fingerprint_covers_weight_contents_and_images_root(tmp_path, capsys):
    cfg = make_run(tmp_path, n_train=8, n_val=3)
    run = run_dir(cfg)
    args = ["distill", str(cfg), "distill.method=kd", "distill.cache.enabled=true", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    cache_file = run / "student" / "teacher_cache" / "teacher_cache.safetensors"
    stamp = os.stat(cache_file).st_mtime_ns
    # the same bytes count and mtime, other weights: a last byte flipped in the tensor data
    weights = sorted((run / "teachers").rglob("*.safetensors"))[0]
    st = os.stat(weights)
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(weights).st_size == st.st_size and os.stat(weights).st_mtime_ns == st.st_mtime_ns
    assert main(args) == 0, capsys.readouterr().err
    assert os.stat(cache_file).st_mtime_ns != stamp  # rebuilt
    stamp = os.stat(cache_file).st_mtime_ns
    assert main(args) == 0
    assert os.stat(cache_file).st_mtime_ns == stamp  # nothing changed: reused
    # the same file names under another images root: rebuilt (the cache cannot know the pixels match)
    images = Path(yaml.safe_load(cfg.read_text())["data"]["images"])
    other = tmp_path / "other_images"
    shutil.copytree(images, other)
    assert main([*args[:-1], f"data.images={other}", "--quiet"]) == 0, capsys.readouterr().err
    assert os.stat(cache_file).st_mtime_ns != stamp
    stamp = os.stat(cache_file).st_mtime_ns
    # temperatures: one of the stored grid reuses the cache, another one rebuilds it
    rooted = [*args[:-1], f"data.images={other}"]
    assert main([*rooted, "distill.temperature=3", "--quiet"]) == 0, capsys.readouterr().err
    assert os.stat(cache_file).st_mtime_ns == stamp
    assert main([*rooted, "distill.temperature=2.5", "--quiet"]) == 0, capsys.readouterr().err
    assert os.stat(cache_file).st_mtime_ns != stamp
