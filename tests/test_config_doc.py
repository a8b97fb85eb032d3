"""docs/CONFIG.md is generated from the typed schema and must agree with it; every key is described."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from imat.config import RunConfig
from imat.config.base import Section
from imat.config.doc import REGENERATE, _models_in, main, render

ROOT = Path(__file__).resolve().parents[1]
CONFIG_MD = ROOT / "docs" / "CONFIG.md"


def test_config_md_matches_the_schema() -> None:
    assert CONFIG_MD.is_file(), f"docs/CONFIG.md is missing: run `{REGENERATE}`"
    if CONFIG_MD.read_text(encoding="utf-8") != render():
        pytest.fail(f"docs/CONFIG.md disagrees with the schema in imat/config/: run `{REGENERATE}`")


def _documented_keys(model: type[Section]) -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(field.alias or name)
        for sub in _models_in(field.annotation):  # nested sections, lists of them (teachers.pool)
            keys += _documented_keys(sub)
    return keys


def test_every_key_has_a_row_with_type_default_and_description() -> None:
    text = render()
    keys = _documented_keys(RunConfig)
    assert {"name", "index", "per_teacher", "label_smoothing"} <= set(keys)
    for key in keys:
        assert f"| `{key}` |" in text, key
    # a few rows in full: the type, the default and the docstring come from the schema
    assert "| `lr` | float | `0.1` | Base learning rate. |" in text
    assert "| `from` | str \\| null | `null` |" in text  # the YAML name of data.clean.from_
    assert "| `arch` | str | required |" in text
    assert "`distill.train`" in text and "`teachers.pool[].train`" in text


def test_a_key_without_a_description_is_refused() -> None:
    class Undocumented(Section):
        documented: int = 1
        """Has one."""
        bare: int = Field(2, ge=0)

    class Root(Section):
        """A root."""

        section: Undocumented = Undocumented()
        """A section."""

    with pytest.raises(ValueError, match=r"Undocumented\.bare"):
        render(Root)


def test_cli_writes_the_file(tmp_path: Path) -> None:
    out = tmp_path / "CONFIG.md"
    assert main(["--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render()
