"""The run's closing table says when a student's adversarial term was inert."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import timm
from student_kit import fake_run

from imat.app.results import _student_row, format_table
from imat.weights import read_meta, save_weights


def with_real_weights(folder: Path) -> Path:
    """fake_run's checkpoint holds a placeholder tensor; the table loads and times the real network."""
    meta = read_meta(folder / "best.safetensors")
    model = timm.create_model(meta["arch"], num_classes=meta["num_classes"])
    save_weights(
        folder / "best.safetensors",
        model.state_dict(),
        {**meta, "input_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0},
    )
    return folder


def test_results_row_notes_an_inert_adversarial_term(tmp_path: Path) -> None:
    inert = with_real_weights(fake_run(tmp_path / "a" / "student", [0.5, 0.6], [0.8, 0.9]))
    learning = with_real_weights(fake_run(tmp_path / "b" / "student", [0.5, 0.6], [0.8, 0.9]))
    for folder, status in ((inert, "inert"), (learning, "learning")):
        s = pd.read_csv(folder / "summary.csv")
        s.assign(d_acc_b0=[0.5, 0.7 if status == "learning" else 0.5], adversarial=status).to_csv(
            folder / "summary.csv", index=False
        )
    rows = [_student_row("student (meal)", inert, 2), _student_row("student (other)", learning, 2)]
    assert rows[0]["note"] == "adversarial term inert" and rows[1]["note"] == ""
    shown = format_table(pd.DataFrame(rows))
    assert "adversarial term inert" in shown.splitlines()[1] and "note" in shown.splitlines()[0]
    plain = format_table(pd.DataFrame([rows[1]]))
    assert "note" not in plain.splitlines()[0]
