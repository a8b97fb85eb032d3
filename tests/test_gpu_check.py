"""benchmarks/gpu_check.sh without a GPU: its --dry-run runs every step on the CPU at toy sizes, appends
the training checks' rows when benchmarks/gpu_check_train.py exists, and the Python part runs with the
packages a bare GPU machine lacks (albumentations, OpenCV, pydantic, pyarrow) made unimportable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [
    "check",
    "arch",
    "engine",
    "precision",
    "batch",
    "images_per_s",
    "top1_agreement",
    "top3_agreement",
    "ok",
    "note",
]
TOY = [
    "--device", "cpu", "--providers", "cpu", "--arch", "resnet10t", "--size", "32", "--classes", "5",
    "--train-images", "32", "--train-epochs", "1", "--train-batch", "16", "--val-images", "16",
    "--calibration-images", "8", "--batch", "8", "--batches", "1", "--e2e-repeats", "1", "--workers", "0",
]  # fmt: skip

FAKE_TRAIN = """
import argparse, csv, os
p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
a = p.parse_args()
with open(a.out, "a", newline="") as f:
    csv.writer(f).writerow(["train-step", "resnet50", "torch ddp", "bf16", 64, 1.0, "", "", os.environ["GPU_CHECK_DRY_RUN"] == "1", "fake"])
"""


def test_gpu_check_sh_dry_run_appends_the_training_rows(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "benchmarks").mkdir(parents=True)
    for name in ("gpu_check.sh", "gpu_check.py"):
        shutil.copy(ROOT / "benchmarks" / name, checkout / "benchmarks" / name)
    (checkout / "benchmarks" / "gpu_check_train.py").write_text(FAKE_TRAIN)
    out = tmp_path / "results" / "gpu.csv"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        ["bash", str(checkout / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(out)
    assert list(table.columns) == COLUMNS
    checks = table["check"].tolist()
    assert checks[0] == "reference" and checks[-1] == "train-step"  # the training part came after
    assert {"model-only", "end-to-end"} <= set(checks)
    inference = table[table["check"].isin(["model-only", "end-to-end"])]
    assert set(inference["precision"]) == {"fp32", "int8"}  # fp16 is not run on the CPU provider
    assert (inference["images_per_s"] > 0).all() and inference["top3_agreement"].between(0, 1).all()
    assert bool(table.iloc[-1]["ok"])  # it was told it is a dry run
    assert "done in" in proc.stdout


def test_gpu_check_runs_without_albumentations_opencv_pydantic_pyarrow(tmp_path: Path) -> None:
    blocked = ("albumentations", "cv2", "pydantic", "pyarrow", "onnxscript")
    code = (
        "import runpy, sys\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        f"sys.argv = ['gpu_check.py', '--out', {str(tmp_path / 'g.csv')!r}, *{TOY!r}]\n"
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu_check.py')!r}, run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(tmp_path / "g.csv")
    e2e = table[table["check"] == "end-to-end"]
    assert len(e2e) == 2 and e2e["note"].str.contains("PIL\\+torchvision").all()
    assert (e2e["images_per_s"] > 0).all()
