"""The downloader's file side without a server: safe file names, re-encoding every image mode to RGB JPEG
with resizing and EXIF orientation, and its config checks."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from download_kit import CMYK_JPEG, GOOD_JPEG, GOOD_PNG, GRAY_PNG, PALETTE_GIF, RGBA_PNG, TINY_PNG, img_bytes
from PIL import Image

from imat.download import DownloadConfig, FetchError, download, encode_image, safe_file_name, safe_target


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
    for data in (GOOD_JPEG, GOOD_PNG, RGBA_PNG, GRAY_PNG, PALETTE_GIF, CMYK_JPEG, img_bytes("I;16")):
        jpeg, w, h, sw, sh = encode_image(data, cfg)
        assert (sw, sh) == (64, 48) and max(w, h) == 32 and (w, h) == (32, 24)
        with Image.open(io.BytesIO(jpeg)) as im:
            assert im.mode == "RGB" and im.format == "JPEG" and im.size == (32, 24)
    big = img_bytes("RGB", size=(800, 600), fmt="JPEG")
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
