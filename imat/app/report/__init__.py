"""`imat report RUN_DIR`: one self-contained HTML page (plots inlined as PNG) describing a run."""

from imat.app.report.page import build_report

__all__ = ["build_report"]
