"""The knobs of a download run, the status-table columns and the error a failed image raises."""

from __future__ import annotations

from dataclasses import dataclass

from imat import __version__
from imat.errors import ImatError

STATUS_FILE = "download_status.csv"
STATUS_COLUMNS = [
    "image_id",
    "path",
    "url",
    "status",
    "reason",
    "detail",
    "bytes",
    "download_bytes",
    "width",
    "height",
    "seconds",
    "sha1",
]
ALLOWED_SCHEMES = ("http", "https", "file")
# A browser-like agent: some image hosts answer 403 to library defaults (competitions.md section 5).
USER_AGENT = f"Mozilla/5.0 (X11; Linux x86_64) imat-downloader/{__version__}"


@dataclass
class DownloadConfig:
    """Every knob of a download run (the CLI flags map one to one)."""

    workers: int = 32
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 3  # extra attempts after the first, for transient failures only
    backoff: float = 0.5  # first retry waits about this many seconds, doubling each time (+ jitter)
    backoff_max: float = 30.0
    max_bytes: int = 20 * 1024 * 1024
    max_side: int | None = None  # shrink so the longer side is <= this (None: keep the size)
    quality: int = 90
    min_side: int = 16  # a side below this marks a placeholder (1x1 pixels, spacer GIFs); 28 px digits pass
    placeholder_repeats: int = 3  # this many distinct URLs with identical bytes -> placeholder; 0: off
    max_pixels: int = 100_000_000  # decompression-bomb guard
    status_every: float = 30.0  # seconds between periodic status-table writes
    limit: int | None = None  # only the first N rows (trying a few)
    skip_failed: bool = False  # keep previous failures instead of retrying them
    progress: bool = True
    user_agent: str = USER_AGENT

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ImatError(f"workers must be >= 1, got {self.workers}")
        if self.retries < 0:
            raise ImatError(f"retries must be >= 0, got {self.retries}")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ImatError("timeouts must be > 0")
        if self.max_bytes < 1:
            raise ImatError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.max_side is not None and self.max_side < 1:
            raise ImatError(f"max_side must be >= 1, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ImatError(f"quality must be in 1..100, got {self.quality}")
        if self.limit is not None and self.limit < 0:
            raise ImatError(f"limit must be >= 0, got {self.limit}")


class FetchError(Exception):
    """A failed image: ``reason`` is a short category (grouped in the summary), ``detail`` the specifics."""

    def __init__(self, reason: str, detail: str = "", retryable: bool = False, retry_after: float = 0.0):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = " ".join(str(detail).split())[:300]
        self.retryable = retryable
        self.retry_after = retry_after
