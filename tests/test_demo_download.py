"""`imat demo`'s download step really fetches: the kit's URLs point at the kit's own folder
(``OUT/kit/images``), the downloader writes to ``data.images`` (``OUT/images``), so every image of every
split goes through the real downloader and none is skipped as already present."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import imat.download
from imat.app.cli import main


def test_demo_download_fetches_every_image(tmp_path: Path, monkeypatch) -> None:
    reports = []
    real = imat.download.download

    def spy(*args, **kwargs):
        report = real(*args, **kwargs)
        reports.append(report)
        return report

    monkeypatch.setattr(imat.download, "download", spy)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--limit", "60", "--until", "data", "--no-progress"]) == 0

    kit_images = sorted((out / "kit" / "images").glob("*.jpg"))
    assert len(kit_images) == 60
    status = pd.concat([r.run for r in reports], ignore_index=True)  # each call's own rows
    assert len(reports) == 3  # train, val, test
    assert len(status) == len(kit_images) and status["image_id"].is_unique
    assert len(reports[-1].status) == len(kit_images)  # the folder's table: every image, once
    assert (status["status"] == "ok").all(), status["status"].value_counts().to_dict()
    fetched = {p.name for p in (out / "images").glob("*.jpg")}  # written into data.images, not the kit
    assert fetched == {p.name for p in kit_images}
