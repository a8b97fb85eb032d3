"""What the student is taught from: weighted and selected teachers, consistent (mixed) teaching, extra
unlabelled images, and the hard loss's handling of rows without a label."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_distill_cli import make_run, run_dir
from torch import nn

from distill.methods.kd import KDTask, SoftTargets
from distill.tasks import hard_loss
from distill.teachers_runtime import FrozenTeacher, TeacherEnsemble, accuracy_weights
from imat.app.cli import main
from imat.config.train import AugConfig
from imat.data.mixing import build_label_mass_mixup, mix_with_unlabelled
from imat.weights import read_meta


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("teaching"))


def set_pool_fields(cfg: Path, accuracies: dict[str, float], selected: list[str] | None) -> None:
    pool_json = run_dir(cfg) / "teachers" / "pool.json"
    data = json.loads(pool_json.read_text())
    for t in data["teachers"]:
        t["val_top1"] = accuracies.get(t["name"])
    data.pop("selected", None)
    if selected is not None:
        data["selected"] = {"teachers": selected, "metric": "top3", "method": "mean", "score": 1.0}
    pool_json.write_text(json.dumps(data))


def distil(cfg: Path, *overrides: str) -> pd.DataFrame:
    out = run_dir(cfg) / "student"
    for f in ("summary.csv", "best.safetensors", "last.ckpt"):
        (out / f).unlink(missing_ok=True)
    assert main(["distill", str(cfg), *overrides, "--quiet"]) == 0
    return pd.read_csv(out / "summary.csv")


# -- teacher quality in selection ---------------------------------------------------------------------


def test_accuracy_weights_grow_with_accuracy():
    p = accuracy_weights([0.80, 0.77, 0.50], 0.03)
    assert p[0] > p[1] > p[2] and abs(sum(p) - 1) < 1e-9
    assert p[0] / p[1] == pytest.approx(np.e, rel=1e-6)  # 3 points below the best: e times less often
    assert p[2] < 1e-4  # a weak teacher is (almost) never the one taught from


def test_weighted_ensemble_draws_by_probability():
    teachers = [FrozenTeacher(n, nn.Identity(), 8, (0, 0, 0), (1, 1, 1)) for n in ("good", "weak")]
    ens = TeacherEnsemble(teachers, "weighted", seed=0, probabilities=[0.9, 0.1])
    for _ in range(2000):
        ens.pick()
    counts = ens.pick_counts()
    assert counts["pick_good"] + counts["pick_weak"] == 2000
    assert 0.85 < counts["pick_good"] / 2000 < 0.95
    with pytest.raises(ValueError, match="one probability per teacher"):
        TeacherEnsemble(teachers, "weighted", probabilities=[1.0])


def test_weighted_selection_keeps_a_weak_teacher_out(run_cfg):
    set_pool_fields(run_cfg, {"ta": 0.95, "tb": 0.30}, None)
    summary = distil(run_cfg, "distill.method=meal", "distill.selection=weighted")
    assert summary["pick_tb"].iloc[0] == 0 and summary["pick_ta"].iloc[0] == 3
    meta = read_meta(run_dir(run_cfg) / "student" / "best.safetensors")
    assert meta["teacher_selection"] == "weighted"
    assert meta["teacher_probabilities"]["ta"] > 0.999


def test_meal_draws_by_accuracy_by_default_when_the_pool_has_them(run_cfg):
    set_pool_fields(run_cfg, {"ta": 0.95, "tb": 0.30}, None)
    summary = distil(run_cfg, "distill.method=meal")
    meta = read_meta(run_dir(run_cfg) / "student" / "best.safetensors")
    assert meta["teacher_selection"] == "weighted" and summary["pick_tb"].iloc[0] == 0
    set_pool_fields(run_cfg, {"ta": 0.95}, None)  # one accuracy missing: the uniform draw, no error
    distil(run_cfg, "distill.method=meal")
    meta = read_meta(run_dir(run_cfg) / "student" / "best.safetensors")
    assert meta["teacher_selection"] == "random" and meta["teacher_probabilities"] is None


def test_weighted_selection_needs_pool_accuracies(run_cfg, capsys):
    set_pool_fields(run_cfg, {"ta": 0.95}, None)
    assert main(["distill", str(run_cfg), "distill.selection=weighted", "--quiet"]) == 2
    assert "tb has none" in capsys.readouterr().err


def test_teachers_selected_uses_the_pools_greedy_selection(run_cfg, capsys):
    set_pool_fields(run_cfg, {"ta": 0.9, "tb": 0.8}, ["tb"])
    summary = distil(run_cfg, "distill.method=meal", "distill.teachers=selected")
    assert "pick_tb" in summary.columns and "pick_ta" not in summary.columns
    set_pool_fields(run_cfg, {"ta": 0.9, "tb": 0.8}, None)
    assert main(["distill", str(run_cfg), "distill.teachers=selected", "--quiet"]) == 2
    assert "imat teachers eval" in capsys.readouterr().err


# -- consistent teaching ------------------------------------------------------------------------------


class Recorder(nn.Module):
    """A 'network' that remembers what it was given and returns fixed-size logits."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.head = nn.Linear(3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.head(x.mean((2, 3)))


