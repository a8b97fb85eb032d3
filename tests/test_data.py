"""imat.data: decoding, presets, replayable views, skip-tolerant loading, sampler, mixup, label noise."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from imat.config import AugConfig
from imat.data import (
    PRESETS,
    ImageDataset,
    ImageDecodeError,
    View,
    apply_label_noise,
    apply_view,
    balanced_sampler,
    build_eval_transform,
    build_loader,
    build_mixup,
    build_normalize_transform,
    build_train_transform,
    collate_skip,
    decode_image,
    random_view,
    sample_view,
)
from imat.errors import ImatError

RNG = np.random.default_rng(0)


def _write_jpeg(path: Path, h: int = 40, w: int = 52, seed: int = 0) -> np.ndarray:
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    path.write_bytes(buf.tobytes())
    return img


# --- decode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["cv2", "pil"])
def test_decode_rgb_lossless_png_same_for_both_decoders(tmp_path, decoder):
    img = _write_jpeg(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png", decoder)
    assert out.shape == (40, 52, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, img)  # RGB order, not BGR


@pytest.mark.parametrize("decoder", ["cv2", "pil"])
def test_decode_grayscale_and_alpha_become_rgb(tmp_path, decoder):
    gray = np.arange(30 * 20, dtype=np.uint8).reshape(30, 20)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    out = decode_image(tmp_path / "g.png", decoder)
    assert out.shape == (30, 20, 3)
    np.testing.assert_array_equal(out[..., 0], gray)
    rgba = np.zeros((8, 9, 4), np.uint8)
    rgba[..., 2] = 200  # red in BGRA
    rgba[..., 3] = 255
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    out = decode_image(tmp_path / "a.png", decoder)
    assert out.shape == (8, 9, 3) and out[0, 0].tolist() == [200, 0, 0]


@pytest.mark.parametrize("decoder", ["cv2", "pil"])
def test_decode_errors_are_one_line_and_name_the_file(tmp_path, decoder):
    (tmp_path / "bad.jpg").write_bytes(np.random.default_rng(1).bytes(500))
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("bad.jpg", "empty.jpg", "missing.jpg"):
        with pytest.raises(ImageDecodeError) as info:
            decode_image(tmp_path / name, decoder)
        assert name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ImatError):
        decode_image(tmp_path / "bad.jpg", "turbo")


# --- transforms ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_give_normalised_chw_tensors(preset):
    img = RNG.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    t = build_train_transform(preset, 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    for _ in range(3):
        out = t(image=img)["image"]
        assert isinstance(out, torch.Tensor)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert out.min() >= -2.0 - 1e-5 and out.max() <= 2.0 + 1e-5  # (0 - .5)/.25 .. (1 - .5)/.25


def test_train_transform_accepts_augconfig_and_rejects_unknown():
    img = RNG.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    out = build_train_transform(AugConfig(preset="heavy"), 24)(image=img)["image"]
    assert out.shape == (3, 24, 24)
    with pytest.raises(ImatError, match="preset"):
        build_train_transform("extreme", 24)
    with pytest.raises(ImatError):
        build_train_transform("light", 0)


def test_heavy_is_random_and_eval_is_deterministic():
    img = RNG.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    heavy = build_train_transform("heavy", 32)
    a, b = heavy(image=img)["image"], heavy(image=img)["image"]
    assert not torch.equal(a, b)
    ev = build_eval_transform(32, crop_pct=0.875)
    e1, e2 = ev(image=img)["image"], ev(image=img)["image"]
    assert torch.equal(e1, e2) and e1.shape == (3, 32, 32)
    # shorter side 60 -> floor(32/0.875)=36, width 48, centre 32x32 crop of that
    resized = cv2.resize(img, (48, 36), interpolation=cv2.INTER_LINEAR)[2:34, 8:40]
    ref = build_normalize_transform()(image=resized)["image"]
    assert torch.allclose(e1, ref, atol=1e-6)


def test_sample_view_is_seeded_and_inside_the_image():
    shape = (37, 91, 3)
    views = [sample_view(shape, np.random.default_rng(s)) for s in range(200)]
    assert views[:5] == [sample_view(shape, s) for s in range(5)]  # an int seed = a fresh rng
    for v in views:
        assert 0 <= v.x0 < v.x1 <= 91 and 0 <= v.y0 < v.y1 <= 37
    assert len(set(views)) > 150 and 0 < sum(v.flip for v in views) < 200
    # impossible ratio for a 1x100 strip: the fallback centre crop, still valid
    v = sample_view((1, 100), 0, scale=(0.9, 1.0))
    assert 0 <= v.x0 < v.x1 <= 100 and (v.y0, v.y1) == (0, 1)


def test_apply_view_replays_the_same_pixels():
    img = RNG.integers(0, 255, (45, 60, 3), dtype=np.uint8)
    pixels, view = random_view(img, np.random.default_rng(7), 24)
    assert pixels.shape == (24, 24, 3) and pixels.dtype == np.uint8
    stored = np.asarray(view, dtype=np.int32)  # what a cache would keep
    again = apply_view(img, View.from_array(stored), 24)
    np.testing.assert_array_equal(pixels, again)
    # the box is in source pixels: a bigger input size sees the same region
    big = apply_view(img, view, 48)
    assert big.shape == (48, 48, 3)
    crop = img[view.y0 : view.y1, view.x0 : view.x1]
    expect = cv2.resize(crop, (24, 24), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(pixels, expect[:, ::-1] if view.flip else expect)
    flipped = apply_view(img, View(0, 0, 60, 45, True), 24)
    np.testing.assert_array_equal(flipped, apply_view(img, View(0, 0, 60, 45, False), 24)[:, ::-1])
    with pytest.raises(ImatError):
        apply_view(img, View(0, 0, 61, 45, False), 24)


# --- dataset and loader ----------------------------------------------------------------------------


def _folder(tmp_path: Path, n: int = 10) -> pd.DataFrame:
    rows = []
    for i in range(n):
        _write_jpeg(tmp_path / f"{i}.png", h=30 + i, w=40, seed=i)
        rows.append({"path": f"{i}.png", "label": i % 3})
    (tmp_path / "corrupt.jpg").write_bytes(np.random.default_rng(5).bytes(2048))
    rows.insert(3, {"path": "corrupt.jpg", "label": 1})
    rows.insert(7, {"path": str(tmp_path / "missing.jpg"), "label": 2})  # absolute path
    return pd.DataFrame(rows)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("decoder", ["cv2", "pil"])
def test_loader_skips_corrupt_and_missing(tmp_path, caplog, num_workers, decoder):
    df = _folder(tmp_path)
    # a real JPEG cut off mid-stream (an interrupted download), beside the random bytes and the missing file
    photo = RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", photo)
    assert ok
    (tmp_path / "truncated.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    df = pd.concat([df, pd.DataFrame([{"path": "truncated.jpg", "label": 0}])], ignore_index=True)
    ds = ImageDataset(df, tmp_path, build_train_transform("medium", 16), decoder)
    assert len(ds) == 13
    loader = build_loader(ds, batch_size=4, shuffle=True, num_workers=num_workers, seed=3)
    with caplog.at_level(logging.WARNING):
        for _epoch in range(2):
            seen, seen_labels, skipped = [], [], 0
            for batch in loader:
                assert batch["image"].shape[1:] == (3, 16, 16) and batch["image"].dtype == torch.float32
                assert batch["label"].dtype == torch.long and len(batch["label"]) == len(batch["index"])
                seen += batch["index"].tolist()
                seen_labels += batch["label"].tolist()
                skipped += batch["skipped"]
            assert skipped == 3 and loader.epoch_skipped == 3
            assert sorted(seen) == [i for i in range(13) if i not in (3, 7, 12)]
            assert seen_labels == df["label"].to_numpy()[seen].tolist()
    if num_workers == 0:
        assert ds.skipped == 6 and len(ds.bad_files) == 3
        # warned once per file even though each file failed twice
        warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
        assert len(warnings) == 3


class _EpochTagged(torch.utils.data.Dataset):
    """Items say which epoch the dataset (in whichever process builds them) was told."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.zeros(1), "label": self.epoch, "index": index}


