"""The repository is self-contained: no file points at a path outside the checkout (a workspace's notes
or data sets), and nothing names a developer's local benchmark archive: data comes in by argument."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = [
    (re.compile(r"\.\./shared\b"), "a sibling folder of the checkout"),
    (re.compile(r"/work/shared\b"), "a workspace folder"),
    (re.compile(r"\bDESIGN\.md\b"), "a design note outside the repository (docs/ARCHITECTURE.md holds it)"),
    (re.compile(r"reference/(meal|competitions)\.md"), "workspace reference notes (docs/MEAL.md holds them)"),
    (re.compile(r"""\.parents?\b[^\n]*["']shared["']"""), "a folder beside the checkout, built in code"),
    (re.compile(r"cifar10-jpeg-q75\.tar"), "a local benchmark archive: pass its path as an argument"),
]


def repository_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the repository's file list is unknown")
    files = [ROOT / name for name in listed.decode().split("\0") if name]
    return [
        f for f in files if f.is_file() and not f.is_symlink() and f.resolve() != Path(__file__).resolve()
    ]


def test_no_file_points_outside_the_repository() -> None:
    found = []
    for path in repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files
        for lineno, line in enumerate(text.splitlines(), 1):
            for pattern, what in OUTSIDE:
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{lineno}: {what}: {line.strip()[:100]}")
    assert not found, "paths outside the repository:\n" + "\n".join(found)


def test_the_patterns_catch_what_they_are_for() -> None:
    caught = [
        "see ../shared/DESIGN.md",
        'ARCHIVE = ROOT.parent / "shared" / "datasets"',
        "(see /work/shared/reference/meal.md)",
        "tar -xzf cifar10-jpeg-q75.tar.gz",
    ]
    for line in caught:
        assert any(p.search(line) for p, _ in OUTSIDE), line
    for line in (
        "imat predict m.onnx test.json --images /shared/images",
        "shared storage",
        "docs/ARCHITECTURE.md",
    ):
        assert not any(p.search(line) for p, _ in OUTSIDE), line


def test_packaged_demo_config_is_a_real_copy_of_the_repositorys() -> None:
    """`imat demo` reads the config shipped in the package; users read configs/demo.yaml. A symlink would
    not survive a wheel or a Windows checkout, so the package holds a real file, kept identical."""
    packaged = ROOT / "imat" / "configs" / "demo.yaml"
    assert packaged.is_file() and not packaged.is_symlink(), "imat/configs/demo.yaml must be a real file"
    repo = (ROOT / "configs" / "demo.yaml").read_bytes()
    assert packaged.read_bytes() == repo, (
        "imat/configs/demo.yaml differs: cp configs/demo.yaml imat/configs/demo.yaml"
    )
