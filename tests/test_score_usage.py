"""`imat score` with a Kaggle ``Usage`` column: overall, public and private scores; Ignored rows left out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imat.app.cli import main
from imat.errors import ImatError
from submit.score import score

# id 1, 2 public; 3, 4 private; 5 ignored. Top-1 right: 1, 3; top-3 right: 1, 2, 3; 5 right but ignored.
SUB = "id,predicted\n1,3 0 0\n2,0 7 0\n3,12\n4,0 1 2\n5,9\n"
SOL = "id,expected,Usage\n1,3,Public\n2,7,Public\n3,12,Private\n4,31,Private\n5,9,Ignored\n"


def _write(tmp_path: Path, sol: str = SOL) -> tuple[Path, Path]:
    (tmp_path / "sub.csv").write_text(SUB)
    (tmp_path / "sol.csv").write_text(sol)
    return tmp_path / "sub.csv", tmp_path / "sol.csv"


def test_public_private_scores_and_ignored_rows(tmp_path: Path) -> None:
    sub, sol = _write(tmp_path)
    r = score(sub, sol, "top3")
    assert r["images"] == 4 and r["ignored_images"] == 1
    assert (r["top1_error"], r["top3_error"], r["score"]) == (0.5, 0.25, 0.25)
    assert (r["public_images"], r["public_top1_error"], r["public_top3_error"]) == (2, 0.5, 0.0)
    assert (r["private_images"], r["private_top1_error"], r["private_top3_error"]) == (2, 0.5, 0.5)
    assert (r["public_score"], r["private_score"]) == (0.0, 0.5)
    assert score(sub, sol, "top1")["public_score"] == 0.5


def test_no_usage_column_keeps_the_plain_result(tmp_path: Path) -> None:
    sub, sol = _write(tmp_path, "id,expected\n1,3\n2,7\n3,12\n4,31\n5,9\n")
    r = score(sub, sol, "top3")
    assert r["images"] == 5 and r["top3_error"] == pytest.approx(0.2)
    assert not any(k.startswith(("public", "private", "ignored")) for k in r)


def test_ignored_rows_must_still_be_submitted(tmp_path: Path) -> None:
    (tmp_path / "sub.csv").write_text("id,predicted\n1,3\n2,7\n3,12\n4,31\n")
    (tmp_path / "sol.csv").write_text(SOL)
    with pytest.raises(ImatError, match="5"):
        score(tmp_path / "sub.csv", tmp_path / "sol.csv")


def test_bad_usage_value_is_one_clear_error(tmp_path: Path) -> None:
    sub, sol = _write(tmp_path, SOL.replace("3,12,Private", "3,12,Secret"))
    with pytest.raises(ImatError, match=r"line 4: Usage 'Secret'"):
        score(sub, sol)
    sub, sol = _write(
        tmp_path, "id,expected,Usage\n1,3,Ignored\n2,7,Ignored\n3,1,Ignored\n4,1,Ignored\n5,9,Ignored\n"
    )
    with pytest.raises(ImatError, match="nothing to score"):
        score(sub, sol)


def test_score_command_prints_and_writes_per_usage_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sub, sol = _write(tmp_path)
    out = tmp_path / "score.json"
    assert main(["score", str(sub), "--solution", str(sol), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 images" in printed
    assert (
        "leaderboard (top3 error): public 0.00000 (2 images), private 0.50000 (2 images); 1 ignored"
        in printed
    )
    data = json.loads(out.read_text())
    assert (data["public_score"], data["private_score"], data["score"]) == (0.0, 0.5, 0.25)
