"""docs/CONFIG.md from the typed schema: every key with its type, default and description.

``python -m imat.config.doc --out docs/CONFIG.md`` regenerates it; ``tests/test_config_doc.py`` fails
when the file and the schema disagree. The descriptions are the fields' docstrings (see
``imat.config.base``); a key without one is an error here, so every new key gets documented.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from imat.config.root import RunConfig
from imat.io import write_text

REGENERATE = ".venv/bin/python -m imat.config.doc --out docs/CONFIG.md"

INTRO = f"""# Configuration reference

<!-- Generated from the schema in imat/config/ by `{REGENERATE}`: edit the field
docstrings there, not this file. -->

One YAML file describes a run; each command reads the sections it needs. Any key can be overridden on
the command line by its dotted path, e.g. `distill.train.lr=0.05`, or `teachers.pool.0.arch=resnet34`
for a list entry; the value is read as YAML. An unknown key, a value of the wrong type or a missing
required value is a one-line error naming the key and the file. The resolved config is written next
to every output. The shipped examples are in `configs/`.

`null` means unset: the description says what happens then. A section used in several places (a
training recipe, a model) is described once and linked.
"""


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Every pydantic model class an annotation mentions (X, list[X], X | None, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def type_name(annotation: Any) -> str:
    """A short, readable name for a field's type: `int`, `a | b`, `list of str`, `TrainConfig`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is tuple:
        return f"{len(args)} x {type_name(args[0])}" if args and len(set(args)) == 1 else "tuple"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{_anchor(annotation)})"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    """The default as YAML would write it; `required` when there is none."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "see section"
    if isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
        value = [v.model_dump(mode="json", by_alias=True) for v in value]
    if isinstance(value, tuple):
        value = list(value)
    return (
        f"`{json.dumps(value).replace('|', chr(92) + '|')}`" if not isinstance(value, str) else f"`{value}`"
    )


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _walk(model: type[BaseModel], path: str, uses: dict[type[BaseModel], list[str]]) -> None:
    """Record every path where each section class is used, depth first, in field order."""
    uses.setdefault(model, []).append(path)
    for name, field in model.model_fields.items():
        key = f"{path}.{field.alias or name}" if path else (field.alias or name)
        if typing.get_origin(field.annotation) is list:
            key += "[]"  # a list entry: teachers.pool[].train
        for sub in _models_in(field.annotation):
            _walk(sub, key, uses)


def render(root: type[BaseModel] = RunConfig) -> str:
    """The whole reference as Markdown. Raises ValueError naming every key without a description."""
    uses: dict[type[BaseModel], list[str]] = {}
    _walk(root, "", uses)
    missing = [
        f"{model.__name__}.{name}"
        for model in uses
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    if missing:
        raise ValueError(
            "config keys without a description (add a docstring below the field): " + ", ".join(missing)
        )
    lines = [INTRO, "## Sections\n"]
    for model, paths in uses.items():
        where = ", ".join(f"`{p}`" for p in paths) if paths != [""] else "the top level of the file"
        lines.append(f"- [{model.__name__}](#{_anchor(model)}): {where}")
    lines.append("")
    for model, paths in uses.items():
        lines.append(f"## {model.__name__}\n")
        where = ", ".join(f"`{p}`" for p in paths) if paths != [""] else "the top level of the file"
        doc = _one_line((model.__doc__ or "").strip().split("\n\n")[0])
        lines.append(f"{doc} Used at: {where}.\n" if doc else f"Used at: {where}.\n")
        lines.append("| key | type | default | description |")
        lines.append("|---|---|---|---|")
        for name, field in model.model_fields.items():
            key = field.alias or name
            lines.append(
                f"| `{key}` | {type_name(field.annotation)} | {default_text(field)} | {_one_line(field.description or '')} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imat.config.doc", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write here (atomically) instead of to stdout")
    args = parser.parse_args(argv)
    text = render()
    if args.out is None:
        sys.stdout.write(text)
        return 0
    write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
