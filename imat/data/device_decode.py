"""``data.decode: gpu``: JPEG batches decoded on the training device, cropped, flipped and resized there.

For nodes whose CPUs cannot keep eight GPUs fed: loader workers only read the file, check its header
(size limit, EXIF orientation) and draw a seed; the device decodes the whole batch at once
(``torchvision.io.decode_jpeg``, nvJPEG on CUDA), applies the orientation, takes the crop and resizes it
to the input size. The engine then normalises the uint8 batch as for any device-normalised loader.
Geometry only: the ``light`` preset (random-resized crop + flip) for training and the evaluation
resize + centre crop, with the same crop distribution as the CPU pipeline (:func:`sample_view`).
A file that is not a JPEG is decoded and cropped by the worker on the CPU; a JPEG the device decoder
rejects is retried on the CPU and, failing that, skipped and counted like any unreadable image.
The same code runs with ``device="cpu"``, which is how the tests check it."""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from imat.data.dataset import resolve_paths
from imat.data.decode import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageTooLargeError,
    check_pixels,
    decode_image,
    read_header,
)
from imat.data.transforms import CROP_SCALE, DEFAULT_CROP_PCT, RATIO, View, apply_view, sample_view
from imat.errors import ImatError

log = logging.getLogger(__name__)

DEVICE_PRESETS: tuple[str, ...] = ("none", "light")
# the batch keys the device consumes; the engine keeps them on the CPU (decode_jpeg reads CPU bytes)
ENCODED_KEYS: tuple[str, ...] = ("decode", "jpeg", "orientation", "area", "seed", "pixel_rows", "pixels")
# Full-size decodes held on the device at once: a batch of 256 phone photos would be ~9 GB of uint8,
# so batches are decoded in chunks of at most this many pixels (~0.8 GB) and cropped before the next.
CHUNK_PIXELS = 1 << 28
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class DeviceDecode:
    """What the device does to a batch: crop (``preset``: ``light``, or None/``none`` for the eval
    resize + centre crop) at ``input_size``. Carried in each batch (``batch["decode"]``)."""

    input_size: int
    preset: str | None = None
    crop_pct: float = DEFAULT_CROP_PCT
    flips: bool = True

    def __post_init__(self) -> None:
        if self.preset not in (None, *DEVICE_PRESETS):
            raise ImatError(
                f"data.decode: gpu crops and flips only: aug.preset must be one of "
                f"{', '.join(DEVICE_PRESETS)}, got {self.preset!r}"
            )

    def view(self, height: int, width: int, seed: int) -> View:
        """The crop of an image of ``height`` x ``width`` (after EXIF orientation) for this seed."""
        if self.preset == "light":
            return sample_view((height, width), seed, CROP_SCALE["light"], RATIO, 0.5 if self.flips else 0.0)
        # evaluation: shorter side -> floor(size / crop_pct), centred size x size crop, in source pixels
        short = min(height, width)
        side = max(
            1, min(short, round(self.input_size * short / math.floor(self.input_size / self.crop_pct)))
        )
        y0, x0 = (height - side) // 2, (width - side) // 2
        return View(x0, y0, x0 + side, y0 + side, False)


def _orientation(data: bytes) -> int:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # no or broken EXIF: as stored
        return 1


def _complete_jpeg(data: bytes) -> bool:
    """Whether the file ends with a JPEG end-of-image marker (trailing padding allowed). An interrupted
    download does not; found here, it is skipped in the worker like any unreadable image (and replaced
    by the loader), rather than emptying a batch on the device."""
    return data[-4096:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to a C x H x W tensor, as PIL's ``exif_transpose`` does."""
    if orientation == 2:
        return image.flip(2)
    if orientation == 3:
        return image.flip(1, 2)
    if orientation == 4:
        return image.flip(1)
    if orientation == 5:
        return image.transpose(1, 2)
    if orientation == 6:
        return image.transpose(1, 2).flip(2)
    if orientation == 7:
        return image.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return image.transpose(1, 2).flip(1)
    return image


class _Seeds:
    """The crop seeds' stream, with the ``set_random_seed`` hook the loader calls on a dataset's transform."""

    def __init__(self, seed: int) -> None:
        self.set_random_seed(seed)

    def set_random_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)


