"""Every `imat` command the README shows in its shell blocks parses as written: the command exists and
takes those arguments (running them needs the competition's data; the Python API block runs in
tests/test_api_readme.py). The benchmark commands of docs/BENCHMARKS.md take the arguments they are
given there."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from imat.app.cli import _selected, build_parser

ROOT = Path(__file__).resolve().parents[1]


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def readme_commands() -> list[str]:
    """Whole command lines of the README's shell blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", _readme(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("imat "):
                commands.append(line)
    return commands


def test_every_command_named_in_the_text_exists() -> None:
    """Inline mentions (`imat tune`, `imat data kit NAME --out DIR`) name commands that exist."""
    named = re.findall(r"`(imat [^`]+)`", _readme())
    assert named
    for inline in named:
        assert _selected(inline.split()[1:]) is not None, inline


def test_the_readme_shows_commands() -> None:
    commands = readme_commands()
    assert len(commands) >= 10
    assert {"export", "predict", "submit"} <= {c.split()[1] for c in commands}


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command: str) -> None:
    argv = shlex.split(command)[1:]
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:  # argparse's exit on an unknown command or argument
        pytest.fail(f"README command does not parse (exit {exc.code}): {command}")
    assert getattr(args, "_words", None), command
    assert not getattr(args, "_unavailable", False), command


# The benchmarks' commands in docs/BENCHMARKS.md: each flag is one the script declares, its required
# flags are given, and the distillation benchmark's run directory lies outside the checkout (it refuses
# one inside). Read from the scripts' source, so no benchmark is imported or run.
BENCHMARK_SCRIPTS = ("bench_noisy.py", "bench_distill.py")


def _declared_flags(script: str) -> tuple[set[str], set[str]]:
    """(every flag, the required ones) of ``benchmarks/SCRIPT``'s argparse."""
    source = (ROOT / "benchmarks" / script).read_text(encoding="utf-8")
    flags, required = set(), set()
    for flag, rest in re.findall(r'add_argument\(\s*"(--[\w-]+)"(.*?)\)\n', source, flags=re.S):
        flags.add(flag)
        if "BooleanOptionalAction" in rest:
            flags.add("--no-" + flag[2:])
        if "required=True" in rest:
            required.add(flag)
    return flags, required


def _current_benchmark_commands() -> list[tuple[str, list[str]]]:
    """(script, argv) of every command block line running a benchmark script at this checkout's version
    (sections whose commands run an earlier version name it, "a checkout of `COMMIT`", and are left out)."""
    found = []
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8")
    for section in re.split(r"\n## ", text):
        if re.search(r"checkout of\s+`[0-9a-f]{7,40}`", section):
            continue
        for block in re.findall(r"```[a-z]*\n(.*?)```", section, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                for script in BENCHMARK_SCRIPTS:
                    if f"benchmarks/{script}" in line:
                        argv = shlex.split(line)
                        found.append((script, argv[argv.index(f"benchmarks/{script}") + 1 :]))
    return found


def test_the_benchmark_commands_are_found() -> None:
    assert {script for script, _ in _current_benchmark_commands()} == set(BENCHMARK_SCRIPTS)


@pytest.mark.parametrize(("script", "argv"), _current_benchmark_commands())
def test_benchmark_command_takes_its_arguments(script: str, argv: list[str]) -> None:
    flags, required = _declared_flags(script)
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    assert given <= flags, f"{script}: unknown {sorted(given - flags)} in {shlex.join(argv)}"
    assert required <= given, f"{script}: missing {sorted(required - given)} in {shlex.join(argv)}"
    if script == "bench_distill.py":
        out = (ROOT / argv[argv.index("--out") + 1]).resolve()
        assert ROOT.resolve() not in (out, *out.parents), f"--out inside the checkout: {shlex.join(argv)}"
