"""data.decode: gpu on the CPU: JPEG batches decoded, oriented, cropped and normalised by the device code
give what the CPU pipeline gives (shapes, normalisation, geometry), and bad files are skipped and counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from bomb_kit import write_bomb_png
from PIL import Image

from imat.config.train import TrainConfig
from imat.data import ImageDataset, build_eval_transform, build_loader, recipe_loaders
from imat.data.device_decode import DeviceDecode, EncodedCollate, EncodedDataset
from imat.engine.runtime import batch_to_device
from imat.errors import ImatError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _smooth(path: Path, width: int, height: int, exif_orientation: int | None = None) -> Path:
    """A smooth colour gradient (interpolation methods agree on it) saved as JPEG q95 or PNG."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height) + 64], -1)
    im = Image.fromarray(img.astype(np.uint8))
    if path.suffix == ".png":
        im.save(path)
    elif exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(path, quality=95, exif=exif)
    else:
        im.save(path, quality=95)
    return path


def _frame(paths: list[Path]) -> pd.DataFrame:
    return pd.DataFrame({"path": [str(p) for p in paths], "label": list(range(len(paths)))})


def _device_batches(
    df: pd.DataFrame, spec: DeviceDecode, batch_size: int = 8, workers: int = 0
) -> list[dict]:
    loader = build_loader(
        EncodedDataset(df, None, spec), batch_size, False, workers, collate_fn=EncodedCollate(spec)
    )
    loader.device_normalize = (MEAN, STD)
    out = [batch_to_device(b, torch.device("cpu"), False, loader.device_normalize) for b in loader]
    return out


def test_eval_crop_matches_the_cpu_pipeline(tmp_path: Path) -> None:
    paths = [
        _smooth(tmp_path / "wide.jpg", 120, 80),
        _smooth(tmp_path / "tall.jpg", 70, 110),
        _smooth(tmp_path / "rotated.jpg", 120, 80, exif_orientation=6),  # shown 80 wide, 120 tall
        _smooth(tmp_path / "lossless.png", 90, 90),  # not a JPEG: decoded by the worker
    ]
    df = _frame(paths)
    batches = _device_batches(df, DeviceDecode(32, None, 0.875))
    assert len(batches) == 1
    got = batches[0]["image"]
    cpu = ImageDataset(df, None, build_eval_transform(32, MEAN, STD, 0.875))
    want = torch.stack([cpu[i]["image"] for i in range(len(df))])
    assert got.shape == want.shape == (4, 3, 32, 32) and got.dtype == want.dtype == torch.float32
    assert batches[0]["label"].tolist() == [0, 1, 2, 3] and batches[0]["skipped"] == 0
    # same geometry and normalisation: differences are interpolation only (a few grey levels)
    err = (got - want).abs().mean(dim=(1, 2, 3)) * 255 * 0.225
    assert err.max() < 3, err


