"""Batching: a collate that drops unreadable samples, a loader that never yields an empty batch (nor fewer batches),
seeded workers, and a class-balanced sampler for long-tailed training sets."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from imat.errors import ImatError

log = logging.getLogger(__name__)


def collate_skip(items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack the readable items; ``skipped`` says how many of this batch were None.

    A batch whose items are all None comes back with ``image`` of shape (0,) and empty label/index
    tensors; :class:`SkipLoader` replaces such batches so training code never sees one."""
    kept = [it for it in items if it is not None]
    skipped = len(items) - len(kept)
    if not kept:
        empty = torch.zeros(0, dtype=torch.long)
        return {"image": torch.zeros(0), "label": empty, "index": empty.clone(), "skipped": skipped}
    return {
        "image": torch.stack([it["image"] for it in kept]),
        "label": torch.as_tensor([it["label"] for it in kept], dtype=torch.long),
        "index": torch.as_tensor([it["index"] for it in kept], dtype=torch.long),
        "skipped": skipped,
    }


def _worker_init(worker_id: int) -> None:
    """Give each worker its own numpy/random/albumentations stream, derived from the loader's seed.

    torch seeds each worker with base_seed + worker_id (base_seed drawn from the loader's generator);
    numpy, random and albumentations (2.x keeps its own RNG inside each Compose) do not follow it, so
    without this every forked worker would replay the same augmentations."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    # One OpenCV thread per worker: N workers x all-cores pools would oversubscribe the node. Safe in a
    # forked worker only because SkipLoader forks with the parent's pool at one thread (see below).
    cv2.setNumThreads(1)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


class SkipLoader(DataLoader):
    """A DataLoader that never yields a batch without a readable image.

    Unreadable samples are dropped from their batch (:func:`collate_skip`). A batch with no readable
    image at all is dropped, or, with ``replace_unreadable`` (the engine sets it on training loaders),
    replaced by the samples of the last readable batch of this pass, read again from
    the dataset (a fresh augmentation of images of the same shard; the first readable batch when
    none came yet). So every rank of a data-parallel run takes the same number of steps, whatever its
    share of unreadable images (a rank that ran one step fewer would leave the others waiting in a
    collective). ``batch["skipped"]`` still counts every unreadable sample once; ``epoch_skipped`` is
    the total of the last (or current) pass and ``epoch_replaced`` the number of replaced batches.
    A pass with no readable image at all is an ImatError.

    Re-reading uses each item's ``index`` as its position in the dataset (as :class:`ImageDataset`
    yields); a batch without ``index`` is repeated as it is."""

    epoch_skipped: int = 0
    epoch_replaced: int = 0
    replace_unreadable: bool = False  # validation drops empty batches: a replaced one would count twice
    # (mean, std) when the dataset yields uint8 images that the engine normalises on the device
    device_normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def _get_iterator(self) -> Any:
        if self.num_workers == 0:
            return super()._get_iterator()
        # Workers fork here. OpenCV's setNumThreads joins its pool's threads, which a forked child does
        # not have: it waits forever once the parent has run a parallel op. Forking while the parent's
        # pool is at one thread (no pool threads) lets each worker set its own count safely.
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            return super()._get_iterator()
        finally:
            cv2.setNumThreads(threads)

    def _replacement(self, readable: dict[str, Any], skipped: int) -> dict[str, Any]:
        self.epoch_replaced += 1
        index = readable.get("index")
        if isinstance(index, torch.Tensor) and index.numel():
            items = [self.dataset[int(i)] for i in index.tolist()]
            batch = self.collate_fn(items)
            if batch["label"].numel() == 0:  # unreadable now (deleted meanwhile): repeat the batch
                if "image" not in readable and "jpeg" not in readable:
                    raise ImatError(
                        f"images {index.tolist()} of this loader's dataset became unreadable during the "
                        "pass (were files deleted while training?)"
                    )
                batch = dict(readable)
        else:
            batch = dict(readable)
        batch["skipped"] = skipped
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        self.epoch_skipped = 0
        self.epoch_replaced = 0
        readable: dict[str, Any] | None = None  # its index is re-read: no decoded images kept
        owed: list[int] = []  # skipped counts of empty batches that came before any readable one
        carry = 0
        for batch in super().__iter__():
            self.epoch_skipped += int(batch["skipped"])
            if batch["label"].numel() == 0:
                if not self.replace_unreadable:
                    carry += int(batch["skipped"])
                elif readable is None:
                    owed.append(int(batch["skipped"]))
                else:
                    yield self._replacement(readable, int(batch["skipped"]))
                continue
            if carry:  # dropped batches' counts ride on the next yielded one
                batch["skipped"] = int(batch["skipped"]) + carry
                carry = 0
            # what a re-read needs, and the encoded keys of data.decode: gpu (their bytes are small);
            # a decoded image batch (e.g. 64 x 3 x 448 x 448 floats) only when there is no index to re-read
            rereadable = isinstance(batch.get("index"), torch.Tensor) and batch["index"].numel() > 0
            readable = {k: v for k, v in batch.items() if k != "image" or not rereadable}
            yield batch
            for count in owed:
                yield self._replacement(readable, count)
            owed = []
        if owed:
            raise ImatError(
                f"none of the {sum(owed)} images of this loader's pass could be read "
                "(are the images downloaded, and is data.images right?)"
            )
        if carry:
            log.warning("%d unreadable image(s) at the end of the pass formed no batch", carry)
        if self.epoch_replaced:
            log.warning(
                "%d batch(es) had no readable image and were replaced by re-read samples (%d unreadable "
                "image(s) in this pass)",
                self.epoch_replaced,
                self.epoch_skipped,
            )


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    seed: int = 0,
    collate_fn: Callable[[list[Any]], dict[str, Any]] | None = None,
) -> SkipLoader:
    """A seeded loader over ``dataset`` with :func:`collate_skip`.

    Pinned memory when CUDA is available, persistent workers when num_workers > 0 (except for a dataset
    with ``set_epoch``: a persistent worker would keep its copy at the first epoch), shuffling from a
    generator seeded with ``seed`` (ignored when a ``sampler`` is given). With num_workers == 0 the
    dataset's albumentations pipeline is seeded too, so a single-process run repeats exactly.
    ``collate_fn`` replaces :func:`collate_skip` (e.g. to add per-item extras); its batches must keep
    the ``label`` tensor and ``skipped`` count, best by calling collate_skip first."""
    if batch_size < 1:
        raise ImatError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ImatError(f"num_workers must be >= 0, got {num_workers}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    if num_workers == 0:
        transform = getattr(dataset, "transform", None)
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed(int(seed))
    return SkipLoader(
        dataset,
        batch_size=batch_size,
        shuffle=bool(shuffle) and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_skip if collate_fn is None else collate_fn,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0 and not callable(getattr(dataset, "set_epoch", None)),
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=generator,
    )


def balanced_sampler(
    labels: Sequence[int] | np.ndarray,
    num_samples: int | None = None,
    seed: int = 0,
    sample_weights: Sequence[float] | np.ndarray | None = None,
) -> WeightedRandomSampler:
    """Sample every class equally often in expectation: weight 1/count(class), with replacement.

    Rows labelled -1 (unknown) get weight 0. ``num_samples`` defaults to len(labels) (one "epoch").
    ``sample_weights`` (e.g. ``data.clean``'s downweighting) multiply each row's weight."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    known = y >= 0
    if not known.any():
        raise ImatError("balanced sampler: no labelled samples")
    counts = np.bincount(y[known])
    weights = np.zeros(len(y), dtype=np.float64)
    weights[known] = 1.0 / counts[y[known]]
    if sample_weights is not None:
        weights *= np.asarray(sample_weights, dtype=np.float64).reshape(-1)
    return weighted_sampler(weights, num_samples, seed)


def weighted_sampler(
    weights: Sequence[float] | np.ndarray, num_samples: int | None = None, seed: int = 0
) -> WeightedRandomSampler:
    """Draw rows with probability proportional to ``weights``, with replacement, seeded.

    In expectation a row of weight w counts w times as much in the training loss as a row of weight
    1, so per-sample loss weights need no change to any task's loss (MEAL, KD and CE alike)."""
    y = np.array(weights, dtype=np.float64).reshape(-1)  # a copy: torch wants a writable array
    if not len(y) or not np.isfinite(y).all() or (y < 0).any() or y.sum() <= 0:
        raise ImatError("weighted sampler: weights must be finite, >= 0 and not all zero")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    n = len(y) if num_samples is None else int(num_samples)
    if n < 1:
        raise ImatError(f"weighted sampler: num_samples must be >= 1, got {n}")
    return WeightedRandomSampler(torch.as_tensor(y), n, replacement=True, generator=generator)
