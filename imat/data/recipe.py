"""Train and validation loaders for one engine run, built from its recipe (teachers and students alike)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from imat.config.train import TrainConfig
from imat.data.dataset import ImageDataset
from imat.data.decode import DEFAULT_MAX_PIXELS
from imat.data.device_decode import DeviceDecode, EncodedCollate, EncodedDataset
from imat.data.loader import balanced_sampler, build_loader, weighted_sampler
from imat.data.transforms import build_eval_transform, build_train_transform, decode_side
from imat.errors import ImatError


def recipe_loaders(
    recipe: TrainConfig,
    data_cfg: dict[str, Any],
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    *,
    images: str | None,
    decoder: str,
    num_workers: int,
    device_normalize: bool | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: bool = True,
    decode: str = "cpu",
) -> tuple[Any, Any]:
    """``(train_loader, val_loader)``: the recipe's augmentation, batch size and sampler on the train rows,
    the eval transform (resize + centre crop) on the val rows; ``val_loader`` is None without val rows.

    ``data_cfg`` holds the model's ``input_size``, ``mean``, ``std`` and ``crop_pct``. With
    ``device_normalize`` (default: when the recipe trains on CUDA) the loaders yield uint8 images from
    pinned memory and carry ``device_normalize = (mean, std)``, which the engine applies on the GPU after
    a non-blocking copy: a quarter of the bytes of float32 batches cross the bus.

    ``max_pixels``: larger images are skipped and counted, never decoded. ``draft``: JPEGs are decoded at
    the DCT scale that keeps the detail the transform uses (:func:`imat.data.transforms.decode_side`).
    ``decode="gpu"``: workers pass JPEG bytes and the device decodes, crops and flips them
    (:mod:`imat.data.device_decode`; the ``light`` and ``none`` presets), then normalises."""
    size, mean, std, crop = (data_cfg[k] for k in ("input_size", "mean", "std", "crop_pct"))
    if decode not in ("cpu", "gpu"):
        raise ImatError(f"data.decode must be cpu or gpu, got {decode!r}")
    if device_normalize is None:
        from imat.engine.runtime import resolve_device

        device_normalize = decode == "gpu" or resolve_device(recipe.device).type == "cuda"
    norm = not device_normalize
    stats = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
    train_collate = val_collate = None
    if decode == "gpu":
        if not device_normalize:
            raise ImatError("data.decode: gpu normalises on the device: device_normalize cannot be off")
        train_spec = DeviceDecode(size, recipe.aug.preset, crop, recipe.aug.flips)
        val_spec = DeviceDecode(size, None, crop)
        train_ds: Any = EncodedDataset(train_df, images, train_spec, decoder, max_pixels, recipe.seed)
        train_collate, val_collate = EncodedCollate(train_spec), EncodedCollate(val_spec)
    else:
        train_ds = ImageDataset(
            train_df,
            images,
            build_train_transform(recipe.aug, size, mean, std, crop, normalize=norm),
            decoder,
            max_pixels,
            decode_side(recipe.aug.preset, size, crop) if draft else None,
        )
    sampler = None
    # data.clean's downweighting: a `weight` column, honoured by sampling rather than by each task's loss
    weights = train_df["weight"].to_numpy(dtype="float64") if "weight" in train_df.columns else None
    if recipe.aug.balanced_sampler:
        sampler = balanced_sampler(train_df["label"].to_numpy(), len(train_df), recipe.seed, weights)
    elif weights is not None and (weights != 1.0).any():
        sampler = weighted_sampler(weights, len(train_df), seed=recipe.seed)
    train_loader = build_loader(
        train_ds,
        recipe.batch_size,
        shuffle=True,
        num_workers=num_workers,
        # Mixup pairs samples, and a last batch of one breaks BatchNorm: drop the ragged end when possible.
        drop_last=len(train_df) > recipe.batch_size,
        sampler=sampler,
        seed=recipe.seed,
        collate_fn=train_collate,
    )
    val_loader = None
    if not val_df.empty:
        val_ds: Any = (
            EncodedDataset(val_df, images, val_collate.spec, decoder, max_pixels, recipe.seed)
            if val_collate is not None
            else ImageDataset(
                val_df,
                images,
                build_eval_transform(size, mean, std, crop, norm),
                decoder,
                max_pixels,
                decode_side(None, size, crop) if draft else None,
            )
        )
        val_loader = build_loader(
            val_ds,
            recipe.eval_batch_size or recipe.batch_size,
            shuffle=False,
            num_workers=num_workers,
            seed=recipe.seed,
            collate_fn=val_collate,
        )
    if device_normalize:
        train_loader.device_normalize = stats
        if val_loader is not None:
            val_loader.device_normalize = stats
    return train_loader, val_loader
