"""The downloader against a local HTTP server (tests/download_kit.py): good images in every mode, dead
links, slow and truncated responses, placeholders, oversize bodies, unsafe schemes and paths, and a resumed
second run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from download_kit import LOCAL_PNG, Server, by_id, closed_port, fast_cfg, frame, serving
from PIL import Image

from imat.download import STATUS_FILE, PlaceholderRegistry, download, read_status

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server() -> Iterator[Server]:
    with serving() as srv:
        yield srv


def test_full_run_then_resume(server, tmp_path):
    out = tmp_path / "images"
    local = tmp_path / "local.png"
    local.write_bytes(LOCAL_PNG)
    rows = [
        ("jpeg", server.url("/good.jpg")),
        ("png", server.url("/good.png")),
        ("rgba", server.url("/rgba.png")),
        ("gray", server.url("/gray.png")),
        ("palette", server.url("/palette.gif")),
        ("cmyk", server.url("/cmyk.jpg")),
        ("flaky", server.url("/flaky503")),
        ("file", local.as_uri()),
        ("missing", server.url("/nothing-here.jpg")),
        ("forbidden", server.url("/forbidden")),
        ("err500", server.url("/always500")),
        ("slow", server.url("/slow.png")),
        ("truncated", server.url("/truncated.png")),
        ("cut", server.url("/cut.jpg")),
        ("tiny", server.url("/tiny.png")),
        ("big", server.url("/big.png")),
        ("big_nolength", server.url("/big-nolength.png")),
        ("refused", f"http://127.0.0.1:{closed_port()}/x.jpg"),
        ("file_missing", (tmp_path / "nope.png").as_uri()),
        ("ftp", "ftp://127.0.0.1/x.jpg"),
        ("js", "javascript:alert(1)"),
        ("nourl", ""),
    ]
    t0 = time.perf_counter()
    report = download(frame(rows), out, fast_cfg())
    first_run_s = time.perf_counter() - t0
    rec = by_id(report)

    ok = ["jpeg", "png", "rgba", "gray", "palette", "cmyk", "flaky", "file"]
    for name in ok:
        assert rec[name]["status"] == "ok", rec[name]
        with Image.open(out / f"{name}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 48)
        assert (rec[name]["width"], rec[name]["height"]) == (64, 48)
    # A transparent region becomes white, not black.
    rgba = np.asarray(Image.open(out / "rgba.jpg"))
    assert rgba[:, :20].mean() > 245

    expected = {
        "missing": "http 404",
        "forbidden": "http 403",
        "err500": "http 500",
        "slow": "timeout",
        "truncated": "truncated",
        "tiny": "placeholder: tiny",
        "big": "too large",
        "big_nolength": "too large",
        "refused": "connection refused",
        "file_missing": "not found",
        "ftp": "unsupported scheme",
        "js": "unsupported scheme",
        "nourl": "no url",
    }
    for name, reason in expected.items():
        assert rec[name]["status"] == "failed" and rec[name]["reason"] == reason, rec[name]
        assert not (out / f"{name}.jpg").exists()
    assert rec["cut"]["status"] == "failed" and rec["cut"]["reason"] in ("truncated", "decode error")

    # Retries: only the transient ones were retried (retries=1 -> 2 requests), 4xx never.
    assert server.counts["/nothing-here.jpg"] == 1
    assert server.counts["/forbidden"] == 1
    assert server.counts["/always500"] == 2
    assert server.counts["/flaky503"] == 2
    assert server.counts["/truncated.png"] == 2
    assert server.counts["/slow.png"] == 2
    assert server.counts["/big.png"] == 1  # Content-Length says too large: no retry
    assert first_run_s < 20

    # The status table on disk has every row, written atomically (no temp files left).
    status = read_status(out)
    assert set(status["image_id"]) == {r[0] for r in rows}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    summary = report.summary()
    assert int(summary.loc[(summary.kind == "status") & (summary.name == "ok"), "count"].iloc[0]) == len(ok)
    text = report.format()
    assert "images/s" in text and "http 404" in text

    # Second run: nothing is requested for completed files; failures are retried.
    before = dict(server.counts)
    report2 = download(frame(rows), out, fast_cfg())
    rec2 = by_id(report2)
    for name in ok:
        assert rec2[name]["status"] == "skipped" and rec2[name]["reason"] == "exists"
        assert rec2[name]["width"] == 64 and rec2[name]["sha1"] == rec[name]["sha1"]
    for path in (
        "/good.jpg",
        "/good.png",
        "/rgba.png",
        "/gray.png",
        "/palette.gif",
        "/cmyk.jpg",
        "/flaky503",
    ):
        assert server.counts[path] == before[path], path
    assert server.counts["/nothing-here.jpg"] == 2  # failures are retried
    assert rec2["missing"]["status"] == "failed"

    # --skip-failed: previous failures are kept without a request.
    before = dict(server.counts)
    report3 = download(frame(rows), out, fast_cfg(skip_failed=True))
    assert dict(server.counts) == before
    assert by_id(report3)["missing"]["reason"] == "http 404"


def test_second_run_makes_no_requests(server, tmp_path):
    rows = [(f"im{i}", server.url(f"/img/{i}")) for i in range(12)]
    first = download(frame(rows), tmp_path, fast_cfg(workers=4))
    assert first.counts == {"ok": 12}
    assert server.total() == 12
    second = download(frame(rows), tmp_path, fast_cfg(workers=4))
    assert server.total() == 12
    assert second.counts == {"skipped": 12}
    status = pd.read_csv(tmp_path / STATUS_FILE, dtype=str, keep_default_na=False)
    assert (status["status"] == "skipped").all() and len(status) == 12
    # --limit only touches the first rows, and the status table keeps the others.
    (tmp_path / "im0.jpg").unlink()
    third = download(frame(rows), tmp_path, fast_cfg(limit=2))
    assert len(third.run) == 2 and third.counts == {"ok": 1, "skipped": 1}
    assert server.total() == 13
    assert len(read_status(tmp_path)) == 12


def test_repeated_bytes_are_placeholders(server, tmp_path):
    rows = [(f"na{i}", server.url(f"/na/{i}")) for i in range(5)]
    rows += [("dup_same_url_a", server.url("/good.jpg")), ("good2", server.url("/good.png"))]
    report = download(frame(rows), tmp_path, fast_cfg(placeholder_repeats=3))
    rec = by_id(report)
    for i in range(5):
        assert rec[f"na{i}"]["status"] == "failed" and rec[f"na{i}"]["reason"] == "placeholder: repeated"
        assert not (tmp_path / f"na{i}.jpg").exists()
    assert rec["good2"]["status"] == "ok"
    # The resumed run retries them, but the hash is remembered: still nothing written.
    report2 = download(frame(rows), tmp_path, fast_cfg(placeholder_repeats=3))
    assert all(by_id(report2)[f"na{i}"]["reason"] == "placeholder: repeated" for i in range(5))
    assert not list(tmp_path.glob("na*.jpg"))


def test_placeholders_below_threshold_and_off(server, tmp_path):
    # Two URLs with the same bytes is a re-used photo, not a placeholder; the same URL twice never counts.
    rows = [("a", server.url("/na/1")), ("b", server.url("/na/2")), ("c", server.url("/na/2"))]
    report = download(frame(rows), tmp_path / "one", fast_cfg(placeholder_repeats=3))
    assert report.counts == {"ok": 3}
    rows = [(f"n{i}", server.url(f"/na/{i}")) for i in range(4)]
    report = download(frame(rows), tmp_path / "off", fast_cfg(placeholder_repeats=0))
    assert report.counts == {"ok": 4}


def test_existing_files_count_towards_placeholder(server, tmp_path):
    """Files written by an earlier run are deleted when later URLs reveal their bytes as a placeholder."""
    first = download(frame([("p0", server.url("/na/0")), ("p1", server.url("/na/1"))]), tmp_path, fast_cfg())
    assert first.counts == {"ok": 2}
    rows = [(f"p{i}", server.url(f"/na/{i}")) for i in range(3)]
    second = download(frame(rows), tmp_path, fast_cfg())
    assert second.counts == {"failed": 3}
    assert not list(tmp_path.glob("p*.jpg"))
    assert server.counts["/na/0"] == 1  # p0 was still not requested again


def test_rows_of_other_runs_are_carried_and_evictable(server, tmp_path):
    """Another split downloaded into the same folder keeps its rows; if this run reveals their bytes as
    a placeholder, their files go and their rows say so."""
    first = download(frame([("t0", server.url("/na/0")), ("t1", server.url("/na/1"))]), tmp_path, fast_cfg())
    assert first.counts == {"ok": 2}
    second = download(
        frame([("v0", server.url("/na/2")), ("v1", server.url("/good.jpg"))]),
        tmp_path,
        fast_cfg(status_every=0),
    )
    assert by_id(second)["v0"]["reason"] == "placeholder: repeated"
    assert by_id(second)["v1"]["status"] == "ok"
    status = read_status(tmp_path).set_index("image_id")
    assert sorted(status.index) == ["t0", "t1", "v0", "v1"]
    assert (status.loc[["t0", "t1", "v0"], "reason"] == "placeholder: repeated").all()
    assert not list(tmp_path.glob("t*.jpg")) and (tmp_path / "v1.jpg").exists()


def test_registry_race_free():
    reg = PlaceholderRegistry(threshold=2)
    assert reg.claim("h", "u1") == (False, {})
    # u2 crosses the threshold while u1 is writing: u1's confirm must fail so it deletes its file.
    flagged, victims = reg.claim("h", "u2")
    assert flagged and victims == {}
    assert reg.confirm("h", 0, Path("x")) is False
    reg2 = PlaceholderRegistry(threshold=2)
    reg2.claim("h", "u1")
    assert reg2.confirm("h", 0, Path("x")) is True
    assert reg2.claim("h", "u2") == (True, {0: Path("x")})
    assert reg2.flagged() == {"h"}


def test_unsafe_ids_never_escape(server, tmp_path):
    out = tmp_path / "deep" / "out"
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"keep me")
    out.mkdir(parents=True)
    (out / "link.jpg").symlink_to(outside)
    ids = [
        "../../evil",
        "/tmp/imat-abs-evil.jpg",
        "..\\..\\evil.jpg",
        "a\x00b.jpg",
        "x" * 400 + ".jpg",
        "link.jpg",
        "../deep",
    ]
    df = pd.DataFrame({"image_id": ids, "path": ids, "url": [server.url("/good.jpg")] * len(ids)})
    report = download(df, out, fast_cfg())
    rec = by_id(report)
    assert rec["link.jpg"]["status"] == "failed" and rec["link.jpg"]["reason"] == "unsafe path"
    assert outside.read_bytes() == b"keep me"
    for name in ids[:5] + ids[6:]:
        assert rec[name]["status"] == "ok", rec[name]
        written = out / rec[name]["path"]
        assert written.is_file() and written.resolve().parent == out.resolve()
        assert "/" not in rec[name]["path"] and len(rec[name]["path"].encode()) <= 200
    # Nothing appeared anywhere but inside out.
    files = {p.resolve() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    assert all(p.parent == out.resolve() or p == outside.resolve() for p in files), files
    assert not Path("/tmp/imat-abs-evil.jpg").exists()
    assert len({r["path"] for r in rec.values()}) == len(ids)
