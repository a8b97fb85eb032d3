"""Training throughput of the shared engine: one timm teacher, fp32 vs bf16 autocast vs channels-last.

Runs the real :class:`imat.engine.Engine` (optimiser step, EMA off, no validation) on synthetic images
so the number is the engine + model cost without JPEG decoding. Each mode trains ``--epochs`` short
epochs of ``--steps`` iterations; the first epoch is warm-up and the best later epoch is reported
(the machine may be shared, the best epoch is the least disturbed one). Modes run round-robin
``--repeats`` times so a burst of load elsewhere does not hit only one of them.

    .venv/bin/python benchmarks/bench_engine.py --arch resnet18 --size 64 --batch 32 --steps 8
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
from unittest import mock

import pandas as pd
import timm
import torch
from torch.utils.data import DataLoader, Dataset

from imat.config.train import TrainConfig
from imat.engine import ClassificationTask, Engine, runtime

MODES = {
    "fp32": dict(precision="fp32", channels_last=False),
    "bf16 autocast": dict(precision="bf16", channels_last=False),
    "channels-last fp32": dict(precision="fp32", channels_last=True),
    "channels-last + bf16": dict(precision="bf16", channels_last=True),
    # the engine runs bf16 in fp32 on a CPU without bf16 hardware (imat.engine.runtime.cpu_has_fast_bf16);
    # this mode skips that check, to measure what the emulated bf16 would cost there
    "channels-last + bf16 forced": dict(precision="bf16", channels_last=True, force_bf16=True),
}
PLAIN = "plain PyTorch loop fp32 (no engine)"
CHOICES = [*MODES, PLAIN]


class Synthetic(Dataset):
    """Fixed random images (the loader is not what is measured)."""

    def __init__(self, n: int, size: int, classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": int(self.y[i]), "index": i}


def collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([it["label"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        "skipped": 0,
    }


def run_mode(args: argparse.Namespace, mode: dict, out_dir: str) -> float:
    mode = dict(mode)
    if mode.pop("force_bf16", False):
        with mock.patch.object(runtime, "cpu_has_fast_bf16", lambda: True):
            return run_mode(args, mode, out_dir)
    torch.manual_seed(0)
    model = timm.create_model(args.arch, num_classes=args.classes, pretrained=False)
    data = Synthetic(args.batch * args.steps, args.size, args.classes)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, collate_fn=collate, drop_last=True)
    cfg = TrainConfig(epochs=args.epochs, lr=0.01, device=args.device, schedule="constant", **mode)
    engine = Engine(ClassificationTask(model), cfg, out_dir, loader, None, progress=False, tensorboard=False)
    df = engine.fit()
    return float(df["images_per_s"].iloc[1:].max())


def run_plain(args: argparse.Namespace) -> float:
    """The same fp32 training as a bare PyTorch loop: the engine's overhead is the difference."""
    import time

    torch.manual_seed(0)
    model = timm.create_model(args.arch, num_classes=args.classes, pretrained=False)
    data = Synthetic(args.batch * args.steps, args.size, args.classes)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, collate_fn=collate, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    rates = []
    for _ in range(args.epochs):
        t0, n = time.perf_counter(), 0
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
            n += len(batch["label"])
        rates.append(n / (time.perf_counter() - t0))
    return max(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="iterations per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="the first is warm-up")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--modes", default=",".join(CHOICES), help="comma-separated subset of: " + ", ".join(CHOICES)
    )
    args = parser.parse_args()

    names = [m.strip() for m in args.modes.split(",") if m.strip()]
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in names:
                out = os.path.join(tmp, f"{r}-{name}")
                ips = run_plain(args) if name == PLAIN else run_mode(args, MODES[name], out)
                best[name] = max(best.get(name, 0.0), ips)
                print(f"repeat {r + 1}: {name}: {ips:.1f} images/s", flush=True)
    base = best.get("fp32")
    rows = [
        {
            "mode": name,
            "train images/s": round(best[name], 1),
            "vs fp32": f"{best[name] / base:.2f}x" if base else "",
        }
        for name in names
    ]
    device = (
        "cuda: " + torch.cuda.get_device_name(0)
        if torch.cuda.is_available() and args.device != "cpu"
        else "cpu"
    )
    print()
    print(
        f"date {datetime.date.today()}, torch {torch.__version__}, timm {timm.__version__}, {device}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, "
        f"bf16 hardware: {runtime.cpu_has_fast_bf16()} (cpu capability {torch.backends.cpu.get_cpu_capability()})"
    )
    print(
        pd.DataFrame(rows).to_markdown(index=False)
        if _has_tabulate()
        else pd.DataFrame(rows).to_string(index=False)
    )


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
