"""benchmarks/bench_loader.py end to end at toy settings: photos from installed packages, the CSV, the
cores-per-GPU reading (figures from such a run are not published: the real run is a quiet machine's)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_loader
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return bench_loader


def test_bench_loader_writes_the_csv_and_the_reading(tmp_path: Path, capsys) -> None:
    bench = _bench()
    assert bench.source_photos()  # real photographs shipped by scikit-learn / matplotlib
    out = tmp_path / "loader_cpu.csv"
    args = ["--out", str(out), "--seconds", "0.01", "--repeats", "1", "--photos", "2"]
    args += ["--photo-sizes", "500x375", "--decoders", "cv2", "--workers", "--size", "64"]
    assert bench.main(args) == 0
    df = pd.read_csv(out)
    assert df[["pipeline", "draft"]].values.tolist() == [
        ["decode", False],
        ["light", True],
        ["light", False],
        ["medium", True],
        ["medium", False],
        ["heavy", True],
        ["heavy", False],
    ]
    assert (df["images_per_s_per_core"] > 0).all() and (df["workers"] == 0).all()
    assert {"machine", "date", "command", "opencv"} <= set(df.columns)
    text = capsys.readouterr().out
    assert "CPU cores needed per GPU at 2,470 img/s" in text and "per 8-GPU node" in text
    # the reading again from the CSV, for another GPU rate
    assert bench.main(["--from-csv", str(out), "--gpu-rate", "1000"]) == 0
    light = df.query("pipeline == 'light' and draft")["images_per_s_per_core"].iloc[0]
    assert f"{1000 / light:.1f} (" in capsys.readouterr().out
