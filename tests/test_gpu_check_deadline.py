"""benchmarks/gpu_check.sh's hard stop: past GPU_CHECK_DEADLINE_S the running part is ended, a
'hard stop' row says so, and the table (every row finished before it) is still written and printed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

SLOW_TRAIN = """
import time
time.sleep(600)
"""


def test_hard_stop_still_writes_the_table(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "benchmarks").mkdir(parents=True)
    for name in ("gpu_check.sh", "gpu_check.py"):
        shutil.copy(ROOT / "benchmarks" / name, checkout / "benchmarks" / name)
    (checkout / "benchmarks" / "gpu_check_train.py").write_text(SLOW_TRAIN)  # never finishes on its own
    out = tmp_path / "gpu.csv"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "GPU_CHECK_DEADLINE_S": "45",
        "GPU_CHECK_TRAIN_RESERVE_S": "5",
    }
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(checkout / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert took < 45 + 30  # the deadline, plus the final table print and interpreter start-up
    table = pd.read_csv(out)
    stops = table[table["check"] == "hard stop"]
    assert len(stops) >= 1 and not stops["ok"].any()
    assert "training" in set(stops["engine"])  # the never-ending training part was the one cut
    assert "gpu_check: provider cpu" in proc.stdout and "hard stop" in proc.stdout  # table printed
