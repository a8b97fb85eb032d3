"""`imat data download` end to end against the local server: competition JSON files, resume, bad inputs
as one-line errors with exit 2, exit 1 when every URL is dead."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from download_kit import Server, serving

from imat.download import read_status

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server() -> Iterator[Server]:
    with serving() as srv:
        yield srv


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
