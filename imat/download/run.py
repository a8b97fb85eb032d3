"""The driver: one concurrent, resumable run over a table of images, its status table and its report."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from imat.download.fetch import fetch_bytes, make_session
from imat.download.images import PlaceholderRegistry, encode_image
from imat.download.paths import safe_file_name, safe_target
from imat.download.settings import STATUS_COLUMNS, STATUS_FILE, DownloadConfig, FetchError
from imat.errors import ImatError
from imat.io import write_bytes, write_csv


@dataclass
class DownloadReport:
    """What a run did: the full status table (all rows known in the folder), this run's rows, time."""

    status: pd.DataFrame  # every image ever recorded in the folder's status table
    run: pd.DataFrame  # only the rows of this run
    seconds: float
    out_dir: Path

    @property
    def counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.run["status"].value_counts().items()}

    def summary(self) -> pd.DataFrame:
        """Counts by status and by failure reason (one table, ``kind`` says which)."""
        run = self.run
        rows = [
            {"kind": "status", "name": s, "count": int((run["status"] == s).sum())}
            for s in ("ok", "skipped", "failed")
        ]
        failed = run[run["status"] == "failed"]
        for reason, n in failed["reason"].value_counts().sort_index().items():
            rows.append({"kind": "failed", "name": str(reason), "count": int(n)})
        return pd.DataFrame(rows, columns=["kind", "name", "count"])

    def rates(self) -> dict[str, float]:
        ok = self.run[self.run["status"] == "ok"]
        secs = max(self.seconds, 1e-9)
        down_mb = float(pd.to_numeric(ok["download_bytes"]).sum()) / 1e6
        return {
            "seconds": self.seconds,
            "fetched": float(len(ok)),
            "images_per_s": len(ok) / secs,
            "downloaded_mb": down_mb,
            "written_mb": float(pd.to_numeric(ok["bytes"]).sum()) / 1e6,
            "mb_per_s": down_mb / secs,
        }

    def format(self) -> str:
        """A small plain-text table for the terminal."""
        lines = [f"{'status':<10} {'reason':<24} {'count':>8}"]
        for row in self.summary().itertuples():
            if row.kind == "status":
                lines.append(f"{row.name:<10} {'':<24} {row.count:>8}")
            else:
                lines.append(f"{'':<10} {row.name:<24} {row.count:>8}")
        r = self.rates()
        lines.append(
            f"{len(self.run)} images in {r['seconds']:.1f} s: {r['images_per_s']:.1f} images/s fetched, "
            f"{r['downloaded_mb']:.1f} MB downloaded ({r['mb_per_s']:.1f} MB/s), {r['written_mb']:.1f} MB written"
        )
        lines.append(f"status table: {self.out_dir / STATUS_FILE}")
        return "\n".join(lines)


def read_status(out_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The folder's status table, or an empty one (an unreadable table is ignored: files on disk rule)."""
    path = Path(out_dir) / STATUS_FILE
    if not path.is_file():
        return pd.DataFrame(columns=STATUS_COLUMNS)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError):
        return pd.DataFrame(columns=STATUS_COLUMNS)
    for col in STATUS_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    return df[STATUS_COLUMNS]