def test_workers_see_the_epoch_of_an_epoch_aware_dataset():
    ds = _EpochTagged()
    loader = build_loader(ds, batch_size=2, shuffle=False, num_workers=1)
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert {int(v) for b in loader for v in b["label"]} == {epoch}


def test_flips_off_keeps_left_and_right():
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[:, 16:] = 255  # dark left half, bright right half: a mirror image swaps them
    mirrored = {}
    for flips in (True, False):
        tf = build_train_transform(AugConfig(preset="light", flips=flips), 16)
        tf.set_random_seed(0)
        outs = [tf(image=img)["image"] for _ in range(40)]
        mirrored[flips] = sum(bool(o[:, :, 0].mean() > o[:, :, -1].mean()) for o in outs)
    assert mirrored[True] > 0 and mirrored[False] == 0


def test_items_carry_label_and_index(tmp_path):
    df = _folder(tmp_path, n=4)
    ds = ImageDataset(df, tmp_path, build_eval_transform(16))
    item = ds[1]
    assert item["label"] == 1 and item["index"] == 1 and item["image"].shape == (3, 16, 16)
    assert ds[3] is None
    raw = ImageDataset(df.drop(columns=["label"]), tmp_path)[0]
    assert raw["label"] == -1 and raw["image"].dtype == torch.uint8 and raw["image"].shape[0] == 3


