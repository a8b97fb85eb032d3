"""Epoch-end hooks: a caller observes every Engine that ends an epoch inside a ``with`` block (a Ray
Tune trial reports metrics and a checkpoint this way) without reaching into the command that built
the engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imat.engine.loop import Engine

# Called as hook(engine, row) on every rank after each epoch's row is final and rank 0 has written
# summary.csv and last.ckpt (e.g. a Ray Tune trial reporting metrics with a checkpoint).
_EPOCH_END_HOOKS: list[Callable[[Engine, dict[str, Any]], None]] = []


@contextlib.contextmanager
def epoch_end_hook(hook: Callable[[Engine, dict[str, Any]], None]) -> Iterator[None]:
    """Register ``hook(engine, row)`` for every Engine that ends an epoch inside the ``with`` block, so
    a caller can observe a run built deep inside a command's entry function (``distill()``)."""
    _EPOCH_END_HOOKS.append(hook)
    try:
        yield
    finally:
        _EPOCH_END_HOOKS.remove(hook)


def run_epoch_end_hooks(engine: Engine, row: dict[str, Any]) -> None:
    """Call every registered hook (a hook may unregister itself while running)."""
    for hook in list(_EPOCH_END_HOOKS):
        hook(engine, row)
