"""The select step: the pipeline submits the run's best student on validation, says why in
submission.json, and a team can force the distilled student or the student alone.

Student runs are faked here (a summary.csv and a best.safetensors with the metadata the engine writes)
since which one wins depends only on those files; tests/test_pipeline.py runs the step for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from student_kit import fake_run

from imat.app.submission_choice import (
    choice_is_current,
    choose_submission,
    chosen_checkpoint,
    distillation_note,
    find_candidates,
    select_metric,
)
from imat.config import RunConfig
from imat.errors import ImatError


def config(tmp_path: Path, **sections) -> RunConfig:
    raw = {
        "run_dir": str(tmp_path / "run"),
        "distill": {"method": "meal", "student": {"arch": "resnet10t"}},
        **sections,
    }
    return RunConfig.model_validate(raw)


def two_students(tmp_path: Path, distilled: tuple[float, float], baseline: tuple[float, float]) -> RunConfig:
    """A distilled student and a student alone whose best epochs have these (top-1, top-3) accuracies."""
    run = tmp_path / "run"
    fake_run(run / "student", [0.5, distilled[0], 0.6], [0.7, distilled[1], 0.8])
    fake_run(run / "baseline" / "student", [0.5, baseline[0], 0.6], [0.7, baseline[1], 0.8], method="ce")
    return config(tmp_path)


def test_a_better_student_alone_is_submitted_and_the_record_says_why(tmp_path):
    cfg = two_students(tmp_path, distilled=(0.816, 0.95), baseline=(0.848, 0.97))
    record = choose_submission(cfg)
    assert record["role"] == "baseline" and record["model"] == "student alone (CE)"
    assert record["checkpoint"] == str(cfg.run_path / "baseline" / "student" / "best.safetensors")
    assert chosen_checkpoint(cfg) == cfg.run_path / "baseline" / "student" / "best.safetensors"
    assert record["select_by"] == "top3"  # product2019, the default format
    assert record["reason"] == (
        "Submitted student alone (CE), not the distilled student (meal): its validation top-3 error is "
        "lower (3.00% vs student (meal) 5.00%)."
    )
    on_disk = json.loads((cfg.run_path / "submission.json").read_text())
    assert on_disk == record
    scores = {c["role"]: (c["top1_err"], c["top3_err"], c["submitted"]) for c in on_disk["candidates"]}
    assert scores["baseline"] == (pytest.approx(0.152), pytest.approx(0.03), True)
    assert scores["distilled"] == (pytest.approx(0.184), pytest.approx(0.05), False)
    # the scores are those of the checkpoint's epoch (the best one, 2), not of the last epoch (3)
    assert {(c["best_epoch"], c["last_epoch"]) for c in on_disk["candidates"]} == {(2, 3)}


def test_a_better_distilled_student_is_submitted(tmp_path):
    cfg = two_students(tmp_path, distilled=(0.85, 0.98), baseline=(0.84, 0.96))
    record = choose_submission(cfg)
    assert record["role"] == "distilled" and record["checkpoint"].endswith("run/student/best.safetensors")
    assert record["reason"] == (
        "Submitted student (meal): the lowest validation top-3 error of the 2 students compared "
        "(2.00%; student alone (CE) 4.00%)."
    )


def test_a_tie_goes_to_the_distilled_student(tmp_path):
    cfg = two_students(tmp_path, distilled=(0.80, 0.97), baseline=(0.85, 0.97))
    record = choose_submission(cfg)
    assert record["role"] == "distilled"
    assert "ties with student alone (CE), and ties go to the distilled student" in record["reason"]


@pytest.mark.parametrize(
    ("fmt", "overrides", "metric", "winner"),
    [
        ("product2019", {}, "top3", "distilled"),  # leaderboard metric top-3: distilled 2% vs 4%
        ("furniture2018", {}, "top1", "baseline"),  # top-1: the student alone 10% vs 20%
        ("coco", {"topk": 1}, "top1", "baseline"),  # single-label iNat/Herbarium form
        ("product2019", {"select_by": "top1"}, "top1", "baseline"),  # an explicit select_by wins
    ],
)
def test_the_metric_defaults_to_the_submission_format(tmp_path, fmt, overrides, metric, winner):
    run = tmp_path / "run"
    fake_run(run / "student", [0.8], [0.98])
    fake_run(run / "baseline" / "student", [0.9], [0.96], method="ce")
    cfg = config(tmp_path, submit={"format": fmt, **overrides})
    assert select_metric(cfg) == metric
    assert choose_submission(cfg)["role"] == winner


def test_submit_model_forces_either_student(tmp_path):
    # the student alone is better, but the team forces the distilled one ...
    cfg = two_students(tmp_path, distilled=(0.816, 0.95), baseline=(0.848, 0.97))
    forced = cfg.model_copy(
        update={"pipeline": cfg.pipeline.model_copy(update={"submit_model": "distilled"})}
    )
    record = choose_submission(forced)
    assert record["role"] == "distilled" and record["submit_model"] == "distilled"
    assert record["reason"] == (
        "Submitted student (meal) because pipeline.submit_model=distilled "
        "(validation top-3 error: student (meal) 5.00%, student alone (CE) 3.00%)."
    )
    # ... and the other way round
    cfg = two_students(tmp_path, distilled=(0.9, 0.99), baseline=(0.8, 0.9))
    forced = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"submit_model": "baseline"})})
    record = choose_submission(forced)
    assert record["role"] == "baseline" and "pipeline.submit_model=baseline" in record["reason"]
    assert chosen_checkpoint(forced).parent == cfg.run_path / "baseline" / "student"


def test_forcing_a_student_alone_that_was_not_trained_is_a_one_line_error(tmp_path):
    fake_run(tmp_path / "run" / "student", [0.8], [0.9])
    cfg = config(tmp_path, pipeline={"submit_model": "baseline"})
    with pytest.raises(ImatError, match=r"pipeline.submit_model: baseline, but the run has no student alone"):
        choose_submission(cfg)
    ce = config(
        tmp_path,
        pipeline={"submit_model": "baseline"},
        distill={"method": "ce", "student": {"arch": "resnet10t"}},
    )
    with pytest.raises(ImatError, match="distill.method is ce"):
        choose_submission(ce)
    assert not (tmp_path / "run" / "submission.json").exists()


def test_other_student_runs_of_the_deployment_architecture_compete(tmp_path):
    cfg = two_students(tmp_path, distilled=(0.85, 0.95), baseline=(0.84, 0.94))
    run = cfg.run_path
    trial = fake_run(run / "tune" / "distill" / "trial_1" / "run" / "student", [0.9], [0.99])
    fake_run(run / "tune" / "distill" / "trial_2" / "run" / "student", [0.95], [1.0], arch="resnet18")
    fake_run(run / "teachers" / "r10", [0.99], [1.0], kind="teacher")
    other = {"source_labels": ["a", "b", "c"], "names": [], "label_type": "str"}
    fake_run(run / "elsewhere" / "student", [0.99], [1.0], classes=other)
    names = [c.name for c in find_candidates(cfg)]
    assert names == [
        "student (meal)",
        "student alone (CE)",
        "student (meal, tune/distill/trial_1/run/student)",
    ]
    record = choose_submission(cfg)
    assert record["role"] == "other" and record["checkpoint"] == str(trial / "best.safetensors")
    assert "not the distilled student (meal)" in record["reason"]


def test_without_validation_scores_the_distilled_student_is_submitted(tmp_path):
    run = tmp_path / "run"
    fake_run(run / "student", [0.5, 0.6], [0.7, 0.8], validation=False)
    fake_run(run / "baseline" / "student", [0.5, 0.6], [0.7, 0.8], validation=False, method="ce")
    record = choose_submission(config(tmp_path))
    assert record["role"] == "distilled" and "no labelled validation split" in record["reason"]
    assert {c["picked_on"] for c in record["candidates"]} == {"training loss (no validation)"}


def test_the_choice_is_redone_when_the_settings_or_the_students_change(tmp_path):
    cfg = two_students(tmp_path, distilled=(0.85, 0.95), baseline=(0.84, 0.94))
    assert not choice_is_current(cfg)
    choose_submission(cfg)
    assert choice_is_current(cfg)
    forced = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"submit_model": "baseline"})})
    assert not choice_is_current(forced)
    fake_run(cfg.run_path / "tune" / "distill" / "trial_1" / "run" / "student", [0.9], [0.99])
    assert not choice_is_current(cfg)


def test_distillation_note_weighs_the_difference_against_the_validation_noise(tmp_path):
    """The demo's case: 1.8% vs 1.6% top-1 error on 500 images is one image, inside the noise; the same
    rates on 50,000 images are not; a clear gain says so; no student alone, no note."""
    cfg = two_students(tmp_path, distilled=(0.982, 1.0), baseline=(0.984, 1.0))
    cands = find_candidates(cfg)
    small = distillation_note(cands, 500)
    assert small is not None and "1.80% vs 1.60%" in small and "+0.20 points" in small
    assert "cannot be told apart" in small
    assert "distillation hurt, beyond the noise" in distillation_note(cands, 50_000)
    cfg = two_students(tmp_path / "gain", distilled=(0.90, 0.99), baseline=(0.80, 0.95))
    assert "distillation helped, beyond the noise" in distillation_note(find_candidates(cfg), 2_000)
    lone = [c for c in find_candidates(cfg) if c.role == "distilled"]
    assert distillation_note(lone, 2_000) is None and distillation_note(cands, 0) is None
