"""Fetch a URL-only competition's images into one folder, safely, concurrently and resumably.

iMaterialist Furniture/Fashion 2018 and Product 2019 ship URLs, not images. Public solutions
fetched them with a thread or process pool, skipped files already on disk so a run could be
repeated, normalised every image to RGB JPEG on the fly and afterwards deleted the "image not
available" placeholders that dead servers answer with HTTP 200 (docs: competitions.md section 5).
This package does all of that in one pass:

* **Concurrency**: a ``ThreadPoolExecutor`` (default 32 workers; the work is network bound) sharing
  one ``requests.Session`` whose connection pool is sized to the workers so connections are reused
  instead of re-opened per image.
* **Robust HTTP**: connect/read timeouts, retries with exponential backoff and jitter on connection
  errors, timeouts, truncated bodies and 5xx/429 (``Retry-After`` honoured, capped); never on 4xx
  such as 404/403 (a dead link stays dead). Only ``http``, ``https`` and ``file`` URLs are fetched.
* **Bounded**: at most ``max_bytes`` are read per image (streamed, stopped early); a body shorter
  than its ``Content-Length`` or an image that does not decode fully is a failure, never a file.
* **Normalised**: decoded with PIL, EXIF orientation applied, converted to RGB (palette, alpha
  composited on white, CMYK, 16-bit grey), optionally shrunk so the longer side is <= ``max_side``
  (JPEG DCT-domain draft first, so big JPEGs are cheap to shrink), re-encoded as JPEG and written
  atomically through :mod:`imat.io`.
* **Placeholders**: see :class:`PlaceholderRegistry`.
* **Safe paths**: whatever ``image_id``/``path`` contain, the file lands directly inside the output
  folder (see :func:`safe_file_name` and :func:`safe_target`).
* **Resumable**: a target that exists is complete (writes are atomic), so it is skipped without a
  request. ``download_status.csv`` (written atomically, periodically and at the end) holds one row
  per image; a second run fetches only what is missing, i.e. retries the failures.

Entry point: :func:`download` (a DataFrame of ``image_id, path, url`` in, a :class:`DownloadReport`
out). The CLI wrapper is :mod:`imat.app.commands.download`.
"""

from imat.download.fetch import fetch_bytes, make_session
from imat.download.images import PlaceholderRegistry, encode_image
from imat.download.paths import MAX_NAME_BYTES, safe_file_name, safe_target
from imat.download.run import DownloadReport, download, read_status
from imat.download.settings import (
    ALLOWED_SCHEMES,
    STATUS_COLUMNS,
    STATUS_FILE,
    USER_AGENT,
    DownloadConfig,
    FetchError,
)

__all__ = [
    "ALLOWED_SCHEMES",
    "MAX_NAME_BYTES",
    "STATUS_COLUMNS",
    "STATUS_FILE",
    "USER_AGENT",
    "DownloadConfig",
    "DownloadReport",
    "FetchError",
    "PlaceholderRegistry",
    "download",
    "encode_image",
    "fetch_bytes",
    "make_session",
    "read_status",
    "safe_file_name",
    "safe_target",
]
