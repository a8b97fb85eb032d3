"""Albumentations presets (train: none/crop/light/medium/heavy; eval: resize + centre crop) and the
replayable random crop used by the distillation's teacher-output cache.

Every pipeline takes an RGB uint8 HxWx3 array and ends with Normalize + ToTensorV2, so its output is a
normalised float32 CHW tensor of ``input_size`` x ``input_size``. Presets grow in strength: ``crop`` is the
small-image recipe (reflect-pad by 1/8 of the side, random crop back, flip: the CIFAR standard); ``light`` is
what MEAL V2 trains with (random resized crop + flip); ``heavy`` is the teacher recipe for noisy,
fine-grained web data (geometry, colour, blur/noise and cut-out)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from imat.config.train import AugConfig
from imat.errors import ImatError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
PRESETS: tuple[str, ...] = ("none", "crop", "light", "medium", "heavy")
DEFAULT_CROP_PCT = 0.875
RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Random-resized-crop area ranges per preset: the ImageNet (0.08, 1) only for `heavy`, since small or
# centred objects (digits, products on a white background) lose their label under very small crops.
CROP_SCALE: dict[str, tuple[float, float]] = {
    "light": (0.35, 1.0),
    "medium": (0.2, 1.0),
    "heavy": (0.08, 1.0),
}


def _check_size(input_size: int) -> int:
    if isinstance(input_size, bool) or not isinstance(input_size, (int, np.integer)) or input_size < 1:
        raise ImatError(f"input_size must be a positive integer, got {input_size!r}")
    return int(input_size)


def _norm_stats(
    mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    m = tuple(float(x) for x in (IMAGENET_MEAN if mean is None else mean))
    s = tuple(float(x) for x in (IMAGENET_STD if std is None else std))
    if len(m) != 3 or len(s) != 3 or min(s) <= 0:
        raise ImatError(f"mean/std must be three numbers with std > 0, got mean={m} std={s}")
    return m, s


def build_normalize_transform(
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> A.Compose:
    """Normalize + ToTensorV2 only: for images already cropped and resized (e.g. by :func:`apply_view`)."""
    m, s = _norm_stats(mean, std)
    return A.Compose([A.Normalize(mean=m, std=s), ToTensorV2()])


def decode_side(preset: str | None, input_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """The shorter side an image needs for ``preset`` (None: evaluation) to lose no detail at input_size.

    Evaluation and ``none`` resize the shorter side to input_size / crop_pct and ``crop`` to input_size;
    a random-resized crop of the smallest area fraction ``a`` spans about sqrt(a) of the shorter side, so
    an image with a shorter side of input_size / sqrt(a) still gives it input_size pixels across. A JPEG
    is decoded at the DCT scale that keeps this side (:func:`imat.data.decode.dct_scale`)."""
    size = _check_size(input_size)
    if preset is None or preset == "none":
        return int(math.floor(size / crop_pct))
    if preset == "crop":
        return size
    return int(math.ceil(size / math.sqrt(CROP_SCALE[preset][0])))


def _eval_geometry(input_size: int, crop_pct: float) -> list[Any]:
    if not 0 < crop_pct <= 1:
        raise ImatError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    # timm's convention: shorter side -> floor(size / crop_pct), then a centred size x size crop.
    scale_size = int(math.floor(input_size / crop_pct))
    return [
        A.SmallestMaxSize(max_size=scale_size, interpolation=cv2.INTER_LINEAR),
        A.CenterCrop(height=input_size, width=input_size, pad_if_needed=True),
    ]


def build_eval_transform(
    input_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float = DEFAULT_CROP_PCT,
    normalize: bool = True,
) -> A.Compose:
    """Deterministic evaluation pipeline: shorter side to input_size/crop_pct, centre crop, normalise
    (``normalize=False``: uint8 CHW tensors, normalised on the GPU)."""
    size = _check_size(input_size)
    m, s = _norm_stats(mean, std)
    norm = [A.Normalize(mean=m, std=s)] if normalize else []
    return A.Compose([*_eval_geometry(size, crop_pct), *norm, ToTensorV2()])


def _preset_ops(preset: str, size: int, crop_pct: float, flips: bool = True) -> list[Any]:
    if preset == "none":
        return _eval_geometry(size, crop_pct)
    if preset == "crop":
        # Keeps the whole object at full scale (random-resized crops lose most of a 32 px image): the
        # translation-only recipe every CIFAR reference uses, pad 4 at 32 px.
        pad = max(1, size // 8)
        return [
            *_eval_geometry(size, 1.0),  # shorter side to the input size, centred square
            A.PadIfNeeded(
                min_height=size + 2 * pad, min_width=size + 2 * pad, border_mode=cv2.BORDER_REFLECT_101
            ),
            A.RandomCrop(height=size, width=size),
            A.HorizontalFlip(p=0.5 if flips else 0.0),
        ]
    crop = A.RandomResizedCrop(size=(size, size), scale=CROP_SCALE[preset], ratio=RATIO)
    # Flips are off for classes a mirror image changes (digits, text, left/right parts).
    ops: list[Any] = [crop, A.HorizontalFlip(p=0.5 if flips else 0.0)]
    if preset == "light":
        return ops
    if preset == "medium":
        return [
            *ops,
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8),
            A.Affine(
                scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-15, 15), shear=(-5, 5), p=0.5
            ),
        ]
    # heavy
    return [
        *ops,
        A.VerticalFlip(p=0.1 if flips else 0.0),
        A.Affine(
            scale=(0.8, 1.2),
            translate_percent=(-0.1, 0.1),
            rotate=(-30, 30),
            shear=(-10, 10),
            border_mode=cv2.BORDER_REFLECT_101,
            p=0.7,
        ),
        A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.3),
        A.ToGray(p=0.05),
        A.OneOf(
            [
                A.GaussianBlur(blur_limit=(3, 5), p=1.0),
                A.MotionBlur(blur_limit=(3, 7), p=1.0),
                A.GaussNoise(std_range=(0.02, 0.1), p=1.0),
            ],
            p=0.3,
        ),
        A.CoarseDropout(
            num_holes_range=(1, 6), hole_height_range=(0.05, 0.2), hole_width_range=(0.05, 0.2), p=0.5
        ),
    ]


def build_train_transform(
    aug: AugConfig | str,
    input_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float = DEFAULT_CROP_PCT,
    normalize: bool = True,
) -> A.Compose:
    """Training pipeline for a preset name or an AugConfig (only its ``preset`` matters here; mixup and
    cutmix work on batches, see :func:`imat.data.build_mixup`). ``crop_pct`` is used by ``none``.
    ``normalize=False`` ends with uint8 CHW tensors, for normalisation on the GPU (imat.engine.runtime)."""
    preset = aug.preset if isinstance(aug, AugConfig) else aug
    flips = aug.flips if isinstance(aug, AugConfig) else True
    if preset not in PRESETS:
        raise ImatError(f"unknown augmentation preset {preset!r} (choose from {', '.join(PRESETS)})")
    size = _check_size(input_size)
    m, s = _norm_stats(mean, std)
    norm = [A.Normalize(mean=m, std=s)] if normalize else []
    return A.Compose([*_preset_ops(preset, size, crop_pct, flips), *norm, ToTensorV2()])


# --- replayable views -------------------------------------------------------------------------------


class View(NamedTuple):
    """A random-resized-crop box in source pixels (x1, y1 exclusive) plus a horizontal flip.

    Stored in source-image coordinates, so one view replays at any model's input size: a teacher at
    288 px and the student at 224 px see the same region. ``np.asarray(view)`` gives 5 ints to cache."""

    x0: int
    y0: int
    x1: int
    y1: int
    flip: bool

    @classmethod
    def from_array(cls, values: Sequence[Any]) -> View:
        x0, y0, x1, y1, flip = (int(v) for v in values)
        return cls(x0, y0, x1, y1, bool(flip))


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def sample_view(
    image_shape: Sequence[int],
    rng: np.random.Generator | int | None,
    scale: tuple[float, float] = CROP_SCALE["heavy"],
    ratio: tuple[float, float] = RATIO,
    hflip: float = 0.5,
) -> View:
    """Draw a random-resized-crop box (torchvision's algorithm: 10 tries, then a centre crop with the
    aspect ratio clamped to ``ratio``) and a flip for an image of shape (H, W[, C])."""
    if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
        raise ImatError(f"bad view ranges: scale={scale} ratio={ratio}")
    gen = _as_rng(rng)
    height, width = int(image_shape[0]), int(image_shape[1])
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box: tuple[int, int, int, int] | None = None
    for _ in range(10):
        target_area = area * gen.uniform(scale[0], scale[1])
        aspect = math.exp(gen.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(gen.integers(0, height - h + 1))
            x0 = int(gen.integers(0, width - w + 1))
            box = (x0, y0, x0 + w, y0 + h)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            w, h = width, height
        w, h = max(1, min(w, width)), max(1, min(h, height))
        x0, y0 = (width - w) // 2, (height - h) // 2
        box = (x0, y0, x0 + w, y0 + h)
    flip = bool(gen.random() < hflip)
    return View(*box, flip)


def apply_view(
    image: np.ndarray, view: View | Sequence[Any], input_size: int, interpolation: int = cv2.INTER_LINEAR
) -> np.ndarray:
    """Crop ``view`` out of ``image`` (HxWxC uint8), resize to input_size x input_size, flip if asked."""
    size = _check_size(input_size)
    v = view if isinstance(view, View) else View.from_array(view)
    height, width = image.shape[:2]
    if not (0 <= v.x0 < v.x1 <= width and 0 <= v.y0 < v.y1 <= height):
        raise ImatError(f"view {tuple(v)} lies outside an image of {width}x{height}")
    crop = cv2.resize(image[v.y0 : v.y1, v.x0 : v.x1], (size, size), interpolation=interpolation)
    if v.flip:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def random_view(
    image: np.ndarray,
    rng: np.random.Generator | int | None,
    input_size: int,
    scale: tuple[float, float] = CROP_SCALE["heavy"],
    ratio: tuple[float, float] = RATIO,
    hflip: float = 0.5,
) -> tuple[np.ndarray, View]:
    """Sample a view of ``image`` and return (the view's pixels at input_size, the view) for replay."""
    view = sample_view(image.shape, rng, scale, ratio, hflip)
    return apply_view(image, view, input_size), view