def test_train_light_crops_are_seeded_and_normalised(tmp_path: Path) -> None:
    flat = tmp_path / "flat.jpg"
    Image.new("RGB", (100, 60), (200, 100, 50)).save(flat, quality=100)
    df = _frame([flat] * 6)
    spec = DeviceDecode(24, "light", 0.875)
    a, b = _device_batches(df, spec, 3), _device_batches(df, spec, 3)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x["image"], y["image"])  # seeded: the same crops again
        assert x["image"].shape == (3, 3, 24, 24)
    want = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    got = torch.cat([x["image"] for x in a]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(got, want, atol=0.03, rtol=0)


def test_bad_files_are_skipped_and_counted(tmp_path: Path) -> None:
    good = _smooth(tmp_path / "good.jpg", 64, 48)
    broken = tmp_path / "broken.jpg"  # an interrupted download: a valid header, no end-of-image marker
    data = good.read_bytes()
    broken.write_bytes(data[:400] + b"\x00" * 50)
    padded = tmp_path / "padded.jpg"  # complete, with trailing padding: kept
    padded.write_bytes(data + b"\x00" * 10)
    bomb = write_bomb_png(tmp_path / "bomb.png")
    missing = tmp_path / "missing.jpg"
    df = _frame([good, broken, bomb, missing, padded])
    spec = DeviceDecode(16, None)
    batches = _device_batches(df, spec, batch_size=5)
    kept = [int(i) for b in batches for i in b["index"]]
    skipped = sum(int(b["skipped"]) for b in batches)
    assert sorted(kept) == [0, 4] and skipped == 3
    # the truncated file is found by the worker (so the loader can replace it), not on the device
    dataset = EncodedDataset(df, None, spec)
    assert dataset[1] is None and dataset[4] is not None and dataset.skipped == 1
    assert all(b["image"].shape[0] == b["label"].numel() for b in batches)


def test_recipe_loaders_decode_gpu(tmp_path: Path) -> None:
    paths = [_smooth(tmp_path / f"{i}.jpg", 64 + i, 48) for i in range(6)]
    df = _frame(paths)
    df["label"] = [0, 1] * 3
    data_cfg = {"input_size": 16, "mean": MEAN, "std": STD, "crop_pct": 0.875}
    recipe = TrainConfig.model_validate({"batch_size": 3, "device": "cpu", "aug": {"preset": "light"}})
    train, val = recipe_loaders(
        recipe, data_cfg, df, df, images=None, decoder="cv2", num_workers=1, decode="gpu"
    )
    assert train.device_normalize == val.device_normalize == (MEAN, STD)
    for loader in (train, val):
        batches = [batch_to_device(b, torch.device("cpu"), True, loader.device_normalize) for b in loader]
        assert sum(b["label"].numel() for b in batches) == 6
        assert all(b["image"].shape == (3, 3, 16, 16) and b["image"].dtype == torch.float32 for b in batches)
    heavy = TrainConfig.model_validate({"device": "cpu", "aug": {"preset": "heavy"}})
    with pytest.raises(ImatError, match="aug.preset"):
        recipe_loaders(heavy, data_cfg, df, df, images=None, decoder="cv2", num_workers=0, decode="gpu")


def test_big_batches_decode_in_chunks_with_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imat.data.device_decode as dd

    df = _frame([_smooth(tmp_path / f"{i}.jpg", 64 + 8 * i, 48) for i in range(5)])
    spec = DeviceDecode(16, None)
    whole = _device_batches(df, spec, batch_size=5)[0]["image"]
    calls: list[int] = []
    real = dd._decode_all

    def counting(data, device):  # noqa: ANN001, ANN202
        calls.append(len(data))
        return real(data, device)

    monkeypatch.setattr(dd, "_decode_all", counting)
    monkeypatch.setattr(dd, "CHUNK_PIXELS", 2 * 80 * 48)  # two or fewer of these images at once
    chunked = _device_batches(df, spec, batch_size=5)[0]["image"]
    assert sum(calls) == 5 and max(calls) <= 2 and len(calls) >= 3
    torch.testing.assert_close(chunked, whole)


def _ddp_rank(rank: int, world: int, port: int, root: str) -> None:
    import os

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        IMAT_DIST_BACKEND="gloo",
    )
    torch.set_num_threads(1)
    from torch import nn

    from imat.engine import ClassificationTask, Engine
    from imat.engine import distributed as d

    df = pd.read_csv(Path(root) / "rows.csv")
    data_cfg = {"input_size": 16, "mean": MEAN, "std": STD, "crop_pct": 0.875}
    recipe = TrainConfig.model_validate(
        {"epochs": 1, "batch_size": 2, "lr": 0.05, "device": "cpu", "aug": {"preset": "light"}}
    )
    train, val = recipe_loaders(
        recipe, data_cfg, df, df, images=None, decoder="cv2", num_workers=0, decode="gpu"
    )
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    engine = Engine(
        ClassificationTask(model), recipe, Path(root) / "run", train, val, progress=False, tensorboard=False
    )
    summary = engine.fit()
    weights = {k: v.clone() for k, v in engine.task.model.state_dict().items()}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, (weights, summary["train_images"].tolist()))
    assert all(torch.equal(gathered[0][0][k], g[0][k]) for g in gathered for k in weights)  # ranks agree
    assert all(g[1] == [8] for g in gathered)  # every image once over the two ranks
    assert summary["skipped"].tolist() == [0] and summary["val_top1"].notna().all()
    d.cleanup()


def test_decode_gpu_under_two_gloo_ranks(tmp_path: Path) -> None:
    """Sharded by the engine, the encoded batches still decode on each rank's device; ranks agree."""
    import socket

    import torch.multiprocessing as mp

    paths = [_smooth(tmp_path / f"{i}.jpg", 60 + 4 * i, 48) for i in range(8)]
    pd.DataFrame({"path": [str(p) for p in paths], "label": [i % 2 for i in range(8)]}).to_csv(
        tmp_path / "rows.csv", index=False
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)


@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_a_replaced_batch_whose_images_vanished(tmp_path: Path, decode: str) -> None:
    """A batch with no readable image is replaced by re-reading the last readable one; when those files
    are gone too, an encoded batch (data.decode: gpu) is repeated with its JPEG bytes (the model gets
    images), and a decoded one, whose pixels the loader does not keep, is a clear error."""
    paths = [_smooth(tmp_path / f"ok{i}.jpg", 40, 40) for i in range(2)] + [tmp_path / "gone.jpg"] * 2
    df = _frame(paths)
    if decode == "gpu":
        spec = DeviceDecode(16, None)
        loader = build_loader(EncodedDataset(df, None, spec), 2, False, 0, collate_fn=EncodedCollate(spec))
    else:
        loader = build_loader(ImageDataset(df, None, build_eval_transform(16)), 2, False, 0)
    loader.replace_unreadable = True
    it = iter(loader)
    first = next(it)
    for p in paths[:2]:
        p.unlink()
    if decode == "cpu":
        with pytest.raises(ImatError, match=r"images \[0, 1\].*became unreadable"):
            next(it)
        return
    again = next(it)
    assert again["index"].tolist() == [0, 1] and again["skipped"] == 2
    assert [bytes(j.numpy()) for j in again["jpeg"]] == [bytes(j.numpy()) for j in first["jpeg"]]
    images = batch_to_device(again, torch.device("cpu"), False, (MEAN, STD))["image"]
    assert images.shape == (2, 3, 16, 16)
