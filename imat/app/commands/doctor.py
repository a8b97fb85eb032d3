"""`imat doctor`: which onnxruntime providers this machine can use, and why not, one line each."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options: it probes this machine


def run(args: argparse.Namespace) -> int:
    from submit.runtime import provider_report

    rows = provider_report()
    width = max(len(name) for name, _, _ in rows)
    for name, usable, why in rows:
        print(f"{name:<{width}}  {'yes' if usable else 'no ':<3}  {why}")
    best = next((name for name, usable, _ in rows if usable), "none")
    print(f"--provider auto would use: {best}")
    return 0
