"""A 2-worker Ray Train run (gloo, CPU) whose rank 1 kills itself with SIGKILL at the end of epoch 2 on
the first attempt, after deleting the run directory's last.ckpt: Ray must restart the group and the
engine must continue from the checkpoint it reported to Ray. Run as ``python ray_restart_kit.py OUT``
(tests/test_ddp.py); prints the final Result's metrics as JSON."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imat.config.train import TrainConfig
from imat.engine import ClassificationTask, Engine
from imat.engine.distributed import rank
from imat.engine.hooks import epoch_end_hook
from imat.engine.ray_train import run_ray_train

EPOCHS = 4
# Ray Train's controller records each checkpoint it has registered here (Ray 2.5x/2.60, Train V2).
SNAPSHOT = "checkpoint_manager_snapshot.json"


def wait_until_ray_holds_a_checkpoint(out: Path, timeout_s: float = 90.0) -> None:
    """Block until Ray's controller has registered a reported checkpoint. The controller collects each
    worker's reports by polling it every couple of seconds, so a worker that dies milliseconds after its
    report can take the report with it: the premise of the test (a checkpoint Ray holds) would then be
    left to timing."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for snapshot in (out / "ray").rglob(SNAPSHOT):
            try:
                if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                    return
            except (OSError, ValueError):  # being written: look again
                pass
        time.sleep(0.2)


class Toy(Dataset):
    def __init__(self, n: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.x[:, 0] += self.y[:, None, None].float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": int(self.y[i]), "index": i}


def train(config: dict, resumed: bool) -> None:
    torch.set_num_threads(1)
    out = Path(config["out"])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    train_loader = DataLoader(Toy(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    val_loader = DataLoader(Toy(9, seed=1), batch_size=9)
    cfg = TrainConfig(epochs=EPOCHS, batch_size=4, lr=0.05, device="cpu")
    engine = Engine(ClassificationTask(model), cfg, out / "run", train_loader, val_loader, progress=False)
    if rank() == 0:
        with open(out / "attempts.txt", "a") as f:
            f.write(f"resumed={resumed}\n")

    def die_once(engine: Engine, row: dict) -> None:
        marker = out / "killed.txt"
        if row["epoch"] == 2 and rank() == 1 and not marker.exists():
            wait_until_ray_holds_a_checkpoint(out)
            marker.write_text(str(os.getpid()))
            engine.ckpt_path.unlink()  # the run directory lost it: only Ray's copy is left
            os.kill(os.getpid(), signal.SIGKILL)

    with epoch_end_hook(die_once):
        engine.fit(resume=resumed)


if __name__ == "__main__":
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = run_ray_train(
        train, {"out": str(out)}, 2, use_gpu=False, storage=str(out / "ray"), name="restart", max_failures=1
    )
    print("RESULT " + json.dumps({"metrics": result.metrics, "checkpoint": result.checkpoint is not None}))
