"""The Python API: `import imat` is cheap and loads no stage, every function has a docstring, and the
README's notebook example runs as written (tiny: 300 digits, one teacher, one epoch, CPU)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API (notebooks)", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README's Python API section has one python block"
    return blocks[0]


def test_import_imat_loads_no_stage() -> None:
    code = (
        "import sys, imat\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('teachers', 'distill', 'submit', 'torch')"
        " or m.startswith('imat.app'))\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def test_public_functions_have_docstrings() -> None:
    import imat
    from imat.app import api

    names = [n for n in imat.__all__ if n != "__version__"]
    # the core names the API by string (it may not import the app layer): both lists must agree
    assert sorted(names) == sorted(api.__all__)
    assert {"load_config", "train_pool", "evaluate_pool", "distill", "export", "predict"} <= set(names)
    assert {"write_submission", "score"} <= set(names)
    for name in names:
        func = getattr(imat, name)
        assert callable(func) and (func.__doc__ or "").strip(), name
    assert set(names) <= set(dir(imat))
    with pytest.raises(AttributeError):
        imat.no_such_function  # noqa: B018


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code = readme_example()
    monkeypatch.chdir(tmp_path)  # the example writes runs/notebook/ under the working directory
    exec(compile(code, "README.md (Python API)", "exec"), {"__name__": "__readme__"})
    run = tmp_path / "runs" / "notebook"
    for path in (
        "data/manifest.parquet",
        "teachers/pool.json",
        "student/best.safetensors",
        "export/student.onnx",
        "predictions.parquet",
        "submission.csv",
    ):
        assert (run / path).is_file(), path
    out = capsys.readouterr().out
    assert "top3" in out