def test_all_unreadable_batches_are_not_yielded_and_counts_carry(tmp_path):
    _write_jpeg(tmp_path / "ok.png")
    paths = ["x1.jpg", "x2.jpg", "ok.png", "x3.jpg", "x4.jpg"]
    ds = ImageDataset(pd.DataFrame({"path": paths, "label": 0}), tmp_path, build_eval_transform(8))
    batches = list(build_loader(ds, batch_size=2, shuffle=False, num_workers=0))
    # [x1,x2] empty -> carried; [ok,x3] -> 1 image, 2+1 skipped; [x4] empty at the end -> warned only
    assert len(batches) == 1 and batches[0]["skipped"] == 3 and batches[0]["index"].tolist() == [2]

    def tagged(items):
        out = collate_skip(items)
        out["tag"] = len(out["label"])
        return out

    custom = list(build_loader(ds, batch_size=5, shuffle=False, num_workers=0, collate_fn=tagged))
    assert custom[0]["tag"] == 1 and custom[0]["skipped"] == 4
    empty = collate_skip([None, None])
    assert empty["skipped"] == 2 and empty["label"].numel() == 0


def test_loader_is_seeded(tmp_path):
    df = _folder(tmp_path, n=6)

    def run(seed: int) -> list[torch.Tensor]:
        ds = ImageDataset(df, tmp_path, build_train_transform("heavy", 16))
        return [b["image"] for b in build_loader(ds, batch_size=3, shuffle=True, num_workers=0, seed=seed)]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=False) if x.shape == y.shape)


def test_workers_do_not_replay_the_same_augmentation(tmp_path):
    # every row is the same image: with unseeded per-worker RNGs, worker 0 and 1 would emit equal tensors.
    # Running parallel OpenCV ops in the parent first guards the fork deadlock (cv2.setNumThreads in a
    # worker hung once the parent's cv2 thread pool existed).
    build_train_transform("heavy", 224)(image=RNG.integers(0, 255, (600, 800, 3), dtype=np.uint8))
    _write_jpeg(tmp_path / "same.png", h=64, w=64)
    ds = ImageDataset(pd.DataFrame({"path": ["same.png"] * 4, "label": 0}), tmp_path)
    ds.transform = build_train_transform("heavy", 16)
    images = [b["image"][0] for b in build_loader(ds, batch_size=1, shuffle=False, num_workers=2, seed=0)]
    assert len(images) == 4
    assert not torch.equal(images[0], images[1])  # first item of worker 0 vs worker 1


