"""`imat report`: a self-contained page whose plots and thumbnails render in headless Chromium."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from student_kit import fake_run

from imat.app.cli import main
from imat.app.report import build_report
from imat.app.submission_choice import choose_submission
from imat.config import RunConfig, save_resolved


def make_run(root: Path) -> Path:
    run = root / "run"
    rng = np.random.default_rng(0)
    curves = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "train_loss": [2.0, 1.2, 0.8],
            "val_loss": [1.9, 1.3, 1.0],
            "val_top1": [0.3, 0.5, 0.6],
            "val_top3": [0.6, 0.8, 0.9],
        }
    )
    for name in ("resnet", "regnet"):
        (run / "teachers" / name).mkdir(parents=True)
        curves.to_csv(run / "teachers" / name / "summary.csv", index=False)
    (run / "student").mkdir()
    curves.assign(train_sim=[1.0, 0.7, 0.5], d_acc_teacher=[0.5, 0.6, 0.55]).to_csv(
        run / "student" / "summary.csv", index=False
    )
    pd.DataFrame(
        {
            "model": ["resnet", "regnet", "ensemble", "student"],
            "top1_err": [0.3, 0.35, 0.25, 0.28],
            "top3_err": [0.1, 0.12, 0.08, 0.09],
            "params": [5e6, 3e6, 8e6, 5e6],
            "images_per_s": [800, 900, 400, 2000],
        }
    ).to_csv(run / "results.csv", index=False)
    pd.DataFrame({"teacher": ["resnet", "regnet"], "top1": [0.7, 0.65]}).to_csv(
        run / "teachers" / "pool_eval.csv", index=False
    )
    ids = [f"{i:04d}.jpg" for i in range(30)]
    truth = rng.integers(0, 5, 30)
    preds = pd.DataFrame(
        {"image_id": ids, "topk_labels": [[int(t), (t + 1) % 5, (t + 2) % 5] for t in truth]}
    )
    preds.to_parquet(run / "predictions.parquet")
    pd.DataFrame({"id": ids, "expected": truth}).to_csv(root / "solution.csv", index=False)
    (run / "audit").mkdir()
    img = rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)
    cv2.imwrite(str(run / "audit" / "a.png"), img)
    pd.DataFrame({"path": ["a.png"], "given": [3], "suspicion": [0.97]}).to_csv(
        run / "audit" / "audit.csv", index=False
    )
    (run / "export").mkdir()
    (run / "export" / "student.onnx.json").write_text(
        '{"precision": "fp32", "verification": {"top3_agreement": 1.0}}'
    )
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"solution": str(root / "solution.csv")}}))
    return run


def test_report_holds_every_section(tmp_path: Path) -> None:
    page = build_report(make_run(tmp_path)).read_text()
    for heading in (
        "Results",
        "Teacher training curves",
        "Student training curves",
        "Test predictions",
        "Most suspicious training labels",
        "ONNX export verification",
    ):
        assert heading in page
    # 2 teacher curves + student curves + accuracy/cost + confusion + per-class + 1 audit thumbnail
    assert page.count("data:image/png;base64,") == 7
    assert "http://" not in page and "https://" not in page  # self-contained


def test_report_says_which_student_was_submitted_and_its_last_and_best_epoch(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fake_run(run / "student", [0.5, 0.9, 0.7], [0.8, 0.95, 0.9])  # best epoch 2 of 3
    fake_run(run / "baseline" / "student", [0.6, 0.8, 0.92, 0.91], [0.9, 0.96, 0.99, 0.98], method="ce")
    cfg = RunConfig.model_validate({"run_dir": str(run), "distill": {"student": {"arch": "resnet10t"}}})
    save_resolved(cfg, run / "config.yaml")
    record = choose_submission(cfg)
    page = build_report(run).read_text()
    assert "<h2>Submitted model</h2>" in page
    assert f"<p>{html.escape(record['reason'])}</p>" in page
    assert record["reason"].startswith("Submitted student alone (CE), not the distilled student (meal)")
    # each student's best and last epoch, and the distilled student's curves say it too
    section = page[page.index("<h2>Submitted model</h2>") :]
    table = section[: section.index("</table>")]
    header = re.findall(r"<th>(.*?)</th>", table)
    rows = {
        cells[0]: dict(zip(header, cells, strict=True))
        for cells in (
            re.findall(r"<td>(.*?)</td>", tr, re.S) for tr in re.findall(r"<tr>(.*?)</tr>", table, re.S)
        )
        if cells
    }
    assert [rows["student (meal)"][k] for k in ("best epoch", "last epoch", "submitted")] == ["2", "3", ""]
    assert [rows["student alone (CE)"][k] for k in ("best epoch", "last epoch", "submitted")] == [
        "3",
        "4",
        "yes",
    ]
    assert rows["student alone (CE)"]["val top-3 err %"] == "1.00"
    assert "Last epoch 3; best.safetensors holds epoch 2 (best validation top1)." in page


def test_report_of_an_empty_run_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "holds no results yet" in build_report(tmp_path / "empty").read_text()


def test_report_command_errors_on_missing_dir(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None and not os.environ.get("CI"), reason="Debian's chromium is not installed"
)
def test_report_renders_with_its_images_in_headless_chromium(tmp_path: Path) -> None:
    browser = _chromium()
    assert browser, "CI installs Debian's chromium (.ci/run); it is missing"
    page = build_report(make_run(tmp_path))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    found = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert found, "the page's load script did not run"
    assert found.group(1) == found.group(2) == "7"
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, *flags, "--window-size=1200,2000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    pixels = cv2.imread(str(shot))
    assert pixels is not None and pixels.std() > 10  # something was drawn, not a blank page


@pytest.mark.parametrize("d_acc,status,said", [(0.51, "inert", True), (0.8, "learning", False)])
def test_report_says_when_the_adversarial_term_was_inert(tmp_path: Path, d_acc, status, said) -> None:
    run = make_run(tmp_path)
    curves = pd.read_csv(run / "student" / "summary.csv")
    curves.assign(d_acc_b0=[0.5, 0.49, d_acc], adversarial=status).to_csv(
        run / "student" / "summary.csv", index=False
    )
    page = build_report(run).read_text()
    assert ("Adversarial term inert" in page) is said
    assert f"block 0 {d_acc:.2f}" in page
