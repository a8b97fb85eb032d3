"""`imat pipeline` and `imat demo`: every step from competition files to a scored submission and a
report; finished steps are skipped, a stopped pipeline picks up where it stopped, --force reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from imat.app.cli import main
from imat.kit import write_kit
from submit.score import score

TEACHER = {"name": "r10", "arch": "resnet10t", "input_size": 28, "crop_pct": 1.0}
TINY = {"epochs": 1, "batch_size": 32, "lr": 0.05, "aug": {"preset": "light", "flips": False}}


def write_config(root: Path, limit: int = 300) -> Path:
    kit = write_kit("mnist5k", root / "kit", seed=0, limit=limit)
    cfg = {
        "run_dir": str(root / "run"),
        "data": {
            "train": str(kit["train"]),
            "val": str(kit["val"]),
            "test": str(kit["test"]),
            "solution": str(kit["solution"]),
            "images": str(root / "images"),
            "num_workers": 0,
        },
        "teachers": {"defaults": TINY, "pool": [TEACHER]},
        "distill": {
            "method": "meal",
            "student": {"arch": "resnet10t", "input_size": 28, "crop_pct": 1.0},
            "blocks": [{"index": -2, "length": 8, "gamma": 0.05}, {"index": "logits"}],
            "train": TINY,
        },
        "export": {"verify_images": 16, "calibration_images": 16},
        "pipeline": {"baseline": True, "speed_images": 8, "audit_top": 8},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def statuses(out: str) -> dict[str, str]:
    """step -> status from the printed step table (steps this config does not need left out)."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-2] in {"ran", "earlier"}:
            rows[parts[0]] = " ".join(parts[1:-1])
    return rows


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("pipeline"))