class EncodedDataset(Dataset):
    """Items ``{"jpeg": uint8 bytes, "orientation", "seed", "label", "index"}`` for the device to decode;
    a non-JPEG file comes back as ``"pixels"`` (its crop at input size, decoded here); None when the
    file is unreadable or over ``max_pixels`` (the same marker as :class:`ImageDataset`)."""

    def __init__(
        self,
        df: pd.DataFrame,
        images_root: str | os.PathLike[str] | None,
        spec: DeviceDecode,
        decoder: str = "cv2",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        seed: int = 0,
    ) -> None:
        self.paths = resolve_paths(df, images_root)
        if "label" in df.columns:
            self.labels = df["label"].fillna(-1).astype("int64").to_numpy()
        else:
            self.labels = np.full(len(df), -1, dtype=np.int64)
        self.spec = spec
        self.decoder = decoder
        self.max_pixels = max_pixels
        self.skipped = 0
        self.bad_files: set[str] = set()
        # the loader seeds it (per worker, or once without workers) as it seeds albumentations pipelines
        self.transform = _Seeds(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def _skip(self, path: str, exc: Exception) -> None:
        self.skipped += 1
        if path not in self.bad_files:
            self.bad_files.add(path)
            kind = "too large" if isinstance(exc, ImageTooLargeError) else "unreadable"
            log.warning("skipping %s image: %s", kind, exc)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path = self.paths[index]
        item: dict[str, Any] = {"label": int(self.labels[index]), "index": int(index)}
        item["seed"] = int(self.transform.rng.integers(0, 2**31 - 1)) if self.spec.preset == "light" else 0
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            header = read_header(data) if data else None
            check_pixels(header, self.max_pixels)
        except ImageTooLargeError as exc:
            self._skip(path, ImageTooLargeError(f"image too large: {path} ({exc})"))
            return None
        except OSError as exc:
            self._skip(path, ImageDecodeError(f"image not found or unreadable: {path} ({exc})"))
            return None
        if header is not None and header[0] == "JPEG":
            if not _complete_jpeg(data):
                self._skip(path, ImageDecodeError(f"truncated JPEG (no end-of-image marker): {path}"))
                return None
            item["jpeg"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            item["orientation"] = _orientation(data)
            item["area"] = header[1] * header[2]
            return item
        try:  # not a JPEG (or an unknown header): the CPU decoders, then the same crop
            pixels = decode_image(path, self.decoder, self.max_pixels)
        except ImageDecodeError as exc:
            self._skip(path, exc)
            return None
        view = self.spec.view(pixels.shape[0], pixels.shape[1], item["seed"])
        item["pixels"] = torch.from_numpy(apply_view(pixels, view, self.spec.input_size))
        return item


def collate_encoded(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Batch of encoded items: ``jpeg`` a list of byte tensors (empty where the worker decoded the image),
    ``pixels`` the worker-decoded crops (N_pixels x S x S x 3) with their batch rows in ``pixel_rows``."""
    kept = [it for it in items if it is not None]
    empty = torch.zeros(0, dtype=torch.long)
    out: dict[str, Any] = {"skipped": len(items) - len(kept)}
    if not kept:
        return {**out, "image": torch.zeros(0), "label": empty, "index": empty.clone()}
    none = torch.zeros(0, dtype=torch.uint8)
    pixel_rows = [i for i, it in enumerate(kept) if "pixels" in it]
    out.update(
        jpeg=[it.get("jpeg", none) for it in kept],
        orientation=[int(it.get("orientation", 1)) for it in kept],
        area=[int(it.get("area", 0)) for it in kept],
        seed=[int(it["seed"]) for it in kept],
        pixel_rows=pixel_rows,
        pixels=torch.stack([kept[i]["pixels"] for i in pixel_rows]) if pixel_rows else None,
        label=torch.as_tensor([it["label"] for it in kept], dtype=torch.long),
        index=torch.as_tensor([it["index"] for it in kept], dtype=torch.long),
    )
    return out


class EncodedCollate:
    """:func:`collate_encoded` plus the batch's :class:`DeviceDecode` (picklable for worker processes)."""

    def __init__(self, spec: DeviceDecode) -> None:
        self.spec = spec

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        batch = collate_encoded(items)
        if "jpeg" in batch:
            batch["decode"] = self.spec
        return batch


def _decode_all(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG bytes to 3 x H x W uint8 on ``device``; one call for the batch, then one by one (on
    the device, then the CPU) when the batch call fails, so one bad file costs only itself."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec's; they still are nvJPEG's batch API
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for d in data:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB).to(device))
                except RuntimeError:
                    out.append(None)
        return out


def _chunks(rows: list[int], area: list[int]) -> list[list[int]]:
    """``rows`` in consecutive groups of at most CHUNK_PIXELS declared pixels (at least one row each)."""
    out: list[list[int]] = []
    total = CHUNK_PIXELS + 1
    for row in rows:
        if total + area[row] > CHUNK_PIXELS:
            out.append([])
            total = 0
        out[-1].append(row)
        total += area[row]
    return out


def decode_on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Turn an encoded batch (label/index already on ``device``) into ``image``: uint8 N x 3 x S x S on
    ``device``. Rows whose JPEG no decoder reads are dropped from label/index and counted in ``skipped``."""
    spec: DeviceDecode = batch.pop("decode")
    data: list[torch.Tensor] = batch.pop("jpeg")
    orientation, area, seeds = batch.pop("orientation"), batch.pop("area"), batch.pop("seed")
    pixel_rows: list[int] = batch.pop("pixel_rows")
    pixels = batch.pop("pixels")
    size = spec.input_size
    from_cpu = set(pixel_rows)
    crops: list[torch.Tensor | None] = [None] * len(data)
    for chunk in _chunks([i for i in range(len(data)) if i not in from_cpu], area):
        decoded = _decode_all([data[i] for i in chunk], device)
        for row, image in zip(chunk, decoded, strict=True):
            if image is None:
                continue
            image = orient(image, orientation[row])
            v = spec.view(int(image.shape[1]), int(image.shape[2]), seeds[row])
            crop = image[:, v.y0 : v.y1, v.x0 : v.x1].unsqueeze(0).float()
            crop = F.interpolate(
                crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
            crop = crop.round_().clamp_(0, 255).to(torch.uint8)[0]
            crops[row] = crop.flip(2) if v.flip else crop
        del decoded
    if pixel_rows:
        on_device = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2)
        for k, row in enumerate(pixel_rows):
            crops[row] = on_device[k]
    keep = [i for i, c in enumerate(crops) if c is not None]
    if len(keep) < len(crops):
        log.warning("%d image(s) of a batch could not be decoded; skipped", len(crops) - len(keep))
        rows = torch.as_tensor(keep, dtype=torch.long, device=batch["label"].device)
        batch["label"], batch["index"] = batch["label"][rows], batch["index"][rows]
        batch["skipped"] = int(batch.get("skipped", 0)) + len(crops) - len(keep)
    batch["image"] = (
        torch.stack([crops[i] for i in keep]) if keep else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    )
    return batch
