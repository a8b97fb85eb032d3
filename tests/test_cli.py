"""The `imat` command: help for every subcommand, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from imat.app.cli import COMMANDS, main


def test_top_level_help_lists_every_command(capsys) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    for words in COMMANDS:
        assert words[0] in out


@pytest.mark.parametrize("words", list(COMMANDS))
def test_every_subcommand_has_help(words) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    assert exit_.value.code == 0


def test_unknown_command_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2


def test_console_script_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "imat.app.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "imat" in done.stdout
