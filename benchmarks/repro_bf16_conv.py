"""Reproduce a CPU bf16 fault of torch's convolution weight gradient (seen with torch 2.14.1 here).

A 3x3, stride-2, padding-1 convolution on a 1x1 feature map (what layer4 of a ResNet sees at 16 px
input) returns a weight gradient that is sometimes NaN or huge under bf16 autocast on the CPU, with the
same inputs and weights every time. fp32, and 2x2 or larger maps, are fine. The engine skips an
optimiser step whose gradients are not finite (``train.nonfinite_grad_patience``), so a run survives
it; this script shows how often it happens on the machine at hand.

    .venv/bin/python benchmarks/repro_bf16_conv.py [--trials 200]
"""

from __future__ import annotations

import argparse

import torch


def bad_fraction(side: int, dtype: torch.dtype | None, trials: int) -> float:
    """How often the weight gradient is non-finite or > 1e4 in ``trials`` identical backward passes."""
    bad = 0
    for _ in range(trials):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(256, 512, 3, stride=2, padding=1, bias=False)
        x = torch.randn(8, 256, side, side)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = conv(x)
        out.float().sum().backward()
        grad = conv.weight.grad
        bad += int(not bool(torch.isfinite(grad).all()) or float(grad.abs().max()) > 1e4)
    return bad / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.trials} identical backward passes"
    )
    print(f"{'feature map':<12} {'precision':<10} {'bad weight gradients':>21}")
    for side in (1, 2):
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            print(f"{side}x{side:<10} {name:<10} {bad_fraction(side, dtype, args.trials):>20.0%}")


if __name__ == "__main__":
    main()
