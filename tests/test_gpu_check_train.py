"""benchmarks/gpu_check_train.py: its CPU-safe parts (the GPU rows are produced on a GPU machine)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check_train.py"


def _run(out: Path, *only: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--tiny",
        "--epochs",
        "1",
        "--only",
        *only,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_training_checks_append_rows_to_the_shared_table(tmp_path):
    out = tmp_path / "gpu_check.csv"
    with open(out, "w", newline="") as f:  # gpu_check.sh's own rows come first; ours are appended
        csv.writer(f).writerow(
            [
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
        )
        csv.writer(f).writerow(
            ["onnx_cuda", "resnet18", "onnxruntime", "fp16", 64, 900.0, 0.999, 1.0, True, ""]
        )
    proc = _run(out, "teacher_epoch", "meal_alternating")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["check"] for r in rows] == ["onnx_cuda", "teacher_epoch", "teacher_epoch", "meal_alternating"]
    ours = rows[1:]
    assert [r["precision"] for r in ours] == ["fp16", "bf16", "fp16"]
    assert all(r["ok"] == "True" and float(r["images_per_s"]) > 0 for r in ours), ours
    assert all(r["top1_agreement"] == "" == r["top3_agreement"] for r in ours)  # not an agreement check
    from imat.engine.runtime import cpu_has_fast_bf16

    # on a CPU fp16 runs as bf16, or as fp32 where the CPU has no bf16 hardware
    ran_as = "torch.bfloat16" if cpu_has_fast_bf16() else "fp32"
    assert f"fp16 ran as {ran_as} (no CUDA)" in ours[0]["note"]
    assert ours[2]["arch"] == "resnet10t<-resnet10t"


def test_a_missing_gpu_is_a_failed_row_not_a_crash(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check_train as gc
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "t.csv"
    assert gc.main(["--out", str(out), "--tiny", "--only", "teacher_epoch"]) == 1
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["check"], r["ok"], r["note"]) for r in rows] == [
        ("teacher_epoch", "False", "no CUDA device"),
        ("teacher_epoch", "False", "no CUDA device"),
    ]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_kd_and_decode_gpu_rows(tmp_path):
    out = tmp_path / "gpu_check.csv"
    proc = _run(out, "kd_epoch", "decode_gpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(out)
    assert [r["check"] for r in rows] == ["kd_epoch", "decode_gpu"]
    assert all(r["ok"] == "True" and float(r["images_per_s"]) > 0 for r in rows), rows
    assert rows[0]["arch"] == "resnet10t<-resnet10t"
    # on the CPU the "device" decode is the CPU one: identical pixels
    assert "device vs CPU decode: mean |diff| 0.00 grey levels" in rows[1]["note"]


def test_each_task_under_torchrun_is_a_row(tmp_path):
    """One rank per task under torchrun (gloo on the CPU): teachers, KD and MEAL each a line."""
    import os

    out = tmp_path / "gpu_check.csv"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--epochs", "1", "--only"]
    cmd += ["torchrun_teachers", "torchrun_kd", "torchrun_meal"]
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1"}  # gpu_check.sh --dry-run: CPU, toy sizes
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = _rows(out)
    assert [(r["check"], r["precision"]) for r in rows] == [
        ("torchrun_teachers", "bf16"),
        ("torchrun_kd", "bf16"),
        ("torchrun_meal", "fp16"),
    ]
    assert all(r["ok"] == "True" and "torchrun --nproc_per_node 1" in r["note"] for r in rows), rows
    assert all(r["engine"] == "imat.engine cpu" for r in rows)