def test_balanced_sampler_balances():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1 + [-1] * 5)
    sampler = balanced_sampler(labels, num_samples=6000, seed=0)
    drawn = labels[np.fromiter(iter(sampler), dtype=np.int64)]
    counts = np.bincount(drawn[drawn >= 0], minlength=3)
    assert (drawn >= 0).all() and counts.sum() == 6000
    assert np.all(np.abs(counts / 6000 - 1 / 3) < 0.04)
    assert list(balanced_sampler(labels, 50, seed=4)) == list(balanced_sampler(labels, 50, seed=4))
    assert len(balanced_sampler(labels)) == len(labels)


# --- mixup -----------------------------------------------------------------------------------------


def test_build_mixup_none_when_disabled():
    assert build_mixup(AugConfig(), 10) is None


@pytest.mark.parametrize("batch", [8, 7, 1])
def test_mixup_gives_soft_targets(batch):
    mix = build_mixup(AugConfig(mixup=0.4, cutmix=1.0, mix_prob=1.0, label_smoothing=0.1), 5)
    assert mix is not None
    x = torch.randn(batch, 3, 16, 16)
    y = torch.arange(batch) % 5
    xm, t = mix(x.clone(), y)
    assert xm.shape == x.shape and t.shape == (batch, 5)
    assert torch.allclose(t.sum(1), torch.ones(batch), atol=1e-5)
    assert (t > 0).all()  # smoothing: no hard zeros
    if batch > 1:
        assert (t.max(1).values < 0.95).any()  # some mass moved to a partner's class
    else:
        assert torch.equal(xm, x) and t[0].argmax() == y[0]


# --- label noise ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["symmetric", "pair"])
@pytest.mark.parametrize("fraction", [0.0, 0.137, 0.5, 1.0])
def test_label_noise_exact_and_seeded(kind, fraction):
    labels = np.arange(1000) % 7
    noisy, mask = apply_label_noise(labels, 7, fraction, kind, seed=11)
    assert mask.sum() == round(fraction * 1000)
    assert np.array_equal(noisy != labels, mask)  # every flip really changes the label
    assert np.array_equal(labels, np.arange(1000) % 7)  # input untouched
    if kind == "pair":
        assert np.array_equal(noisy[mask], (labels[mask] + 1) % 7)
    again, mask2 = apply_label_noise(labels, 7, fraction, kind, seed=11)
    assert np.array_equal(again, noisy) and np.array_equal(mask, mask2)
    if 0 < fraction < 1:
        other, _ = apply_label_noise(labels, 7, fraction, kind, seed=12)
        assert not np.array_equal(other, noisy)


def test_symmetric_noise_is_roughly_uniform_over_other_classes():
    labels = np.zeros(6000, dtype=np.int64)
    noisy, mask = apply_label_noise(labels, 4, 0.6, "symmetric", seed=0)
    counts = np.bincount(noisy[mask], minlength=4)
    assert counts[0] == 0 and np.all(np.abs(counts[1:] / mask.sum() - 1 / 3) < 0.03)


def test_label_noise_rejects_bad_input():
    with pytest.raises(ImatError):
        apply_label_noise(np.zeros(5, int), 3, 0.1, "asymmetric")
    with pytest.raises(ImatError):
        apply_label_noise(np.zeros(5, int), 3, 1.5)
    with pytest.raises(ImatError):
        apply_label_noise(np.array([0, 5]), 3, 0.5)


def test_crop_preset_shifts_the_full_scale_image_by_at_most_an_eighth():
    # A 32 px ramp: the crop preset must keep the scale (pixel steps of 1) and only translate by <= 4 px.
    ramp = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3))
    t = build_train_transform(AugConfig(preset="crop", flips=False), 32, mean=(0, 0, 0), std=(1, 1, 1))
    shifts = set()
    for _ in range(40):
        row = (t(image=ramp)["image"][0, 16] * 255).round().numpy()
        centre = row[8:24]
        assert np.allclose(np.diff(centre), 8, atol=1)  # full scale: no resize of the object
        shifts.add(int(centre[0] // 8) - 8)
    assert shifts <= set(range(-4, 5)) and len(shifts) > 3
