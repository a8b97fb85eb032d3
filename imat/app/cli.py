"""The `imat` command. Subcommands are registered by module path and imported only when chosen, so
`imat --help` is instant and `imat` never imports a stage package it does not run.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int | None``. Any ImatError
becomes one line on stderr and exit code 2; nobody sees a traceback for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from imat import __version__
from imat.errors import ImatError

# command words -> (module, one-line help). Order is the order of `imat --help`.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo",): ("imat.app.commands.demo", "whole pipeline on the embedded kit, CPU-sized"),
    ("data", "kit"): (
        "imat.app.commands.kit",
        "write a ready kit: embedded data sets, or CIFAR-10 from its archive",
    ),
    ("data", "download"): ("imat.app.commands.download", "fetch a URL-only competition's images (resumable)"),
    ("data", "inspect"): ("imat.app.commands.inspect", "counts per split and class, missing/corrupt images"),
    ("data", "audit"): (
        "distill.commands.audit",
        "likely wrong training labels: cleanlab on cross-fitted (--config) or the pool's probabilities",
    ),
    ("teachers", "train"): ("teachers.commands.train", "train one teacher or the whole pool of CONFIG"),
    ("teachers", "eval"): ("teachers.commands.evaluate", "each teacher's and the ensemble's top-1/top-3"),
    ("distill",): ("distill.commands.distill", "train the student (meal | meal-v2 | kd | ce)"),
    ("tune",): ("distill.commands.tune", "Ray Tune sweep of the distillation step"),
    ("export",): ("submit.commands.export", "export a checkpoint to ONNX and verify it"),
    ("predict",): ("submit.commands.predict", "batched onnxruntime top-k inference"),
    ("submit",): ("submit.commands.submit", "write a validated leaderboard submission"),
    ("score",): ("submit.commands.score", "score a submission against a solution file"),
    ("pipeline",): ("imat.app.commands.pipeline", "every step, skipping steps whose outputs exist"),
    ("report",): ("imat.app.commands.report", "HTML report with plots for a run"),
    ("doctor",): (
        "imat.app.commands.doctor",
        "which inference providers (CPU, CUDA, TensorRT) work here, and why not",
    ),
}

GROUP_HELP = {"data": "competition files: kits, download, inspect, audit", "teachers": "the teacher pool"}


def _selected(argv: Sequence[str]) -> tuple[str, ...] | None:
    words = tuple(a for a in argv[:2] if not a.startswith("-"))
    for length in (2, 1):
        if words[:length] in COMMANDS:
            return words[:length]
    return None


def _load(module_name: str) -> ModuleType | None:
    """The command's module, or None when the stage that owns it has not landed yet."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imat", description="imat: from a competition's files to a leaderboard submission."
    )
    parser.add_argument("--version", action="version", version=f"imat {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    chosen = _selected(argv)
    for words, (module_name, help_text) in COMMANDS.items():
        if len(words) == 2:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=GROUP_HELP.get(words[0]))
                groups[words[0]] = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            sub = groups[words[0]].add_parser(words[1], help=help_text, description=help_text)
        else:
            sub = top.add_parser(words[0], help=help_text, description=help_text)
        sub.set_defaults(_words=words, _module=module_name)
        if words == chosen:
            module = _load(module_name)
            if module is None:
                sub.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
                sub.set_defaults(_unavailable=True)
            else:
                module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    words = getattr(args, "_words", None)
    if words is None:
        parser.print_help()
        return 0 if not argv else 2
    name = " ".join(words)
    if getattr(args, "_unavailable", False):
        print(f"imat {name}: not available yet", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    try:
        code = module.run(args)
    except ImatError as exc:
        print(f"imat {name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"imat {name}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