def test_until_then_the_rest_then_force(config, capsys):
    run = Path(yaml.safe_load(config.read_text())["run_dir"])
    # a pipeline stopped after distillation ...
    assert main(["pipeline", str(config), "--until", "distill"]) == 0
    first = statuses(capsys.readouterr().out)
    assert first == {s: "ran" for s in ("data", "teachers", "evaluate", "audit", "distill")}
    assert (run / "student" / "best.safetensors").is_file() and not (run / "submission.csv").exists()

    # ... picks up where it stopped
    assert main(["pipeline", str(config)]) == 0
    out = capsys.readouterr().out
    second = statuses(out)
    assert all(second[s] == "done earlier" for s in ("data", "teachers", "evaluate", "audit", "distill"))
    later = ("baseline", "select", "export", "predict", "submit", "score", "results", "report")
    assert all(second[s] == "ran" for s in later), second
    for name in ("submission.csv", "score.json", "report.html", "predictions.parquet", "results.csv"):
        assert (run / name).is_file(), name
        assert str(run / name) in out or name in ("predictions.parquet", "results.csv")

    # the submission is complete and valid: one row per test image, scored against the kit's solution
    sub = pd.read_csv(run / "submission.csv")
    test_ids = [
        im["id"]
        for im in json.loads(Path(yaml.safe_load(config.read_text())["data"]["test"]).read_text())["images"]
    ]
    assert list(sub.columns) == ["id", "predicted"] and list(sub["id"]) == test_ids
    assert all(len(p.split()) == 3 for p in sub["predicted"])
    scored = json.loads((run / "score.json").read_text())
    again = score(run / "submission.csv", yaml.safe_load(config.read_text())["data"]["solution"], "top3")
    assert scored["top3_error"] == pytest.approx(again["top3_error"])

    # the comparison table holds every model the demo promises
    results = pd.read_csv(run / "results.csv")
    names = " | ".join(results["model"])
    for want in (
        "teacher r10",
        "ensemble_mean",
        "student alone (CE)",
        "student (meal)",
        "student (ONNX fp32)",
    ):
        assert want in names, names
    assert results["top1_err"].between(0, 1).all() and (results["images_per_s"] > 0).all()
    student = results.set_index("model").loc["student (meal)"]
    summary = pd.read_csv(run / "student" / "summary.csv")
    assert student["top1_err"] == pytest.approx(1 - summary["val_top1"].iloc[-1])

    # the student submitted is the one with the lowest validation top-3 error (ties: the distilled one),
    # it is the one exported, the table marks it and the run's summary says why
    record = json.loads((run / "submission.json").read_text())
    cands = record["candidates"]
    for c in cands:
        assert {
            "name",
            "top1_err",
            "top3_err",
            "images_per_s",
            "params",
            "tta",
            "fits_budget",
            "submitted",
        } <= set(c)
        assert c["images_per_s"] > 0 and c["params"] > 0 and 0 <= c["top3_err"] <= 1
    # the default budget is the student's cost: students without TTA fit; TTA and the pool are compared
    assert any(c["kind"] == "pool" for c in cands)
    assert all(c["fits_budget"] == (c["kind"] == "student" and c["tta"]["views"] == 1) for c in cands)
    errors = {c["name"]: c["top3_err"] for c in cands if c["fits_budget"]}
    assert set(errors) == {"student (meal)", "student alone (CE)"} and record["select_by"] == "top3"
    best = min(errors.values())
    assert errors[record["model"]] == best
    assert record["model"] == ("student (meal)" if errors["student (meal)"] == best else "student alone (CE)")
    assert "candidates (validation; budget: the student's cost" in out
    assert (
        json.loads((run / "export" / "student.onnx.json").read_text())["checkpoint"] == record["checkpoint"]
    )
    assert list(results.loc[results["submitted"], "model"]) == [record["model"]]
    assert record["reason"] in out and record["reason"].startswith(f"Submitted {record['model']}")

    # a rerun does nothing; --force export reruns export and every later step only
    assert main(["pipeline", str(config)]) == 0
    assert set(statuses(capsys.readouterr().out).values()) == {"done earlier"}
    stamp = (run / "student" / "best.safetensors").stat().st_mtime_ns
    assert main(["pipeline", str(config), "--force", "export"]) == 0
    forced = statuses(capsys.readouterr().out)
    assert forced["distill"] == "done earlier" and all(forced[s] == "ran" for s in later[2:])
    assert (run / "student" / "best.safetensors").stat().st_mtime_ns == stamp

    # a step whose output went missing is run again, and the steps after it (their input changed)
    (run / "submission.csv").unlink()
    assert main(["pipeline", str(config)]) == 0
    redo = statuses(capsys.readouterr().out)
    assert redo["submit"] == "ran" and redo["predict"] == "done earlier" and redo["score"] == "ran"


@pytest.mark.parametrize(
    ("forced", "name", "folder"),
    [("baseline", "student alone (CE)", "baseline/student"), ("distilled", "student (meal)", "student")],
)
def test_submit_model_exports_the_student_a_team_forces(config, capsys, forced, name, folder):
    run = Path(yaml.safe_load(config.read_text())["run_dir"])
    assert main(["pipeline", str(config)]) == 0  # the finished run of the test above (or a fresh one)
    capsys.readouterr()
    # changing the setting reruns the choice and what follows it, not the training
    assert main(["pipeline", str(config), f"pipeline.submit_model={forced}"]) == 0
    out = capsys.readouterr().out
    steps = statuses(out)
    assert steps["distill"] == steps["baseline"] == "done earlier"
    assert all(steps[s] == "ran" for s in ("select", "export", "predict", "submit", "results", "report"))
    record = json.loads((run / "submission.json").read_text())
    assert record["model"] == name and record["checkpoint"] == str(run / folder / "best.safetensors")
    assert f"pipeline.submit_model={forced}" in record["reason"] and record["reason"] in out
    assert (
        json.loads((run / "export" / "student.onnx.json").read_text())["checkpoint"] == record["checkpoint"]
    )
    results = pd.read_csv(run / "results.csv")
    assert list(results.loc[results["submitted"], "model"]) == [name]
    marked = [line for line in out.splitlines() if line.rstrip().endswith(" yes")]
    assert len(marked) == 1 and name in marked[0]
    assert record["reason"] in (run / "report.html").read_text()


