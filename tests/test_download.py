"""The downloader against a local HTTP server: good images in every mode, dead links, slow and truncated
responses, placeholders, oversize bodies, unsafe schemes and paths, and a resumed second run."""

from __future__ import annotations

import collections
import contextlib
import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imat.download import (
    STATUS_FILE,
    DownloadConfig,
    FetchError,
    PlaceholderRegistry,
    download,
    encode_image,
    read_status,
    safe_file_name,
    safe_target,
)

pytestmark = pytest.mark.timeout(120)


def _img_bytes(mode: str, size=(64, 48), fmt="PNG", seed=0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode in ("RGB", "CMYK"):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        im = im.convert(mode)
    elif mode == "RGBA":
        arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        arr[:, : w // 2, 3] = 0  # left half fully transparent
        im = Image.fromarray(arr, "RGBA")
    elif mode == "L":
        im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    elif mode == "P":
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").quantize(16)
    elif mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        raise ValueError(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


GOOD_JPEG = _img_bytes("RGB", fmt="JPEG", seed=1)
GOOD_PNG = _img_bytes("RGB", seed=2)
RGBA_PNG = _img_bytes("RGBA", seed=3)
GRAY_PNG = _img_bytes("L", seed=4)
PALETTE_GIF = _img_bytes("P", fmt="GIF", seed=5)
CMYK_JPEG = _img_bytes("CMYK", fmt="JPEG", seed=6)
TINY_PNG = _img_bytes("RGB", size=(1, 1), seed=7)
NOT_AVAILABLE = _img_bytes("RGB", size=(120, 90), fmt="JPEG", seed=8)  # the "image not available" picture
BIG_PNG = _img_bytes("RGB", size=(300, 300), seed=9)  # ~270 kB of noise, above the test's max_bytes
FLAKY_PNG = _img_bytes("RGB", seed=10)
LOCAL_PNG = _img_bytes("RGB", seed=11)
MAX_BYTES = 100_000
assert len(BIG_PNG) > MAX_BYTES > len(GOOD_PNG)


class Server:
    """A ThreadingHTTPServer on 127.0.0.1:0 in a daemon thread that counts requests per path."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.flaky_left = {"/flaky503": 1}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", length: int | None = None, ctype="image/png"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - http.server's name
                path = self.path.split("?")[0]
                with server.lock:
                    server.counts[path] += 1
                static = {
                    "/good.jpg": GOOD_JPEG,
                    "/good.png": GOOD_PNG,
                    "/rgba.png": RGBA_PNG,
                    "/gray.png": GRAY_PNG,
                    "/palette.gif": PALETTE_GIF,
                    "/cmyk.jpg": CMYK_JPEG,
                    "/tiny.png": TINY_PNG,
                    "/big.png": BIG_PNG,
                    "/cut.jpg": GOOD_JPEG[: len(GOOD_JPEG) // 2],  # honest length, broken image
                }
                if path in static:
                    body = static[path]
                    return self._send(200, body, len(body))
                if path.startswith("/na/"):
                    return self._send(200, NOT_AVAILABLE, len(NOT_AVAILABLE), "image/jpeg")
                if path.startswith("/img/"):  # distinct images by number, for the resume test
                    body = _img_bytes("RGB", seed=100 + int(path.rsplit("/", 1)[1]))
                    return self._send(200, body, len(body))
                if path == "/big-nolength.png":  # no Content-Length: the cap must stop the stream
                    return self._send(200, BIG_PNG, None)
                if path == "/truncated.png":  # promises more than it sends, then hangs up
                    return self._send(200, GOOD_PNG[:200], len(GOOD_PNG))
                if path == "/slow.png":
                    time.sleep(1.0)
                    return self._send(200, GOOD_PNG, len(GOOD_PNG))
                if path == "/always500":
                    return self._send(500, b"oops", 4, "text/plain")
                if path == "/flaky503":
                    with server.lock:
                        left = server.flaky_left[path]
                        server.flaky_left[path] = left - 1
                    if left > 0:
                        return self._send(503, b"busy", 4, "text/plain")
                    return self._send(200, FLAKY_PNG, len(FLAKY_PNG))
                if path == "/forbidden":
                    return self._send(403, b"no", 2, "text/plain")
                return self._send(404, b"not found", 9, "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        # Bounded: even if a test forgets to stop it, the server shuts itself down.
        self.timer = threading.Timer(90.0, self.httpd.shutdown)
        self.timer.daemon = True
        self.timer.start()

    def url(self, path: str) -> str:
        return self.base + path

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def stop(self) -> None:
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(**kw) -> DownloadConfig:
    base = dict(
        workers=8,
        connect_timeout=1.0,
        read_timeout=0.3,
        retries=1,
        backoff=0.01,
        max_bytes=MAX_BYTES,
        progress=False,
    )
    base.update(kw)
    return DownloadConfig(**base)


def _frame(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {"image_id": [r[0] for r in rows], "path": [f"{r[0]}.jpg" for r in rows], "url": [r[1] for r in rows]}
    )


def _by_id(report) -> dict[str, dict]:
    return {r["image_id"]: r for r in report.run.to_dict("records")}


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
        ("refused", f"http://127.0.0.1:{_closed_port()}/x.jpg"),
        ("file_missing", (tmp_path / "nope.png").as_uri()),
        ("ftp", "ftp://127.0.0.1/x.jpg"),
        ("js", "javascript:alert(1)"),
        ("nourl", ""),
    ]
    t0 = time.perf_counter()
    report = download(_frame(rows), out, _cfg())
    first_run_s = time.perf_counter() - t0
    rec = _by_id(report)

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
    report2 = download(_frame(rows), out, _cfg())
    rec2 = _by_id(report2)
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
    report3 = download(_frame(rows), out, _cfg(skip_failed=True))
    assert dict(server.counts) == before
    assert _by_id(report3)["missing"]["reason"] == "http 404"


def test_second_run_makes_no_requests(server, tmp_path):
    rows = [(f"im{i}", server.url(f"/img/{i}")) for i in range(12)]
    first = download(_frame(rows), tmp_path, _cfg(workers=4))
    assert first.counts == {"ok": 12}
    assert server.total() == 12
    second = download(_frame(rows), tmp_path, _cfg(workers=4))
    assert server.total() == 12
    assert second.counts == {"skipped": 12}
    status = pd.read_csv(tmp_path / STATUS_FILE, dtype=str, keep_default_na=False)
    assert (status["status"] == "skipped").all() and len(status) == 12
    # --limit only touches the first rows, and the status table keeps the others.
    (tmp_path / "im0.jpg").unlink()
    third = download(_frame(rows), tmp_path, _cfg(limit=2))
    assert len(third.run) == 2 and third.counts == {"ok": 1, "skipped": 1}
    assert server.total() == 13
    assert len(read_status(tmp_path)) == 12


def test_repeated_bytes_are_placeholders(server, tmp_path):
    rows = [(f"na{i}", server.url(f"/na/{i}")) for i in range(5)]
    rows += [("dup_same_url_a", server.url("/good.jpg")), ("good2", server.url("/good.png"))]
    report = download(_frame(rows), tmp_path, _cfg(placeholder_repeats=3))
    rec = _by_id(report)
    for i in range(5):
        assert rec[f"na{i}"]["status"] == "failed" and rec[f"na{i}"]["reason"] == "placeholder: repeated"
        assert not (tmp_path / f"na{i}.jpg").exists()
    assert rec["good2"]["status"] == "ok"
    # The resumed run retries them, but the hash is remembered: still nothing written.
    report2 = download(_frame(rows), tmp_path, _cfg(placeholder_repeats=3))
    assert all(_by_id(report2)[f"na{i}"]["reason"] == "placeholder: repeated" for i in range(5))
    assert not list(tmp_path.glob("na*.jpg"))


def test_placeholders_below_threshold_and_off(server, tmp_path):
    # Two URLs with the same bytes is a re-used photo, not a placeholder; the same URL twice never counts.
    rows = [("a", server.url("/na/1")), ("b", server.url("/na/2")), ("c", server.url("/na/2"))]
    report = download(_frame(rows), tmp_path / "one", _cfg(placeholder_repeats=3))
    assert report.counts == {"ok": 3}
    rows = [(f"n{i}", server.url(f"/na/{i}")) for i in range(4)]
    report = download(_frame(rows), tmp_path / "off", _cfg(placeholder_repeats=0))
    assert report.counts == {"ok": 4}


def test_existing_files_count_towards_placeholder(server, tmp_path):
    """Files written by an earlier run are deleted when later URLs reveal their bytes as a placeholder."""
    first = download(_frame([("p0", server.url("/na/0")), ("p1", server.url("/na/1"))]), tmp_path, _cfg())
    assert first.counts == {"ok": 2}
    rows = [(f"p{i}", server.url(f"/na/{i}")) for i in range(3)]
    second = download(_frame(rows), tmp_path, _cfg())
    assert second.counts == {"failed": 3}
    assert not list(tmp_path.glob("p*.jpg"))
    assert server.counts["/na/0"] == 1  # p0 was still not requested again


def test_rows_of_other_runs_are_carried_and_evictable(server, tmp_path):
    """Another split downloaded into the same folder keeps its rows; if this run reveals their bytes as
    a placeholder, their files go and their rows say so."""
    first = download(_frame([("t0", server.url("/na/0")), ("t1", server.url("/na/1"))]), tmp_path, _cfg())
    assert first.counts == {"ok": 2}
    second = download(
        _frame([("v0", server.url("/na/2")), ("v1", server.url("/good.jpg"))]), tmp_path, _cfg(status_every=0)
    )
    assert _by_id(second)["v0"]["reason"] == "placeholder: repeated"
    assert _by_id(second)["v1"]["status"] == "ok"
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
    report = download(df, out, _cfg())
    rec = _by_id(report)
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


def test_safe_file_name_rules(tmp_path):
    assert safe_file_name("123.jpg") == "123.jpg"
    assert safe_file_name("", 42) == "42.jpg"
    assert safe_file_name(None, "abc.jpg") == "abc.jpg.jpg"
    for bad in ["../../evil", "/abs/x.jpg", "..\\x.jpg", "a\x00b", ".hidden", "..", "a/b.jpg"]:
        name = safe_file_name(bad)
        assert "/" not in name and "\\" not in name and "\x00" not in name and not name.startswith(".")
        assert safe_target(tmp_path, name).parent == tmp_path.resolve()
    assert safe_file_name("a/b.jpg") != safe_file_name("a_b.jpg")
    with pytest.raises(FetchError):
        safe_target(tmp_path, "../x")
    with pytest.raises(ValueError):
        safe_file_name("", "")


def test_encode_image_modes_and_resize():
    cfg = DownloadConfig(max_side=32, quality=80, progress=False)
    for data in (GOOD_JPEG, GOOD_PNG, RGBA_PNG, GRAY_PNG, PALETTE_GIF, CMYK_JPEG, _img_bytes("I;16")):
        jpeg, w, h, sw, sh = encode_image(data, cfg)
        assert (sw, sh) == (64, 48) and max(w, h) == 32 and (w, h) == (32, 24)
        with Image.open(io.BytesIO(jpeg)) as im:
            assert im.mode == "RGB" and im.format == "JPEG" and im.size == (32, 24)
    big = _img_bytes("RGB", size=(800, 600), fmt="JPEG")
    _, w, h, _, _ = encode_image(big, cfg)  # DCT draft then exact thumbnail
    assert (w, h) == (32, 24)
    with pytest.raises(FetchError, match="not an image"):
        encode_image(b"<html>not available</html>", cfg)
    with pytest.raises(FetchError, match="placeholder: tiny"):
        encode_image(TINY_PNG, cfg)
    with pytest.raises(FetchError) as err:
        encode_image(GOOD_JPEG[: len(GOOD_JPEG) // 2], cfg)
    assert err.value.reason in ("truncated", "decode error")


def test_exif_orientation_applied():
    im = Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    _, w, h, _, _ = encode_image(buf.getvalue(), DownloadConfig(progress=False))
    assert (w, h) == (48, 64)


def test_bad_config_and_table():
    from imat.errors import ImatError

    with pytest.raises(ImatError):
        DownloadConfig(workers=0)
    with pytest.raises(ImatError):
        DownloadConfig(quality=101)
    with pytest.raises(ImatError, match="url"):
        download(pd.DataFrame({"image_id": ["a"]}), "/tmp/imat-never-used", DownloadConfig(progress=False))


def test_cli_missing_json_is_one_line(tmp_path, capsys):
    from imat.app.cli import main

    code = main(["data", "download", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nope.json" in err and "imat data download: error:" in err


def test_cli_downloads_furniture_json_and_resumes(server, tmp_path, capsys):
    import json

    from imat.app.cli import main

    doc = {
        "images": [{"url": [server.url(f"/img/{i}")], "image_id": i} for i in range(1, 6)]
        + [{"url": [server.url("/gone")], "image_id": 6}],
        "annotations": [{"image_id": i, "label_id": 1 + i % 2} for i in range(1, 7)],
    }
    src = tmp_path / "train.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "images"
    args = [
        "data",
        "download",
        str(src),
        "--out",
        str(out),
        "--workers",
        "4",
        "--retries",
        "0",
        "--no-progress",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "http 404" in text and "images/s" in text
    assert sorted(p.name for p in out.glob("*.jpg")) == [f"{i}.jpg" for i in range(1, 6)]
    assert server.total() == 6
    assert main(args + ["--limit", "3"]) == 0  # a trial run over files that exist: no request
    assert server.total() == 6
    assert main(args) == 0  # only the dead link is tried again
    assert server.total() == 7 and server.counts["/gone"] == 2
    status = read_status(out).set_index("image_id")
    assert status.loc["1", "status"] == "skipped" and status.loc["6", "reason"] == "http 404"


def test_cli_product2019_and_bad_inputs(server, tmp_path, capsys):
    import json

    from imat.app.cli import main

    src = tmp_path / "val.json"
    src.write_text(json.dumps({"images": [{"id": "abc.jpg", "url": server.url("/img/1"), "class": 3}]}))
    assert main(["data", "download", str(src), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert (tmp_path / "o" / "abc.jpg").is_file()
    capsys.readouterr()

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["data", "download", str(bad), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.json" in err

    # Every URL dead: nothing usable, exit 1 so a script notices.
    dead = tmp_path / "test.json"
    dead.write_text(json.dumps({"images": [{"url": [server.url("/gone")], "image_id": 1}]}))
    assert main(["data", "download", str(dead), "--out", str(tmp_path / "o3"), "--no-progress"]) == 1
    with pytest.raises(SystemExit):  # argparse rejects a non-integer
        main(["data", "download", str(dead), "--out", str(tmp_path / "o3"), "--workers", "x"])
    capsys.readouterr()
    assert main(["data", "download", str(dead), "--out", str(tmp_path / "o3"), "--workers", "0"]) == 2
    assert "workers" in capsys.readouterr().err


def test_cli_json_without_urls(tmp_path, capsys):
    import json

    from imat.app.cli import main

    src = tmp_path / "coco.json"
    src.write_text(
        json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], "categories": []})
    )
    assert main(["data", "download", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no image URLs" in err and err.count("\n") == 1
