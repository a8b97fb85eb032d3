"""Bytes from http(s) and file URLs: bounded, with timeouts and retries with backoff on transient failures."""

from __future__ import annotations

import random
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from imat.download.settings import ALLOWED_SCHEMES, DownloadConfig, FetchError


def make_session(cfg: DownloadConfig) -> requests.Session:
    """One Session shared by all workers, its pool sized so every worker can hold a connection."""
    session = requests.Session()
    # Retries are ours (they also cover truncated bodies and 429 with Retry-After), not urllib3's.
    adapter = HTTPAdapter(pool_connections=cfg.workers, pool_maxsize=cfg.workers, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.8"})
    session.max_redirects = 5
    return session


def _connection_reason(exc: BaseException) -> str:
    text = str(exc).lower()
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if any(
        s in text for s in ("name or service not known", "nameresolution", "failed to resolve", "getaddrinfo")
    ):
        return "dns"
    if "refused" in text:
        return "connection refused"
    return "connection error"


def _retry_after(value: str | None, cap: float) -> float:
    try:
        return min(max(float(value), 0.0), cap) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP date: fall back to our own backoff


def _fetch_file(url: str, max_bytes: int) -> bytes:
    parsed = urllib.parse.urlsplit(url)
    if parsed.netloc not in ("", "localhost"):
        raise FetchError("unsupported scheme", f"file URL with host {parsed.netloc!r}")
    path = Path(urllib.request.url2pathname(parsed.path))
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise FetchError("not found", str(path)) from exc
    except OSError as exc:
        raise FetchError("file error", f"{path}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise FetchError("too large", f"more than {max_bytes} bytes")
    return data


def _fetch_http_once(session: requests.Session, url: str, cfg: DownloadConfig) -> bytes:
    try:
        resp = session.get(url, stream=True, timeout=(cfg.connect_timeout, cfg.read_timeout))
    except requests.exceptions.Timeout as exc:
        raise FetchError("timeout", str(exc), retryable=True) from exc
    except requests.exceptions.InvalidSchema as exc:  # e.g. a redirect to ftp:// or javascript:
        raise FetchError("unsupported scheme", str(exc)) from exc
    except requests.exceptions.TooManyRedirects as exc:
        raise FetchError("too many redirects", str(exc)) from exc
    except requests.exceptions.ConnectionError as exc:
        raise FetchError(_connection_reason(exc), str(exc), retryable=True) from exc
    except requests.exceptions.RequestException as exc:  # invalid URL and friends
        raise FetchError("bad url", str(exc)) from exc
    with resp:
        if resp.status_code != 200:
            transient = resp.status_code == 429 or resp.status_code >= 500
            wait = _retry_after(resp.headers.get("Retry-After"), cfg.backoff_max) if transient else 0.0
            raise FetchError(f"http {resp.status_code}", resp.reason or "", transient, wait)
        declared = resp.headers.get("Content-Length")
        declared_n = int(declared) if declared and declared.isdigit() else None
        if declared_n is not None and declared_n > cfg.max_bytes:
            raise FetchError("too large", f"Content-Length {declared_n} > {cfg.max_bytes}")
        chunks: list[bytes] = []
        total = 0
        try:
            for chunk in resp.iter_content(chunk_size=64 * 1024):
                total += len(chunk)
                if total > cfg.max_bytes:
                    raise FetchError("too large", f"more than {cfg.max_bytes} bytes")
                chunks.append(chunk)
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
            raise FetchError("truncated", str(exc), retryable=True) from exc
        except requests.exceptions.ConnectionError as exc:  # a read timeout mid-body lands here
            raise FetchError(_connection_reason(exc), str(exc), retryable=True) from exc
        encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
        if declared_n is not None and not encoded and total < declared_n:
            raise FetchError("truncated", f"{total} of {declared_n} bytes", retryable=True)
        return b"".join(chunks)


def fetch_bytes(
    session: requests.Session, url: Any, cfg: DownloadConfig, sleep: Callable[[float], None] = time.sleep
) -> bytes:
    """The body of ``url`` (http/https/file), retried with backoff on transient failures.

    Raises FetchError with a short ``reason`` when it cannot be had."""
    if url is None or (isinstance(url, float) and url != url) or str(url).strip() == "":
        raise FetchError("no url")
    url = str(url).strip()
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise FetchError("unsupported scheme", scheme or url[:40])
    if scheme == "file":
        return _fetch_file(url, cfg.max_bytes)
    attempt = 0
    while True:
        try:
            return _fetch_http_once(session, url, cfg)
        except FetchError as exc:
            if not exc.retryable or attempt >= cfg.retries:
                raise
            delay = min(cfg.backoff * 2**attempt, cfg.backoff_max) * (0.5 + random.random())
            sleep(max(delay, exc.retry_after))
            attempt += 1