def test_label_audit_then_clean_then_teachers(tmp_path, capsys):
    """data.clean from this run's audit: the pipeline cross-fits the audit, cleans, then trains on it."""
    config = write_config(tmp_path, limit=80)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["clean"] = {"from": "audit", "action": "relabel", "top": 5}
    raw["audit"] = {"folds": 2}
    config.write_text(yaml.safe_dump(raw))
    run = Path(raw["run_dir"])
    assert main(["pipeline", str(config), "--until", "teachers"]) == 0
    out = capsys.readouterr().out
    ran = statuses(out)
    assert list(ran) == ["data", "label_audit", "clean", "teachers"], ran
    assert out.index("== label_audit ==") < out.index("== clean ==") < out.index("== teachers ==")
    info = json.loads((run / "audit" / "audit.json").read_text())
    assert info["probabilities"] == "out_of_sample" and info["folds"] == 2
    changes = pd.read_csv(run / "data" / "clean.csv")
    audit = pd.read_csv(run / "audit" / "audit.csv")
    assert list(changes["image_id"]) == list(audit["image_id"].head(5)) and set(changes["action"]) == {
        "relabel"
    }
    pool = json.loads((run / "teachers" / "pool.json").read_text())
    assert pool["clean"]["images"] == 5 and pool["clean"]["action"] == "relabel"
    assert main(["report", str(run)]) == 0
    report = (run / "report.html").read_text()
    assert "Cleaning applied before training" in report and "out_of_sample" in report


