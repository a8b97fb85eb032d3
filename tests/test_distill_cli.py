"""`imat distill` end to end on a tiny generated pool, config errors, label noise and `imat data audit`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from scale_kit import write_pool, write_squares

from imat.app.cli import main
from imat.engine.checkpoint import load_checkpoint
from imat.manifest import ClassMap, save_manifest
from imat.weights import read_meta


def make_run(
    root: Path, n_train: int = 24, n_val: int = 9, teachers=(("ta", "resnet10t", 32), ("tb", "resnet10t", 40))
) -> Path:
    """A run dir with a manifest of coloured-square images and a pool of tiny (untrained) teachers."""
    images, rows, labels = write_squares(root, n_train, n_val, size=36)
    classes = ClassMap.from_labels(labels)
    run = root / "run"
    save_manifest(pd.DataFrame(rows), classes, run / "data")
    write_pool(run, images, classes, teachers)
    cfg = {
        "run_dir": str(run),
        "data": {"images": str(images), "num_workers": 0},
        "distill": {
            "method": "meal",
            "student": {
                "arch": "resnet10t",
                "input_size": 32,
                "mean": [0.5, 0.5, 0.5],
                "std": [0.25, 0.25, 0.25],
            },
            "blocks": [{"index": 2, "length": 16, "gamma": 0.1}, {"index": "logits", "gamma": 1.0}],
            "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "lr": 0.05, "aug": {"preset": "light"}},
        },
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root / "cfg.yaml"


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("distill"))


def run_dir(cfg: Path) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["run_dir"])


@pytest.mark.parametrize(
    "method,extra",
    [
        ("meal", []),
        ("meal", ["distill.adversarial.mode=grl"]),
        ("meal", ["distill.adversarial.mode=joint"]),
        ("meal", ["distill.adversarial.optimizer=adam", "distill.adversarial.lr=2e-4"]),
        ("meal", ["distill.adversarial.condition=none"]),
        # consistent teaching with blocks: teachers score the mixed image (bench_distill's +consistent)
        (
            "meal",
            ["distill.train.aug.mixup=0.2", "distill.train.aug.cutmix=1.0", "distill.train.aug.mix_prob=1.0"],
        ),
        ("meal-v2", ["distill.blocks=[{index: logits}]"]),
        ("kd", ["distill.temperature=2"]),
        ("ce", []),
    ],
)
def test_distill_each_method_one_epoch(run_cfg, method, extra, capsys):
    out = run_dir(run_cfg) / "student"
    for f in ("summary.csv", "best.safetensors", "last.ckpt"):
        (out / f).unlink(missing_ok=True)
    code = main(["distill", str(run_cfg), f"distill.method={method}", *extra, "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 1 and {"train_loss", "val_top1", "val_top3"} <= set(summary.columns)
    assert np.isfinite(summary["train_loss"]).all()
    meta = read_meta(out / "best.safetensors")
    assert meta["arch"] == "resnet10t" and meta["num_classes"] == 3 and meta["method"] == method
    assert meta["classes"]["source_labels"] == ["1", "2", "3"]
    assert (out / "config.yaml").is_file() and (out / "tensorboard").is_dir()
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["distill"]["method"] == method
    cols = set(summary.columns)
    if method == "meal":
        assert {"train_sim", "train_sim_b0", "train_sim_b1", "train_d_loss"} <= cols
        assert {"d_acc_teacher_b0", "d_acc_student_b1", "pick_ta", "pick_tb"} <= cols
        assert summary["pick_ta"].iloc[0] + summary["pick_tb"].iloc[0] == 3  # 24 images / batch 8
        # by default every discriminator is conditioned on the teacher's class (its class embedding is
        # saved with it); condition=none is the paper's unconditional one
        disc = load_checkpoint(out / "last.ckpt")["modules"]["disc"]
        assert any(".embed." in k for k in disc) is ("distill.adversarial.condition=none" not in extra)
        if not any("mode=" in e for e in extra):  # alternating: its own D optimiser and lr
            assert {"train_adv", "lr_main", "lr_disc"} <= cols
            assert summary["lr_disc"].iloc[0] < summary["lr_main"].iloc[0]
    if method == "meal-v2":
        assert summary["pick_ta"].iloc[0] == summary["pick_tb"].iloc[0] == 3
    if method == "kd":
        assert {"train_kd_soft", "train_ce"} <= cols
    if method == "ce":
        assert not any(c.startswith("pick_") for c in cols)


def test_distill_resume_is_a_noop_when_finished(run_cfg, capsys):
    args = ["distill", str(run_cfg), "distill.method=kd", "--quiet"]
    assert main(args) == 0
    out = run_dir(run_cfg) / "student"
    before = (out / "summary.csv").read_text()
    assert main([*args, "--resume"]) == 0
    assert (out / "summary.csv").read_text() == before
    assert (
        main(["distill", str(run_cfg), "distill.method=kd", "distill.train.epochs=2", "--quiet", "--resume"])
        == 0
    )
    assert len(pd.read_csv(out / "summary.csv")) == 2


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["distill.method=magic"],
            "distill.method: unknown method 'magic' (registered: ce, kd, meal, meal-v2",  # a test may register more
        ),
        (["distill.student.arch=resnet_nope"], "unknown model 'resnet_nope'"),
        (["distill.student.arch=mobilenetv3_small_050"], "is not a timm ResNet"),
        (["distill.blocks=[{index: 7, length: 4}]"], "block index 7 does not exist in student resnet10t"),
        (["distill.blocks=[{index: 1}]"], "distill.blocks.0.length: stage block 1 needs a pooled length"),
        (["distill.blocks=[{index: logits, length: 10}]"], "the logits block has the class count 3, not 10"),
        (["distill.method=meal-v2"], "meal-v2 works on the final outputs only"),
        (
            ["distill.method=meal-v2", "distill.blocks=[{index: logits}]", "distill.selection=random"],
            "meal-v2 averages",
        ),
        (["distill.blocks=[]"], "MEAL needs at least one block"),
        (["distill.blocks=[{index: logits, temperature: 0.5}]"], "the logits block uses distill.temperature"),
        (["distill.pool=/nonexistent/pool"], "teacher pool not found"),
        (["distill.teachers=[nobody]"], "no teacher named nobody"),
        (["distill.adversarial.mode=minimax"], "distill.adversarial.mode"),
        (["distill.student.pretrained=/nonexistent.safetensors"], "weights not found"),
        (["distill.adversarial.widths=[4, 0]"], "every width must be >= 1"),
        (
            ["distill.adversarial.mode=grl", "distill.adversarial.optimizer=adam"],
            "'adam' needs mode alternating",
        ),
        (["distill.adversarial.mode=joint", "distill.adversarial.weight=0.5"], "joint mode adds"),
    ],
)
def test_config_errors_are_one_line(run_cfg, overrides, message, capsys):
    code = main(["distill", str(run_cfg), *overrides, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_student_starts_from_local_weights_and_refuses_foreign_ones(run_cfg, tmp_path, capsys):
    from safetensors.torch import save_file

    from distill.train import build_student
    from imat.config import load_config

    torch.manual_seed(123)
    source = timm.create_model("resnet10t", num_classes=3)
    path = tmp_path / "student_init.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    cfg = load_config(run_cfg, [f"distill.student.pretrained={path}"])
    student, _ = build_student(cfg.distill, 3)
    for k, v in source.state_dict().items():
        assert torch.equal(student.state_dict()[k], v), k
    # a ResNet-18 file does not fit a ResNet-10-T: one line, no training
    other = tmp_path / "r18.safetensors"
    r18 = timm.create_model("resnet18", num_classes=3).state_dict()
    save_file({k: v.contiguous() for k, v in r18.items()}, str(other))
    code = main(["distill", str(run_cfg), f"distill.student.pretrained={other}", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(other) in err


def test_class_count_mismatch_is_one_line(tmp_path, capsys):
    cfg = make_run(tmp_path, teachers=(("ta", "resnet10t", 32),))
    pool = run_dir(cfg) / "teachers"
    data = json.loads((pool / "pool.json").read_text())
    data["teachers"][0]["num_classes"] = 5
    (pool / "pool.json").write_text(json.dumps(data))
    code = main(["distill", str(cfg), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "has 5 classes but the manifest has 3" in err


def test_label_noise_recorded_and_applied(tmp_path, capsys):
    cfg = make_run(tmp_path, teachers=(("ta", "resnet10t", 32),))
    code = main(["distill", str(cfg), "distill.method=ce", "data.label_noise.fraction=0.5", "--quiet"])
    assert code == 0, capsys.readouterr().err
    rec = pd.read_csv(run_dir(cfg) / "student" / "label_noise.csv")
    assert len(rec) == 24 and rec["flipped"].sum() == 12
    assert ((rec["clean_label"] != rec["noisy_label"]) == rec["flipped"]).all()
    # same seed, same flips
    main(["distill", str(cfg), "distill.method=ce", "data.label_noise.fraction=0.5", "--quiet"])
    assert pd.read_csv(run_dir(cfg) / "student" / "label_noise.csv").equals(rec)
    # the teachers' training rows and the audit carry exactly the labels the student trained on
    from distill.audit import audit
    from imat.config import load_config
    from imat.manifest import load_manifest
    from teachers.train import split_frames

    noisy = load_config(cfg, ["data.label_noise.fraction=0.5"])
    manifest = run_dir(cfg) / "data" / "manifest.parquet"
    df, classes = load_manifest(manifest)
    teacher_rows, _ = split_frames(noisy, df, classes, manifest)
    assert list(teacher_rows["image_id"]) == list(rec["image_id"].astype(str))
    assert list(teacher_rows["label"]) == list(rec["noisy_label"])
    res = audit(run_dir(cfg) / "teachers", noisy, top=5, out_dir=tmp_path / "audit")
    by_id = res.table.set_index("image_id")
    assert by_id.loc[rec["image_id"].astype(str), "flipped"].tolist() == rec["flipped"].tolist()


# -- imat data audit ---------------------------------------------------------------------------------


def test_score_labels_is_cleanlabs_verdict():
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from distill.audit import score_labels

    rng = np.random.default_rng(0)
    truth = np.arange(60) % 3
    probs = rng.dirichlet(np.ones(3), size=60) * 0.3
    probs[np.arange(60), truth] += 0.7
    given = truth.copy()
    given[:6] = (truth[:6] + 1) % 3  # six wrong labels the probabilities disagree with
    s = score_labels(probs, given)
    assert np.allclose(s["label_quality"], get_label_quality_scores(given, probs))
    assert (s["is_label_issue"].to_numpy() == find_label_issues(given, probs, n_jobs=1)).all()
    assert s["is_label_issue"][:6].sum() >= 3 and not s["is_label_issue"][6:].any()  # only wrong ones
    assert list(s["suggested"]) == list(truth)
    assert np.allclose(s["p_given"], probs[np.arange(60), given])
    assert set(np.argsort(s["label_quality"].to_numpy())[:6]) == set(range(6))
    with pytest.raises(ValueError, match="every label must be known"):
        score_labels(probs[:2], np.array([0, -1]))


def test_data_audit_writes_csv_and_self_contained_html(tmp_path, capsys):
    cfg = make_run(tmp_path, teachers=(("ta", "resnet10t", 32), ("tb", "resnet10t", 40)))
    run = run_dir(cfg)
    code = main(
        ["data", "audit", str(run / "teachers"), "--config", str(cfg), "--top", "5", "--device", "cpu"]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    table = pd.read_csv(run / "audit" / "audit.csv")
    assert len(table) == 24 and list(table["rank"]) == list(range(1, 25))
    assert table["label_quality"].is_monotonic_increasing
    assert {"given_label", "suggested_label", "label_quality", "is_label_issue", "p_given"} <= set(table)
    assert set(table["given_label"]) <= {1, 2, 3} and set(table["suggested_label"]) <= {1, 2, 3}
    page = (run / "audit" / "audit.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 5 and 'src="/' not in page
    # with label noise: the corrupted labels are audited and known flips are marked
    code = main(
        [
            "data",
            "audit",
            str(run / "teachers"),
            "--config",
            str(cfg),
            "--top",
            "3",
            "--out",
            str(tmp_path / "a2"),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    noisy_cfg = tmp_path / "noisy.yaml"
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["label_noise"] = {"fraction": 0.5, "seed": 1}
    noisy_cfg.write_text(yaml.safe_dump(raw))
    code = main(
        [
            "data",
            "audit",
            str(run / "teachers"),
            "--config",
            str(noisy_cfg),
            "--top",
            "4",
            "--out",
            str(tmp_path / "a3"),
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    noisy = pd.read_csv(tmp_path / "a3" / "audit.csv")
    assert noisy["flipped"].sum() == 12 and "known flipped labels among the top 4" in out.out


def test_data_audit_missing_pool_is_one_line(tmp_path, capsys):
    assert main(["data", "audit", str(tmp_path / "nope")]) == 2
    assert "teacher pool not found" in capsys.readouterr().err
