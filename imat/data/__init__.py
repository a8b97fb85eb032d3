"""Datasets, loaders and augmentation: from manifest rows to normalised, batched tensors."""

from imat.data.dataset import ImageDataset, resolve_paths
from imat.data.decode import (
    DECODERS,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageTooLargeError,
    dct_scale,
    decode_image,
    read_header,
)
from imat.data.loader import SkipLoader, balanced_sampler, build_loader, collate_skip, weighted_sampler
from imat.data.mixing import OddSafeMixup, build_mixup
from imat.data.noise import NOISE_KINDS, apply_label_noise, labelled_splits, run_splits
from imat.data.recipe import recipe_loaders
from imat.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    View,
    apply_view,
    build_eval_transform,
    build_normalize_transform,
    build_train_transform,
    decode_side,
    random_view,
    sample_view,
)

__all__ = [
    "DECODERS",
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NOISE_KINDS",
    "PRESETS",
    "ImageDataset",
    "ImageDecodeError",
    "ImageTooLargeError",
    "OddSafeMixup",
    "SkipLoader",
    "View",
    "apply_label_noise",
    "labelled_splits",
    "apply_view",
    "balanced_sampler",
    "build_eval_transform",
    "build_loader",
    "build_mixup",
    "build_normalize_transform",
    "build_train_transform",
    "collate_skip",
    "dct_scale",
    "decode_image",
    "decode_side",
    "random_view",
    "read_header",
    "recipe_loaders",
    "resolve_paths",
    "run_splits",
    "sample_view",
    "weighted_sampler",
]
