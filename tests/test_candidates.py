"""The select step's candidates: post-processing chosen on one half of validation and scored on the
other (cross-fitted), the budget filter and the choice within it (tests/test_pipeline.py runs them on
the embedded kit)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imat.app.candidates import Members, Option, crossfit, halves
from imat.app.submission_choice import (
    Candidate,
    budget_text,
    choose,
    fits_budget,
    submitted_postprocessing,
)
from imat.config import RunConfig
from imat.errors import ImatError
from submit.tta import make_tta


def _onehot(pred: np.ndarray, classes: int = 4) -> np.ndarray:
    p = np.full((len(pred), classes), 0.1 / (classes - 1), dtype=np.float32)
    p[np.arange(len(pred)), pred] = 0.9
    return p


def test_halves_are_disjoint_seeded_and_skip_unlabelled_rows():
    labels = np.array([0, 1, -1, 2, 3, 0, 1, -1, 2, 3])
    a, b = halves(labels)
    assert not set(a) & set(b) and set(a) | set(b) == set(np.flatnonzero(labels >= 0))
    assert abs(len(a) - len(b)) <= 1
    again = halves(labels)
    assert (again[0] == a).all() and (again[1] == b).all()


def test_a_setting_tuned_on_half_the_images_is_scored_on_the_other_half():
    labels = np.arange(200) % 4
    a, b = halves(labels)
    wrong = (labels + 1) % 4
    plain_pred = np.where(np.arange(200) % 10 < 6, labels, wrong)  # right on 60% of every half
    lucky_pred = wrong.copy()
    lucky_pred[a] = labels[a]  # right on every image of half a, wrong on half b: 50% overall
    plain = Option(make_tta(), False, _onehot(plain_pred))
    lucky = Option(make_tta(True), False, _onehot(lucky_pred))
    fit = crossfit([lucky, plain], labels, "top1")
    assert fit.option is plain  # best on the whole split
    # chosen on a (lucky, 100%) and scored on b (0%); chosen on b (plain) and scored on a (60%)
    held_a = (plain_pred[a] == labels[a]).mean()
    assert fit.top1_err == pytest.approx(1 - held_a * len(a) / 200)
    assert fit.top1_err > 0.6  # never the 0% error lucky shows on the half it was chosen on
    assert "cross-fitted over 2 settings" in fit.how
    assert [r["tta"] for r in fit.per_option] == ["none", "flip"]  # cheaper first


def _teacher(labels: np.ndarray, right: np.ndarray, classes: int = 10) -> np.ndarray:
    """Probabilities 0.9 on the label for the rows in ``right``, 0.6 on the next class elsewhere."""
    p = np.full((len(labels), classes), 0.4 / (classes - 1), dtype=np.float32)
    wrong = np.setdiff1d(np.arange(len(labels)), right)
    p[right] = 0.1 / (classes - 1)
    p[right, labels[right]] = 0.9
    p[wrong, (labels[wrong] + 1) % classes] = 0.6
    return p


def test_a_greedy_selection_perfect_in_sample_is_not_credited_with_that_error():
    """Each teacher is right on one half only: together they are perfect on the whole split, so the
    greedy selection takes both; chosen on either half, it keeps the one teacher right there, which
    is wrong on every held-out image. The candidate reports that, not the in-sample 0%."""
    from teachers.ensemble import ensemble_probs

    labels = np.random.default_rng(1).integers(0, 10, 40)
    a, b = halves(labels)
    probs = np.stack([_teacher(labels, a), _teacher(labels, b)])
    whole = Option(make_tta(), False, ensemble_probs(probs, "mean"))
    members = Members(probs, ["t0", "t1"], ["t0", "t1"], "top1", "mean")
    fit = crossfit([whole], labels, "top1", members)
    assert fit.per_option[0]["top1_err"] == 0.0  # in-sample: perfect
    assert fit.top1_err == 1.0 and fit.option is whole
    assert fit.how == "validation, cross-fitted over the greedy selection"
    # a selection both halves agree on is scored with the exported model's probabilities, held out
    good = Members(
        np.stack([_teacher(labels, np.arange(40)), probs[1]]), ["t0", "t1"], ["t0"], "top1", "mean"
    )
    alone = crossfit([Option(make_tta(), False, good.probs[0])], labels, "top1", good)
    assert alone.top1_err == 0.0


def test_equal_settings_go_to_the_cheaper_and_one_setting_is_scored_on_all_images():
    labels = np.arange(40) % 4
    probs = _onehot(labels)
    fit = crossfit(
        [Option(make_tta(True, [1.0, 1.15]), True, probs), Option(make_tta(), False, probs)], labels, "top3"
    )
    assert fit.option.tta.views == 1 and fit.option.prior is False and fit.top1_err == 0
    alone = crossfit([Option(make_tta(), False, probs)], labels, "top1")
    assert alone.how == "validation" and alone.top1_err == 0


def _cand(name: str, err: float, params: int, speed: float, views: int = 1, **kw) -> Candidate:
    tta = {"flip": views > 1, "scales": [1.0], "views": views, "label": "flip" if views > 1 else "none"}
    return Candidate(
        role=kw.pop("role", "other"),
        name=name,
        run_dir="x",
        checkpoint=f"{name}.safetensors",
        top1_err=err,
        top3_err=err,
        best_epoch=None,
        last_epoch=None,
        picked_on="",
        images_per_s=speed,
        params=params,
        tta=tta,
        **kw,
    )


@pytest.mark.parametrize(
    ("budget", "fit"),
    [
        ("student", ["student", "other student"]),
        ("none", ["student", "other student", "student + TTA flip", "pool"]),
        ({"images_per_s": 500}, ["student", "other student", "student + TTA flip"]),
        ({"params": 2_000_000}, ["student", "other student", "student + TTA flip"]),
        (
            {"images_per_s": 100, "params": 10_000_000},
            ["student", "other student", "student + TTA flip", "pool"],
        ),
        ({"images_per_s": 2000}, []),
    ],
)
def test_the_budget_keeps_the_candidates_it_allows(budget, fit):
    cfg = RunConfig.model_validate({"submit": {"budget": budget}})
    cands = [
        _cand("student", 0.2, 1_000_000, 1000, role="distilled"),
        _cand("other student", 0.19, 1_000_000, 990),
        _cand("student + TTA flip", 0.15, 1_000_000, 500, views=2),
        _cand("pool", 0.1, 5_000_000, 200, kind="pool"),
    ]
    for c in cands:
        c.fits_budget = fits_budget(c, cfg, cands[0])
    assert [c.name for c in cands if c.fits_budget] == fit
    text = budget_text(cfg, cands[0])
    if not fit:
        with pytest.raises(ImatError, match="no candidate with a validation score is within"):
            choose(cands, "top3", "best", text)
        return
    chosen, reason = choose(cands, "top3", "best", text)
    assert chosen.name == fit[-1]  # the most accurate within the budget
    assert reason.startswith(f"Submitted {fit[-1]}: the lowest validation top-3 error")
    if fit[-1] != "pool":
        assert "more accurate but over the budget: " in reason and reason.endswith("pool 10.00%.")


def test_budget_keys_are_validated():
    with pytest.raises(ValueError):
        RunConfig.model_validate({"submit": {"budget": {"images_per_s": -1}}})
    with pytest.raises(ValueError):
        RunConfig.model_validate({"submit": {"budget": "cheap"}})
    with pytest.raises(ValueError):
        RunConfig.model_validate({"submit": {"tta_scales": [1.0, 1.0]}})


def test_the_submitted_post_processing_is_the_chosen_one(tmp_path):
    cfg = RunConfig.model_validate({"run_dir": str(tmp_path), "submit": {"prior_correction": "auto"}})
    assert submitted_postprocessing(cfg) == (False, [1.0], False)  # no choice yet: auto is off
    record = {"tta": {"flip": True, "scales": [1.0, 1.15], "views": 4}, "prior_correction": True}
    (tmp_path / "submission.json").write_text(json.dumps(record))
    assert submitted_postprocessing(cfg) == (True, [1.0, 1.15], True)
    fixed = cfg.model_copy(update={"submit": cfg.submit.model_copy(update={"prior_correction": False})})
    assert submitted_postprocessing(fixed)[2] is False  # an explicit setting wins over the choice


def test_candidates_decode_validation_as_the_run_does(tmp_path, monkeypatch):
    """Validation images are decoded for the candidates under the run's pixel limit and draft setting."""
    import pandas as pd

    import submit.predict
    from imat.app.candidates import Model, ValRows, _options

    onnx = tmp_path / "0-student.onnx"
    desc = {"input_size": 32, "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.25] * 3}
    (tmp_path / "0-student.onnx.json").write_text(json.dumps(desc))
    seen = []

    def fake_predict(model, source, out=None, **kw):
        seen.append(kw)
        return pd.DataFrame({"missing": [False, True], "probs": [np.full(4, 0.25, np.float32), np.zeros(0)]})

    monkeypatch.setattr(submit.predict, "predict", fake_predict)
    cfg = RunConfig.model_validate(
        {
            "run_dir": str(tmp_path),
            "data": {"max_pixels": 1234, "draft": False},
            "submit": {"tta_search": False},
        }
    )
    model = Model("student", "student", tmp_path / "best.safetensors", onnx, 10, 1.0)
    options, missing = _options(cfg, model, ValRows(np.array([0, 1]), 4), None)
    assert len(options) == 1 and missing.tolist() == [False, True]
    assert seen and all(kw["max_pixels"] == 1234 and kw["draft"] is False for kw in seen)
