"""The distillation benchmark's own tables (benchmarks/distill_tables.py: means over seeds, the aim check)
and its students stage, on synthetic tables and a fake distill (no benchmark data: the real run takes
hours)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
        sys.modules.pop(spec.name, None)
        sys.modules.pop("distill_tables", None)
        sys.path.remove(str(ROOT / "benchmarks"))


def _table(bench, rows: list[tuple[str, str, int, float]]) -> pd.DataFrame:
    raw = [{"model": m, "method": k, "seed": s, "top1_err": e, "top3_err": e / 4} for m, k, s, e in rows]
    return bench.finish_table(raw, 10_000)


def _aim(bench, rows: list[tuple[str, str, int, float]]) -> str:
    return bench.aim_check(bench.method_means(_table(bench, rows), 10_000), 10_000)


def test_means_average_seeds_and_measure_against_the_mean_ce(bench):
    df = _table(
        bench,
        [
            ("ensemble_mean", "ensemble", 0, 0.16),
            ("student ce", "ce", 0, 0.19),
            ("student ce", "ce", 1, 0.21),
            ("student kd", "kd", 0, 0.19),
            ("student meal-tuned", "meal v1 (tuned)", 0, 0.17),
            ("student meal-tuned", "meal v1 (tuned)", 1, 0.18),
        ],
    )
    means = bench.method_means(df, 10_000).set_index("model")
    assert list(means.index) == ["student ce", "student kd", "student meal-tuned"]
    tuned = means.loc["student meal-tuned"]
    assert tuned["seeds"] == 2
    assert tuned["top1_err"] == pytest.approx(0.175)
    assert (tuned["top1_err_min"], tuned["top1_err_max"]) == pytest.approx((0.17, 0.18))
    assert tuned["ratio_to_ce"] == pytest.approx(0.175 / 0.20)
    assert tuned["gap_closed"] == pytest.approx((0.20 - 0.175) / (0.20 - 0.16))
    assert means.loc["student ce", "gap_closed"] == pytest.approx(0.0)


def test_aim_check_names_the_best_meal_and_each_part_of_the_aim(bench):
    base = [("ensemble_mean", "ensemble", 0, 0.16), ("student ce", "ce", 0, 0.20)]
    reached = _aim(bench, [*base, ("student kd", "kd", 0, 0.19), ("student m", "meal v1", 0, 0.165)])
    assert "student m " in reached and "NOT" not in reached and "outside the interval" in reached
    missed = _aim(
        bench,
        [
            *base,
            ("student kd", "kd", 0, 0.185),
            ("student a", "meal v1", 0, 0.19),
            ("student b", "meal v2", 0, 0.188),
            ("student c", "meal v1, no discriminators", 0, 0.10),  # an ablation, not MEAL
        ],
    )
    assert "student b " in missed  # the lower of the two MEAL students
    assert missed.count("NOT reached") == 3
    assert _aim(bench, base) == ""


def test_each_student_closes_the_gap_to_its_own_pools_ensemble(bench):
    raw = [
        {"model": "ensemble_mean", "method": "mean", "seed": 0, "pool": "a", "top1_err": 0.16},
        {"model": "ensemble_mean", "method": "mean", "seed": 0, "pool": "b", "top1_err": 0.12},
        {"model": "student ce", "method": "ce", "seed": 0, "pool": "a", "top1_err": 0.20},
        {"model": "student kd", "method": "kd", "seed": 0, "pool": "a", "top1_err": 0.18},
        {"model": "student kd", "method": "kd", "seed": 1, "pool": "b", "top1_err": 0.16},
        {"model": "student x", "method": "kd", "seed": 0, "top1_err": 0.18},  # no pool: the mean ensemble
    ]
    df = bench.finish_table([{**r, "top3_err": 0.03} for r in raw], 10_000).set_index(["model", "seed"])
    assert df.loc[("student kd", 0), "gap_closed"] == pytest.approx(0.02 / 0.04)
    assert df.loc[("student kd", 1), "gap_closed"] == pytest.approx(0.04 / 0.08)  # CE needs no pool
    assert df.loc[("student x", 0), "gap_closed"] == pytest.approx(0.02 / 0.06)
    means = bench.method_means(df.reset_index(), 10_000).set_index("model")
    assert means.loc["student kd", "pools"] == 2
    assert means.loc["student kd", "gap_closed"] == pytest.approx(0.5)


def test_gap_closed_is_undefined_without_a_gap(bench):
    df = _table(
        bench,
        [
            ("ensemble_mean", "ensemble", 0, 0.20),
            ("student ce", "ce", 0, 0.20),
            ("student kd", "kd", 0, 0.19),
        ],
    )
    assert df["gap_closed"].isna().all()
    assert df.loc[df["model"] == "student kd", "ratio_to_ce"].item() == pytest.approx(0.95)


def _args(out: Path, **kw):
    import argparse

    base = dict(
        teachers="resnet18:32", batch_size=8, lr=0.1, precision="fp32", channels_last=False, device="cpu",
        aug="crop", label_smoothing=0.1, workers=0, teacher_epochs=1, student="resnet10t",
        student_kwargs="{}", student_epochs=4, seeds=2, best="meal-tuned", methods="", out_path=out,
        resume=True, publish="", keep_published=False, pool="p0",
    )  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def _summary(epochs: int, top1: float) -> pd.DataFrame:
    return pd.DataFrame(
        {"epoch": range(epochs), "val_top1": top1, "val_top3": 0.95, "train_time_s": 10.0, "d_acc_b0": 0.5}
    )


def test_a_methods_run_keeps_the_finished_students_it_was_not_asked_for(bench, tmp_path, monkeypatch):
    import distill.train

    args = _args(tmp_path, methods="meal-v2", seeds=1)
    for name, epochs in (("kd", 4), ("meal", 2)):  # kd finished, meal cut mid-run
        path = tmp_path / "students" / f"{name}-s0" / "student" / "summary.csv"
        path.parent.mkdir(parents=True)
        _summary(epochs, 0.8).to_csv(path, index=False)
    trained = []

    def fake_distill(cfg, resume, progress):
        trained.append(cfg.run_path.name)
        return _summary(4, 0.9)

    monkeypatch.setattr(distill.train, "distill", fake_distill)
    published = []
    rows = bench.stage_students(args, tmp_path / "images", lambda r: published.append(list(r)))
    assert {r["pool"] for r in rows} == {"p0"}
    assert trained == ["meal-v2-s0"]  # only what --methods asks for is trained
    assert [r["model"] for r in rows] == ["student kd", "student meal-v2"]  # roster order; meal unfinished
    assert rows[0]["top1_err"] == pytest.approx(0.2) and rows[1]["top1_err"] == pytest.approx(0.1)
    assert published[-1] == rows


def test_keep_published_carries_what_a_lost_run_directory_cannot_rebuild(bench, tmp_path, monkeypatch):
    import distill.train

    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(bench, "RESULTS", results)
    old = [  # a table from before the pool column, its run directories gone
        ("teacher resnet18", "teacher", 0, 0.20),
        ("ensemble_mean", "mean", 0, 0.16),
        ("student ce", "ce", 0, 0.20),
        ("student ce", "ce", 1, 0.21),
        ("student kd", "kd", 0, 0.19),
    ]
    _table(bench, old).to_csv(results / "t.csv", index=False)
    out = tmp_path / "out"
    path = out / "students" / "ce-s1" / "student" / "summary.csv"  # in this run: not carried
    path.parent.mkdir(parents=True)
    _summary(4, 0.7).to_csv(path, index=False)

    assert bench.carried_rows(_args(out, publish="t")) == []  # only when asked
    carried = bench.carried_rows(_args(out, publish="t", keep_published=True))
    assert [(r["model"], r["seed"]) for r in carried] == [
        ("teacher resnet18", 0),
        ("ensemble_mean", 0),
        ("student ce", 0),
        ("student kd", 0),
    ]
    assert {r["pool"] for r in carried} == {"unrecorded"}
    assert not any("gap_closed" in r or "ratio_to_ce" in r for r in carried)

    trained = []

    def fake_distill(cfg, resume, progress):
        trained.append(cfg.run_path.name)
        return _summary(4, 0.9)

    monkeypatch.setattr(distill.train, "distill", fake_distill)
    students = [r for r in carried if r["model"].startswith("student ")]
    rows = bench.stage_students(_args(out, methods="ce,kd", publish="t"), tmp_path, lambda r: None, students)
    assert trained == ["ce-s1", "kd-s1"]  # ce-s0 and kd-s0 carried; ce-s1 resumed here
    got = {(r["model"], r["seed"]): (r["pool"], round(r["top1_err"], 3)) for r in rows}
    assert got == {
        ("student ce", 0): ("unrecorded", 0.2),
        ("student ce", 1): ("p0", 0.1),
        ("student kd", 0): ("unrecorded", 0.19),
        ("student kd", 1): ("p0", 0.1),
    }


def test_the_tuned_student_reads_the_published_sweep_when_winner_json_is_gone(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    pd.DataFrame(
        {
            "trial": ["t1", "t2"],
            "distill.adversarial.spectral_norm": [True, False],
            "distill.temperature": [4.0, 1.0],
            "best_val_top1_err": [0.45, 0.47],
        }
    ).to_csv(tmp_path / "x_tune.csv", index=False)
    assert bench.tuned_overrides(tmp_path / "out") == []
    assert bench.tuned_overrides(tmp_path / "out", "x") == [
        "distill.adversarial.spectral_norm=true",
        "distill.temperature=4.0",
    ]
    out = tmp_path / "out"
    assert not bench.sweep_done(_args(out, publish="x"))  # the published winner counts only when kept
    assert bench.sweep_done(_args(out, publish="x", keep_published=True))
    assert not bench.sweep_done(_args(out, publish="x", keep_published=True, resume=False))
    (out / "tune").mkdir(parents=True)
    (out / "tune" / "winner.json").write_text('{"distill.temperature": 2.0}')
    assert bench.tuned_overrides(out, "x") == ["distill.temperature=2.0"]
    assert bench.sweep_done(_args(out))