class FakeCtx:
    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def test_mixup_teachers_score_exactly_the_image_the_student_sees():
    torch.manual_seed(0)
    student, teacher_net = Recorder(), Recorder()
    teacher = FrozenTeacher("t", teacher_net, 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    mixup = build_label_mass_mixup(AugConfig(mixup=1.0, cutmix=1.0), 3)
    task = KDTask(
        student,
        SoftTargets(TeacherEnsemble([teacher], "mean"), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        mixup=mixup,
    )
    images = torch.rand(6, 3, 8, 8)
    batch = {"image": images.clone(), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    out = task.step(batch, FakeCtx())
    assert torch.isfinite(out["loss"])
    s_in, t_in = student.seen[-1], teacher_net.seen[-1]
    assert torch.equal(s_in, t_in)  # the teacher scored the student's (mixed) image
    assert not torch.equal(s_in, images)  # and it was mixed


def test_mixup_with_the_cache_is_refused(run_cfg, capsys):
    args = ["distill.method=kd", "distill.cache.enabled=true", "distill.train.aug.mixup=0.2"]
    assert main(["distill", str(run_cfg), *args, "--quiet"]) == 2
    assert "mixup/cutmix need the teachers online" in capsys.readouterr().err


def test_label_mass_mixup_tracks_the_labelled_share():
    torch.manual_seed(0)
    mixup = build_label_mass_mixup(AugConfig(mixup=1.0), 3)
    labels = torch.tensor([0, -1, 2, -1, 1, 0])
    images = torch.rand(6, 3, 4, 4)
    _, mass = mix_with_unlabelled(mixup, images, labels)
    assert mass.shape == (6, 3)
    # timm mixes row i with row B-1-i: the labelled share of row i is lam*[i labelled] + (1-lam)*[partner]
    labelled = (labels >= 0).float()
    share = mass.sum(1)
    lam = 1 - float(share[1])  # row 1 is unlabelled, its partner (row 4) labelled: share = 1 - lam
    expected = lam * labelled + (1 - lam) * labelled.flip(0)
    assert torch.allclose(share, expected, atol=1e-5)


def test_hard_loss_skips_rows_without_a_label():
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, -1, 2, -1])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert torch.allclose(hard_loss(logits, labels), expected)
    assert float(hard_loss(logits, torch.full((4,), -1))) == 0.0
    # a label-mass matrix: a row with half a label counts half
    mass = torch.tensor([[1.0, 0, 0], [0, 0.5, 0], [0, 0, 0], [0, 0, 1.0]])
    logp = torch.log_softmax(logits, -1)
    want = -(logp[0, 0] + 0.5 * logp[1, 1] + logp[3, 2]) / 2.5
    assert torch.allclose(hard_loss(logits, mass), want)
    assert float(hard_loss(logits, torch.zeros(4, 3))) == 0.0


# -- extra unlabelled images --------------------------------------------------------------------------


def write_extra(folder: Path, n: int, also: list[Path] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        cv2.imwrite(str(folder / f"extra_{i}.png"), rng.integers(0, 255, (36, 36, 3), dtype=np.uint8))
    for p in also:  # a validation image copied in must not leak into training: same file, same path
        (folder / p.name).symlink_to(p)
    return folder


def test_extra_images_join_training_with_teacher_targets_only(run_cfg, tmp_path):
    images = Path(yaml.safe_load(run_cfg.read_text())["data"]["images"])
    extra = write_extra(tmp_path / "extra", 8)
    base = distil(run_cfg, "distill.method=meal")
    with_extra = distil(run_cfg, "distill.method=meal", f"distill.extra_images={extra}")
    steps = lambda s: int(s["pick_ta"].iloc[0] + s["pick_tb"].iloc[0])  # noqa: E731
    assert steps(base) == 3 and steps(with_extra) == 4  # 24 labelled (+ 8 unlabelled) / batch 8
    assert np.isfinite(with_extra["train_loss"]).all()
    kd = distil(run_cfg, "distill.method=kd", f"distill.extra_images={extra}")
    assert np.isfinite(kd["train_ce"]).all() and np.isfinite(kd["train_kd_soft"]).all()
    assert images.is_dir()


def test_extra_images_never_include_validation_images(run_cfg, tmp_path, capsys):
    images = Path(yaml.safe_load(run_cfg.read_text())["data"]["images"])
    val = sorted(images.glob("val_*.png"))
    assert len(val) == 9
    extra = write_extra(tmp_path / "mixed", 8, also=val)  # 8 new images + links to the 9 val images
    summary = distil(run_cfg, "distill.method=meal", f"distill.extra_images={extra}")
    steps = int(summary["pick_ta"].iloc[0] + summary["pick_tb"].iloc[0])
    assert steps == 4  # (24 + 8) / 8, not (24 + 17) / 8 (the last partial batch is dropped)
    # the images folder itself holds only train and val files: nothing is left to add
    assert main(["distill", str(run_cfg), f"distill.extra_images={images}", "--quiet"]) == 2
    assert "no images beyond the train and val splits" in capsys.readouterr().err


def test_extra_images_with_ce_is_refused(run_cfg, tmp_path, capsys):
    extra = write_extra(tmp_path / "x", 2)
    assert (
        main(["distill", str(run_cfg), "distill.method=ce", f"distill.extra_images={extra}", "--quiet"]) == 2
    )
    assert "method ce learns from labels only" in capsys.readouterr().err


def test_extra_images_from_a_manifest_with_its_own_split_name(run_cfg, tmp_path):
    extra = write_extra(tmp_path / "m", 8)
    rows = pd.DataFrame(
        {
            "image_id": [f"e{i}" for i in range(8)],
            "split": "extra",
            "path": [str(p) for p in sorted(extra.iterdir())],
        }
    )
    rows.to_parquet(tmp_path / "extra.parquet", index=False)
    summary = distil(run_cfg, "distill.method=meal", f"distill.extra_images={tmp_path / 'extra.parquet'}")
    assert int(summary["pick_ta"].iloc[0] + summary["pick_tb"].iloc[0]) == 4
