"""Small helpers shared by the submit commands."""

from __future__ import annotations

import logging


def setup_logging() -> None:
    """INFO messages on stderr, unless the caller (a test, the pipeline) configured logging already."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