def _blank(image_id: str, path: str, url: str) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "path": path,
        "url": url,
        "status": "failed",
        "reason": "",
        "detail": "",
        "bytes": 0,
        "download_bytes": 0,
        "width": 0,
        "height": 0,
        "seconds": 0.0,
        "sha1": "",
    }


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def _int(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


class _Run:
    """The state of one run: rows, the shared session, the placeholder registry, the status writer."""

    def __init__(self, out_dir: Path, cfg: DownloadConfig, previous: pd.DataFrame) -> None:
        self.out_dir = out_dir
        self.cfg = cfg
        self.records: dict[int, dict[str, Any]] = {}  # this run's rows, by 0-based row number
        # Rows of earlier runs for images not in this run (another split in the same folder, rows
        # beyond --limit): kept in the table, and evictable if their bytes turn out to be a placeholder.
        self.carried: dict[int, dict[str, Any]] = {}  # negative keys
        self.lock = threading.RLock()
        self.registry = PlaceholderRegistry(cfg.placeholder_repeats, self.lock)
        self.session = make_session(cfg)
        self.previous = previous

    def _fail(self, index: int, reason: str, detail: str = "") -> None:
        with self.lock:
            rec = self.records[index] if index >= 0 else self.carried[index]
            rec.update(status="failed", reason=reason, detail=detail, bytes=0, width=0, height=0)

    def work(self, index: int, target: Path) -> None:
        """Fetch, check, encode and write one image; the outcome goes into ``self.records[index]``."""
        rec = self.records[index]
        url = rec["url"]
        start = time.perf_counter()
        try:
            data = fetch_bytes(self.session, url, self.cfg)
            sha1 = hashlib.sha1(data).hexdigest()
            rec["download_bytes"], rec["sha1"] = len(data), sha1
            is_placeholder, victims = self.registry.claim(sha1, url)
            self._evict(victims)
            if is_placeholder:
                raise FetchError(
                    "placeholder: repeated", f"same bytes as {self.cfg.placeholder_repeats - 1}+ other URLs"
                )
            jpeg, w, h, _, _ = encode_image(data, self.cfg)
            write_bytes(target, jpeg)
            with self.lock:  # confirm + mark ok atomically (see PlaceholderRegistry)
                kept = self.registry.confirm(sha1, index, target)
                if kept:
                    rec.update(status="ok", reason="", detail="", bytes=len(jpeg), width=w, height=h)
            if not kept:
                target.unlink(missing_ok=True)
                raise FetchError("placeholder: repeated", "flagged while writing")
        except FetchError as exc:
            self._fail(index, exc.reason, exc.detail)
        except Exception as exc:  # noqa: BLE001 - one bad image must never stop a 200k-image run
            self._fail(index, "error", f"{type(exc).__name__}: {exc}")
        finally:
            rec["seconds"] = round(time.perf_counter() - start, 4)

    def _evict(self, victims: dict[int, Path]) -> None:
        for idx, path in victims.items():
            path.unlink(missing_ok=True)
            self._fail(idx, "placeholder: repeated", "content later seen at other URLs")

    def table(self) -> pd.DataFrame:
        with self.lock:
            run = pd.DataFrame([dict(r) for r in self.records.values()], columns=STATUS_COLUMNS)
        return run

    def write_status(self) -> pd.DataFrame:
        """Carried rows of earlier runs + this run's rows, written atomically."""
        with self.lock:
            rows = [dict(r) for r in self.carried.values()] + [dict(r) for r in self.records.values()]
        full = pd.DataFrame(rows, columns=STATUS_COLUMNS)
        write_csv(self.out_dir / STATUS_FILE, full)
        return full

    def carry(self, previous: pd.DataFrame, current_ids: set[str]) -> None:
        """Keep earlier rows of images not in this run; seed the registry with every known hash."""
        for n, row in enumerate(previous.to_dict("records")):
            sha1, url = row["sha1"], row["url"]
            if row["reason"] == "placeholder: repeated":
                self.registry.seed(sha1, url, flagged=True)
            if row["image_id"] in current_ids:
                continue
            key = -(n + 1)
            self.carried[key] = row
            if row["status"] in ("ok", "skipped") and sha1 and row["path"]:
                try:
                    target = safe_target(self.out_dir, row["path"])
                except FetchError:
                    continue
                if target.exists():
                    self.registry.seed(sha1, url, index=key, path=target)


def download(
    df: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    cfg: DownloadConfig | None = None,
    **overrides: Any,
) -> DownloadReport:
    """Fetch the images of ``df`` (columns ``image_id``, ``url`` and optionally ``path``) into ``out_dir``.

    ``overrides`` are DownloadConfig fields (``download(df, d, workers=8)``). Every row ends as
    ``ok`` (fetched and written), ``skipped`` (its file already existed: no request was made) or
    ``failed`` (``reason`` says why; its file is absent so the next run retries it). Returns the
    report; the status table is also at ``out_dir/download_status.csv``.
    """
    cfg = cfg or DownloadConfig()
    if overrides:
        cfg = DownloadConfig(**{**cfg.__dict__, **overrides})
    for col in ("image_id", "url"):
        if col not in df.columns:
            raise ImatError(
                f"download: the table has no {col!r} column (columns: {', '.join(map(str, df.columns))})"
            )
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImatError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    if cfg.limit is not None:
        df = df.head(cfg.limit)

    previous = read_status(out)
    prev_by_id = {r.image_id: r for r in previous.itertuples(index=False)} if len(previous) else {}
    run = _Run(out, cfg, previous)
    run.carry(previous, {_text(x) for x in df["image_id"]})

    todo: list[tuple[int, Path]] = []
    seen_targets: dict[str, int] = {}
    paths = df["path"] if "path" in df.columns else pd.Series([""] * len(df), index=df.index)
    for index, (image_id, path, url) in enumerate(zip(df["image_id"], paths, df["url"], strict=True)):
        image_id, url = _text(image_id), _text(url).strip()
        rec = _blank(image_id, _text(path), url)
        run.records[index] = rec
        try:
            name = safe_file_name(_text(path), image_id)
            rec["path"] = name
            target = safe_target(out, name)
        except ValueError:
            rec.update(reason="unsafe path", detail="no path and no image_id")
            continue
        except FetchError as exc:
            rec.update(reason=exc.reason, detail=exc.detail)
            continue
        if name in seen_targets:
            rec.update(reason="duplicate path", detail=f"same file as row {seen_targets[name]}")
            continue
        seen_targets[name] = index
        prev = prev_by_id.get(image_id)
        if target.exists():
            rec.update(status="skipped", reason="exists", bytes=target.stat().st_size)
            if prev is not None and prev.path == name and _int(prev.width):
                rec.update(width=_int(prev.width), height=_int(prev.height), sha1=prev.sha1)
                rec["download_bytes"] = _int(prev.download_bytes)
            else:
                try:
                    with Image.open(target) as im:  # header only: cheap
                        rec["width"], rec["height"] = im.size
                except Exception:  # noqa: BLE001 - a foreign file in the folder; leave it alone
                    pass
            # An existing file still counts towards its hash: if this run meets the same bytes at more
            # URLs, it is a placeholder and goes too.
            run.registry.seed(rec["sha1"], url, index=index, path=target)
            continue
        if cfg.skip_failed and prev is not None and prev.status == "failed":
            rec.update(reason=prev.reason, detail=prev.detail)
            continue
        todo.append((index, target))

    start = time.perf_counter()
    if todo:
        bar = tqdm(total=len(todo), unit="img", desc="download", disable=not cfg.progress)
        last_write = time.monotonic()
        n_ok = n_failed = 0
        pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="imat-dl")
        try:
            futures = {pool.submit(run.work, i, t): i for i, t in todo}
            for fut in as_completed(futures):
                fut.result()
                if run.records[futures[fut]]["status"] == "ok":
                    n_ok += 1
                else:
                    n_failed += 1
                bar.update(1)
                bar.set_postfix(ok=n_ok, failed=n_failed, refresh=False)
                if time.monotonic() - last_write >= cfg.status_every:
                    run.write_status()
                    last_write = time.monotonic()
        except BaseException:
            # Ctrl-C or a bug: drop what has not started, let the running ones finish (each is bounded
            # by its timeouts), record everything, then re-raise. The next run retries the rest.
            pool.shutdown(wait=True, cancel_futures=True)
            with run.lock:
                for i, _ in todo:
                    rec = run.records[i]
                    if rec["status"] == "failed" and not rec["reason"]:
                        rec.update(reason="interrupted")
            run.write_status()
            raise
        finally:
            pool.shutdown(wait=True)
            bar.close()
    seconds = time.perf_counter() - start
    run.session.close()
    full = run.write_status()
    table = run.table()
    table["bytes"] = pd.to_numeric(table["bytes"])
    return DownloadReport(status=full, run=table, seconds=seconds, out_dir=out)
