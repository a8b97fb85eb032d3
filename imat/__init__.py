"""imat: fine-grained recognition competitions, from raw files to a submission.

The ``imat`` package is the core every stage shares (configs, competition formats, the downloader,
manifests, datasets and augmentation, metrics, the training engine) plus ``imat.app``, the
orchestration layer (the CLI, ``imat pipeline``, the report) that calls the stages: ``teachers``,
``distill`` and ``submit``.

For notebooks, the steps of a run are functions of this package (see :mod:`imat.app.api`)::

    import imat
    cfg = imat.demo_config("runs/nb", limit=300)   # or imat.load_config("configs/x.yaml", ["k=v"])
    imat.prepare_data(cfg)
    imat.train_pool(cfg)
    imat.evaluate_pool(cfg)
    imat.distill(cfg)
    imat.export(cfg)
    imat.predict(cfg)
    imat.write_submission(cfg)
    imat.score(cfg)

They are imported on first use (PEP 562), so ``import imat`` stays cheap and loads no stage.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it; imported by name on first access, so the core has no static
# import of the orchestration layer (the import-linter contracts in pyproject.toml stay kept)
_API_MODULE = "imat.app.api"
_API = (
    "demo_config",
    "distill",
    "evaluate_pool",
    "export",
    "load_config",
    "predict",
    "prepare_data",
    "run_pipeline",
    "score",
    "train_pool",
    "write_submission",
)

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API_MODULE), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module 'imat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
