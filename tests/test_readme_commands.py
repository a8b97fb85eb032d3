"""Every `imat` command the README shows in its shell blocks parses as written: the command exists and
takes those arguments (running them needs the competition's data; the Python API block runs in
tests/test_api_readme.py)."""

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