def test_unknown_step_is_a_one_line_error(config, capsys):
    with pytest.raises(SystemExit):
        main(["pipeline", str(config), "--force", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_demo_end_to_end_with_tiny_overrides(tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--limit",
        "300",
        f"teachers.pool=[{json.dumps(TEACHER)}]",
        "teachers.defaults.epochs=1",
        "distill.train.epochs=1",
        "pipeline.speed_images=8",
        "pipeline.audit_top=8",
        "export.verify_images=16",
        "export.calibration_images=16",
        "submit.tta_search=false",  # the candidates' TTA search is the budget tests' to check
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for line in (
        "submission.csv:",
        "submission.json:",
        "report.html:",
        "student (ONNX fp32)",
        "student alone (CE)",
        # the closing table also lists the candidates the select step measured, with their cost
        "candidates (validation; budget: the student's cost",
        "pool (1 teacher, mean)",
        "fits budget",
    ):
        assert line in printed
    # the table marks the student that was submitted, and the line under it says why
    record = json.loads((out / "submission.json").read_text())
    marked = [line for line in printed.splitlines() if line.rstrip().endswith(" yes")]
    assert len(marked) == 1 and record["model"] in marked[0]
    assert record["reason"] in printed
    assert (out / "kit" / "train.json").is_file() and (out / "images" / "download_status.csv").is_file()
    report = (out / "report.html").read_text()
    assert "data:image/png;base64" in report
    assert "Most suspicious training labels" in report and "teachers say" in report  # the audit gallery
    assert len(pd.read_csv(out / "submission.csv")) == len(pd.read_csv(out / "kit" / "solution.csv"))


def test_without_a_budget_the_most_accurate_candidate_is_submitted_and_the_test_agrees(
    config, capsys, tmp_path
):
    from submit.formats import write_submission
    from submit.predict import predict, read_predictions

    raw = yaml.safe_load(config.read_text())
    run, data = Path(raw["run_dir"]), raw["data"]
    assert main(["pipeline", str(config), "submit.budget=none"]) == 0
    out = capsys.readouterr().out
    steps = statuses(out)
    assert steps["distill"] == steps["baseline"] == "done earlier"
    assert all(steps[s] == "ran" for s in ("select", "export", "predict", "submit", "score"))
    record = json.loads((run / "submission.json").read_text())
    cands = record["candidates"]
    assert record["budget"] == "no budget" and all(c["fits_budget"] for c in cands)
    kinds = {(c["kind"], c["tta"]["views"] > 1) for c in cands}
    assert ("pool", False) in kinds  # the pool competes with the students
    # a TTA variant is listed only where a TTA setting won on validation, and its error is cross-fitted
    assert all("cross-fitted" in c["measured_on"] for c in cands if c["tta"]["views"] > 1)
    # the most accurate on validation (ties: the earlier candidate) is submitted, exported and run
    best = min(c["top3_err"] for c in cands)
    chosen = next(c for c in cands if c["top3_err"] == best)
    assert chosen["submitted"] and record["model"] == chosen["name"] and record["tta"] == chosen["tta"]
    onnx = run / "export" / ("pool.onnx" if chosen["kind"] == "pool" else "student.onnx")
    assert json.loads(onnx.with_name(onnx.name + ".json").read_text())["checkpoint"] == record["checkpoint"]
    assert read_predictions(run / "predictions.parquet")[1]["tta"]["label"] == chosen["tta"]["label"]
    assert "candidates (validation; budget: no budget" in out and chosen["name"] in out
    report = (run / "report.html").read_text()
    assert "fits budget" in report and "Budget: no budget." in report

    # every candidate on the test split, scored with `imat score`: the submitted one is as good as the
    # best of them within the noise of the test set (95%, two independent error rates)
    test_err = {}
    for i, c in enumerate(cands):
        preds, csv, scored = tmp_path / f"{i}.parquet", tmp_path / f"{i}.csv", tmp_path / f"{i}.json"
        tta = c["tta"]
        predict(
            c["onnx"],
            data["test"],
            preds,
            images=data["images"],
            split="test",
            workers=0,
            tta_flip=tta["flip"],
            tta_scales=tta["scales"],
            progress=False,
        )
        write_submission(preds, "product2019", data["test"], csv, train=run / "data" / "manifest.parquet")
        assert main(["score", str(csv), "--solution", data["solution"], "--out", str(scored)]) == 0
        test_err[c["name"]] = json.loads(scored.read_text())["top3_error"]
    assert main(["score", str(run / "submission.csv"), "--solution", data["solution"]]) == 0
    submitted = json.loads((run / "score.json").read_text())
    n = submitted["images"]
    assert submitted["top3_error"] == pytest.approx(test_err[chosen["name"]], abs=2 / n)  # fp32 export
    p = max(min(test_err.values()), 1 / n)
    noise = 1.96 * (2 * p * (1 - p) / n) ** 0.5
    assert test_err[chosen["name"]] <= min(test_err.values()) + noise, (test_err, noise)


def test_a_candidate_that_fails_to_export_is_left_out_with_its_reason(config, monkeypatch, caplog):
    """A pool too large to export (protobuf's 2 GB) must not stop the select step: that candidate is
    left out with one warning and its reason in submission.json, and the others are compared."""
    import imat.app.candidates as candidates
    from imat.app.submission_choice import choose_submission
    from imat.config.loader import load_config
    from imat.errors import ImatError

    quick_export = candidates._quick_export

    def failing(loaded, out, cfg):
        if "-pool" in out.name:
            raise ImatError("ONNX export failed (dynamo: ValueError: Message onnx.ModelProto exceeds 2GB)")
        return quick_export(loaded, out, cfg)

    monkeypatch.setattr(candidates, "_quick_export", failing)
    cfg = load_config(config, ["submit.budget=none", "submit.tta_search=false"])
    kept = (cfg.run_path / "submission.json").read_bytes()
    try:
        with caplog.at_level("WARNING", logger="imat.candidates"):
            record = choose_submission(cfg)
    finally:
        (cfg.run_path / "submission.json").write_bytes(kept)
    assert [c["kind"] for c in record["candidates"]] == ["student", "student"]
    assert record["kind"] == "student" and record["model"] in {c["name"] for c in record["candidates"]}
    (gone,) = record["left_out"]
    assert gone["name"] == "pool (1 teacher, mean)" and "exceeds 2GB" in gone["reason"]
    warned = [r for r in caplog.records if "left out" in r.getMessage()]
    assert len(warned) == 1 and "pool (1 teacher, mean)" in warned[0].getMessage()
