"""The base every config section derives from: unknown keys are errors, assignments are validated.

Each field's docstring (the string literal right below it) is its description: pydantic reads it
(``use_attribute_docstrings``) and ``python -m imat.config.doc`` writes docs/CONFIG.md from it, so a
new key is documented where it is declared."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), use_attribute_docstrings=True
    )
