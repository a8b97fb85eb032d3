"""Distillation methods, one file each, registered by name (``distill.method``).

Adding one: a file here (or anywhere imported before ``imat distill`` runs) with a
:class:`~distill.methods.base.DistillMethod` subclass decorated with
:func:`~distill.methods.base.register_method`; docs/ARCHITECTURE.md lists the steps.
"""

from distill.methods import ce, kd, meal, meal_v2  # noqa: F401  (importing registers them)
from distill.methods.base import DistillMethod, MethodInputs, get_method, method_names, register_method

__all__ = ["DistillMethod", "MethodInputs", "get_method", "method_names", "register_method"]
