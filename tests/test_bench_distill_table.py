"""The distillation benchmark's protocol (benchmarks/bench_distill.py), its tables
(benchmarks/distill_tables.py) and paired statistics (benchmarks/paired_tests.py), on synthetic folders,
tables and a fake distill; the slow test runs the whole protocol with ``--smoke`` on generated images."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench_distill.py as a module, with benchmarks/ importable as it is for the script."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_distill", ROOT / "benchmarks" / "bench_distill.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in (spec.name, "distill_tables", "paired_tests"):
            sys.modules.pop(name, None)
        sys.path.remove(str(ROOT / "benchmarks"))


def _folder(root: Path, classes: int = 3, train: int = 20, test: int = 6, images: bool = False) -> Path:
    """An ImageFolder ``root/{train,test}/<class>/*.jpg`` (empty files unless ``images``)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                if images:
                    import cv2

                    img = np.full((32, 32, 3), 60 * c + 20, np.uint8) + rng.integers(
                        0, 40, (32, 32, 3), np.uint8
                    )
                    cv2.imwrite(str(d / f"{i:04d}.jpg"), img)
                else:
                    (d / f"{i:04d}.jpg").touch()
    return root


def _args(bench, tmp_path: Path, *extra: str):
    data = tmp_path / "data"
    if not data.is_dir():
        _folder(data)
    return bench.parse_args(["--data-dir", str(data), "--out", str(tmp_path / "run"), *extra])


# --- splits ----------------------------------------------------------------------------------------------


def test_train_val_and_unlabelled_are_disjoint_cuts_of_the_training_images(bench, tmp_path):
    root = _folder(tmp_path / "data")
    manifest, classes, extra = bench.split_rows(root, train=10, val=5, extra=4, test=0, seed=1)
    assert classes == ["c0", "c1", "c2"]
    by = {s: set(manifest.loc[manifest["split"] == s, "path"]) for s in ("train", "val", "test")}
    by["extra"] = set(extra["path"])
    assert [len(by[s]) for s in ("train", "val", "extra", "test")] == [30, 15, 12, 18]
    for a in by:
        for b in by:
            assert a == b or not by[a] & by[b], (a, b)
    assert all(p.startswith("train/") for s in ("train", "val", "extra") for p in by[s])  # val from train
    assert all(p.startswith("test/") for p in by["test"])  # test only reports
    assert (extra["label"] == -1).all()
    again, _, _ = bench.split_rows(root, train=10, val=5, extra=4, test=0, seed=1)
    pd.testing.assert_frame_equal(manifest, again)  # the seed fixes the cut
    with pytest.raises(SystemExit, match="class c0 has 20 training images"):
        bench.split_rows(root, train=10, val=8, extra=4, test=0, seed=1)
    (root / "test" / "c2").rename(root / "test" / "other")
    with pytest.raises(SystemExit, match="test/ has classes"):
        bench.split_rows(root, train=10, val=5, extra=4, test=0, seed=1)


def test_the_data_dir_and_the_run_dir_are_arguments_checked_up_front(bench, tmp_path):
    with pytest.raises(SystemExit, match="expected an ImageFolder"):
        bench.split_rows(tmp_path, 1, 1, 0, 0, 0)
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--data-dir", str(tmp_path), "--out", str(ROOT / "benchmarks" / "out")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        _args(bench, tmp_path, "--methods", "ce,meal-tuned")
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:  # no default data location: the folder is an argument
        bench.parse_args(["--out", str(tmp_path / "run")])
    assert exc.value.code == 2


# --- equal tuning, step matching, selection on the validation split --------------------------------------


def test_every_sweep_gets_the_same_budget_and_subset_and_never_sees_test(bench, tmp_path):
    from imat.manifest import load_manifest

    args = _args(
        bench, tmp_path, "--smoke", "--tune-per-class", "5", "--tune-samples", "6", "--tune-epochs", "4"
    )
    manifest, classes, _ = bench.prepare_data(args)
    cfgs = {s: bench.sweep_config(args, s, manifest, classes) for s in ("ce", "kd", "meal")}
    budget = {s: {k: v for k, v in c["tune"].items() if k != "space"} for s, c in cfgs.items()}
    assert budget["ce"] == budget["kd"] == budget["meal"]
    assert budget["ce"]["samples"] == 6 and budget["ce"]["metric"] == "val_top1_err"
    assert {c["distill"]["train"]["epochs"] for c in cfgs.values()} == {4}
    subsets = [load_manifest(tmp_path / "run" / f"tune-{s}" / "data" / "manifest.parquet")[0] for s in cfgs]
    assert all(s.equals(subsets[0]) for s in subsets)
    assert set(subsets[0]["split"]) == {"train", "val"}  # the sweep picks its winner without test
    assert subsets[0]["path"].str.startswith("train/").all()
    spaces = {s: set(c["tune"]["space"]) for s, c in cfgs.items()}
    assert spaces["ce"] == {"distill.train.lr"}
    shared = {"distill.train.lr", "distill.temperature"}
    assert shared < spaces["kd"] and shared < spaces["meal"]
    assert "distill.kd_alpha" in spaces["kd"] and "distill.hard_label_weight" in spaces["meal"]


def test_step_matched_students_take_the_labelled_only_steps(bench, tmp_path):
    args = _args(bench, tmp_path, "--smoke", "--batch-size", "4")
    manifest, _, _ = bench.prepare_data(args)
    steps = bench.labelled_steps(args, manifest)
    assert steps == int((manifest["split"] == "train").sum()) // 4
    for key in ("kd", "meal"):
        (tmp_path / "run" / f"tune-{key}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / f"tune-{key}" / "winner.json").write_text('{"distill.temperature": 2.0}')
    cfg = {k: bench.student_config(args, bench.METHODS[k], 1, steps) for k in bench.METHODS}
    train = {k: c["distill"]["train"] for k, c in cfg.items()}
    assert train["kd+unlabelled-matched"]["max_steps_per_epoch"] == steps
    assert train["meal+unlabelled-matched"]["max_steps_per_epoch"] == steps
    assert "max_steps_per_epoch" not in train["kd+unlabelled"]
    for k in ("kd+unlabelled", "kd+unlabelled-matched", "meal+unlabelled", "meal+unlabelled-matched"):
        assert cfg[k]["distill"]["extra_images"] == str(bench.extra_path(args))
    assert "extra_images" not in cfg["kd"]["distill"]
    assert cfg["kd+unlabelled"]["distill"]["temperature"] == 2.0  # KD with the images uses KD's winner
    assert cfg["meal-no-d"]["distill"]["adversarial"]["enabled"] is False
    assert {c["distill"]["train"]["seed"] for c in cfg.values()} == {1}


def _summary(epochs: int, val: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "epoch": range(1, epochs + 1),
            "val_top1": val,
            "val_top3": 0.9,
            "train_images": 64,
            "global_step": [5 * (e + 1) for e in range(epochs)],  # the engine's count wins over images
            "train_time_s": 1.0,
            "epoch_time_s": 1.5,
        }
    )


def test_students_report_their_best_validation_epoch_on_test_and_resume(bench, tmp_path, monkeypatch):
    import distill.train

    args = _args(bench, tmp_path, "--smoke", "--methods", "ce,kd", "--seeds", "2", "--batch-size", "16")
    manifest, _, _ = bench.prepare_data(args)
    for key in ("ce", "kd"):
        (tmp_path / "run" / f"tune-{key}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / f"tune-{key}" / "winner.json").write_text("{}")
    trained, evaluated = [], []

    def fake_distill(cfg, resume, progress):
        trained.append(cfg.run_path.name)
        out = cfg.run_path / "student"
        out.mkdir(parents=True)
        s = _summary(3, [0.2, 0.6, 0.4])  # the best validation epoch is the second, not the last
        s.to_csv(out / "summary.csv", index=False)
        return s

    def fake_eval(args_, weights, preds):
        evaluated.append(weights)
        ids = np.array([f"i{k}" for k in range(4)])
        return bench.save_preds(preds, ids, np.array([0, 1, 2, 0]), np.eye(3)[[0, 1, 1, 1]])

    monkeypatch.setattr(distill.train, "distill", fake_distill)
    monkeypatch.setattr(bench, "evaluate_weights", fake_eval)
    published = []
    rows = bench.stage_students(args, manifest, lambda r: published.append(list(r)))
    assert trained == ["ce-s0", "kd-s0", "ce-s1", "kd-s1"]  # every method's seed 0 first
    assert all(w.name == "best.safetensors" for w in evaluated)
    r = rows[0]
    assert (r["method"], r["best_epoch"], r["val_top1_err"]) == ("ce", 2, pytest.approx(0.4))
    assert r["top1_err"] == pytest.approx(0.5) and r["top3_err"] == pytest.approx(0.0)
    assert r["steps"] == 15
    assert len(published) == 4 and published[-1] == rows
    with pytest.raises(SystemExit, match="pass --resume"):
        bench.stage_students(args, manifest, lambda r: None)
    trained.clear()
    args.resume = True
    again = bench.stage_students(args, manifest, lambda r: None)  # read back, nothing trained
    assert trained == [] and [x["top1_err"] for x in again] == [x["top1_err"] for x in rows]


# --- statistics ------------------------------------------------------------------------------------------


def test_mcnemar_exact_and_mid_p_on_a_known_case(bench):
    from paired_tests import mcnemar

    a = np.array([True] * 90 + [False] * 10)  # A misses 10 images B gets, and nothing else differs
    b = np.ones(100, dtype=bool)
    r = mcnemar(a, b)
    assert (r["a_only_right"], r["b_only_right"]) == (0, 10)
    assert r["diff_points"] == pytest.approx(10.0)
    assert r["p_exact"] == pytest.approx(2 * 0.5**10)
    assert r["p_value"] == pytest.approx(2 * 0.5**10 - 0.5**10)
    same = mcnemar(np.array([True, False, True, False]), np.array([False, True, True, False]))
    assert same["p_value"] == pytest.approx(1.0) and same["p_exact"] == pytest.approx(1.0)
    # b=1, c=4 of 5 discordant: exact 2*P(X<=1) = 12/32, mid-p minus P(X=1) = 7/32
    r = mcnemar(np.array([1, 0, 0, 0, 0, 1], bool), np.array([0, 1, 1, 1, 1, 1], bool))
    assert (r["p_exact"], r["p_value"]) == pytest.approx((12 / 32, 7 / 32))


def test_seeds_are_pooled_by_seed_and_image(bench):
    from paired_tests import compare, t_interval

    a = {0: {"x": True, "y": False}, 1: {"x": False, "y": False, "z": True}, 2: {"x": True}}
    b = {0: {"x": True, "y": True}, 1: {"x": True, "y": False}}
    row = compare("a", "b", {"a": a, "b": b})
    assert row["seeds"] == 2 and row["images"] == 4  # seed 2 and image z have no partner
    assert (row["a_only_right"], row["b_only_right"]) == (0, 2)
    # per seed A minus B error: seed 0 +50 points, seed 1 +50 points -> no spread over seeds
    assert row["diff_t95_over_seeds"] == pytest.approx(0.0)
    assert compare("a", "c", {"a": a}) is None
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0) and half == pytest.approx(4.302653 / 3**0.5, rel=1e-5)
    assert np.isnan(t_interval([1.0])[1])


def _rows(errs: dict[str, list[float]]) -> list[dict]:
    rows = [{"model": "ensemble_mean", "kind": "ensemble", "method": "ensemble", "seed": 0, "top1_err": 0.16}]
    for method, values in errs.items():
        rows += [
            {"model": f"student {method}", "kind": "student", "method": method, "seed": s, "top1_err": e,
             "top3_err": e / 4, "steps": 100}
            for s, e in enumerate(values)
        ]  # fmt: skip
    return rows


def test_tables_select_rows_by_method_key_and_the_verdict_takes_its_thresholds(bench):
    df = bench.finish_table(_rows({"ce": [0.19, 0.21], "kd": [0.19, 0.19], "meal": [0.165, 0.165]}))
    for col in ("model", "kind", "method", "seed", "top1_err", "top3_err", "ratio_to_ce", "gap_closed"):
        assert col in df
    assert df.loc[df["kind"] != "student", "gap_closed"].isna().all()
    means = bench.method_means(df).set_index("method")
    assert list(means.index) == ["ce", "kd", "meal"]
    assert means.loc["meal", "gap_closed"] == pytest.approx(0.035 / 0.04)
    assert means.loc["ce", "top1_err_t95"] > 0 and means.loc["kd", "top1_err_t95"] == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    right = {m: {s: {f"i{k}": bool(v) for k, v in enumerate(rng.random(400) > e)} for s in range(2)}
             for m, e in (("ce", 0.3), ("kd", 0.3), ("meal", 0.1))}  # fmt: skip
    tests = bench.paired_table(bench.PAIRS, right)
    assert list(tests.columns[:3]) == ["a", "b", "seeds"] and {"diff_points", "p_value", "test"} <= set(tests)
    assert set(zip(tests["a"], tests["b"], strict=True)) == {("meal", "kd"), ("kd", "ce"), ("meal", "ce")}
    meal_kd = tests[(tests["a"] == "meal") & (tests["b"] == "kd")].iloc[0]
    assert meal_kd["diff_points"] < -10 and meal_kd["p_value"] < 1e-6
    line = bench.verdict(means.reset_index(), tests, "meal", "kd", aim_ratio=0.85, aim_gap=0.75, alpha=0.05)
    assert "NOT" not in line and "(<= 0.85: reached)" in line and "(>= 75%: reached)" in line
    strict = bench.verdict(means.reset_index(), tests, "meal", "kd", aim_ratio=0.8, aim_gap=0.9, alpha=0.05)
    assert strict.count("NOT reached") == 2
    assert (
        bench.verdict(means.reset_index(), tests, "meal+unlabelled", "kd", aim_ratio=1, aim_gap=0, alpha=1)
        == ""
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three Ray sweeps and 16 students: minutes alone, longer on a loaded machine
def test_smoke_runs_the_whole_protocol_end_to_end(bench, tmp_path):
    data = _folder(tmp_path / "data", classes=3, train=24, test=4, images=True)
    out = tmp_path / "run"
    argv = ["--data-dir", str(data), "--out", str(out), "--smoke", "--resume", "--cpus", "1"]
    assert bench.main(argv) == 0
    base = out / "results" / "distill"
    df = pd.read_csv(f"{base}.csv")
    students = df[df["kind"] == "student"]
    assert set(students["method"]) == set(bench.METHODS)
    assert students.groupby("method")["seed"].nunique().eq(2).all()
    assert {"top1_err", "top3_err", "steps", "wall_s", "machine", "precision", "pool"} <= set(df)
    assert df["pool"].nunique() == 1
    steps = students.groupby("method")["steps"].first()
    assert steps["kd+unlabelled-matched"] == steps["kd"] == steps["ce"] < steps["kd+unlabelled"]
    assert steps["meal+unlabelled-matched"] == steps["meal"]
    tests = pd.read_csv(f"{base}_tests.csv")
    assert {("meal", "kd"), ("meal", "meal-no-d"), ("kd", "ce")} <= set(
        zip(tests["a"], tests["b"], strict=True)
    )
    assert set(pd.read_csv(f"{base}_tune.csv")["method"]) == {"ce", "kd", "meal"}
    assert json.loads((out / "splits.json").read_text())["val"] == 3 * 4
    assert len(list((out / "preds").glob("*-s1.npz"))) == len(bench.METHODS)
