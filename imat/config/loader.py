"""Load a YAML config into a validated RunConfig, apply dotted ``k=v`` overrides, save it resolved."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from imat.config.root import RunConfig
from imat.errors import ImatError, require_file
from imat.io import write_yaml


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping; a syntax error or a non-mapping top level is a one-line ImatError."""
    p = require_file(path, "config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ImatError(f"{p}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ImatError(f"{p}: not a UTF-8 text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ImatError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` to a raw config dict; the value is parsed as YAML (``lr=0.1``,
    ``blocks=[1,2]``, ``ema=true``). List entries are addressed by index (``teachers.pool.0.lr=0.05``)."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ImatError(f"override {assignment!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ImatError(f"override {key}: {where} is a {type(node).__name__}, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ImatError(f"override {key}: {'.'.join(parts[:-1])} is not a section")


def _list_index(node: list[Any], part: str, where: str) -> int:
    try:
        index = int(part)
        node[index]
    except (ValueError, IndexError):
        raise ImatError(f"override {where}: no list entry {part!r} (the list has {len(node)})") from None
    return index


def format_validation_error(source: str, exc: ValidationError) -> str:
    """The first problem of a pydantic error as ``file: dotted.key: message (got value)``."""
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = first.get("input")
    shown = (
        "" if first["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
    )
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{source}: {loc}: {msg}{shown}{more}"


def validate(raw: dict[str, Any], source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ImatError(format_validation_error(source, exc)) from None


def load_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Load ``path`` (or defaults when None), apply overrides, validate; any problem is an ImatError."""
    raw = read_yaml(path) if path is not None else {}
    for assignment in overrides:
        apply_override(raw, assignment)
    source = str(path) if path is not None else "config"
    if overrides:
        source += " (with overrides)"
    return validate(raw, source)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def save_resolved(cfg: RunConfig, path: str | os.PathLike[str]) -> Path:
    """Write the fully resolved config (every default spelled out) next to an output."""
    return write_yaml(path, to_dict(cfg))
