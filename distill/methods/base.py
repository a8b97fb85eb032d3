"""The method registry: a distillation method is one class in one file of this package, registered by name.

A method declares what the rest of ``imat distill`` needs to know about it, so nothing outside its file
compares method names:

- ``needs_teachers``: whether the pool is loaded (CE trains on labels alone);
- ``uses_cache``: whether its teacher outputs can come from the offline cache (``distill.cache``);
- ``default_selection``: how teachers are picked per batch when ``distill.selection`` is unset;
- ``options``: its own settings under ``distill.options`` and their defaults (others are refused);
- ``check``: what it validates in the ``distill`` config section (one-line ImatErrors);
- ``tune_space``: what it adds to the default sweep of ``imat tune``;
- ``build_task``: the engine task, from the config section and a :class:`MethodInputs`.

Registering: decorate the class with :func:`register_method`; importing its module registers it (the
built-in ones are imported by ``distill.methods``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from imat.config.distill import DistillConfig
from imat.errors import ImatError

if TYPE_CHECKING:
    from torch import nn

    from distill.tasks import DistillTaskBase
    from distill.teachers_runtime import FrozenTeacher, TeacherEnsemble


@dataclass
class MethodInputs:
    """What ``imat distill`` has built when it asks a method for its task."""

    student: nn.Module
    student_data: dict[str, Any]  # the student's resolved data config (mean, std, input_size, ...)
    teachers: list[FrozenTeacher]
    ensemble: TeacherEnsemble | None  # the teachers with their per-batch selection; None without teachers
    num_classes: int
    cache: Any = None  # the offline teacher cache when distill.cache.enabled
    mixup: Any = None  # label-mass mixup/cutmix (imat.data.mixing) or None


class DistillMethod:
    """Base class of a distillation method; subclasses override what differs."""

    name: ClassVar[str] = ""
    needs_teachers: ClassVar[bool] = True
    uses_cache: ClassVar[bool] = False
    options: ClassVar[dict[str, Any]] = {}  # distill.options keys this method takes, with their defaults

    @classmethod
    def settings(cls, dcfg: DistillConfig) -> dict[str, Any]:
        """``distill.options`` over this method's defaults; a key it does not take is a one-line error."""
        unknown = sorted(set(dcfg.options) - set(cls.options))
        if unknown:
            takes = ", ".join(sorted(cls.options)) or "none"
            raise ImatError(
                f"distill.options.{unknown[0]}: method {cls.name} takes no option {unknown[0]!r} (takes: {takes})"
            )
        return {**cls.options, **dcfg.options}

    @classmethod
    def default_selection(cls, dcfg: DistillConfig, teachers: Sequence[FrozenTeacher]) -> str:
        """Teacher selection when ``distill.selection`` is unset: all teachers, averaged."""
        return "mean"

    @classmethod
    def check(cls, dcfg: DistillConfig) -> None:
        """Method-level checks of the config section (no networks needed)."""

    @classmethod
    def check_cache(cls, dcfg: DistillConfig) -> None:
        """Checks for training on cached teacher outputs (only called when ``uses_cache``)."""

    @classmethod
    def tune_space(cls, cfg: Any) -> dict[str, dict[str, Any]]:
        """Keys this method adds to the default ``tune.space`` (the student's lr is always swept)."""
        return {}

    @classmethod
    def build_task(cls, dcfg: DistillConfig, inputs: MethodInputs) -> DistillTaskBase:
        raise NotImplementedError


_REGISTRY: dict[str, type[DistillMethod]] = {}


def register_method(cls: type[DistillMethod]) -> type[DistillMethod]:
    """Class decorator: make ``cls`` available as ``distill.method: <cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a distillation method needs a name")
    known = _REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"distillation method {cls.name!r} is already registered by {known.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> type[DistillMethod]:
    """The method registered as ``name``; an unknown name is a one-line error listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ImatError(
            f"distill.method: unknown method {name!r} (registered: {', '.join(method_names())})"
        ) from None
