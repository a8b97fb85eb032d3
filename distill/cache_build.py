"""Building the teacher cache (distill/cache.py) and training on its views.

:func:`build_cache` runs every teacher once over ``views_per_image`` seeded random-resized-crop views of
every training image; :func:`prepare_cache` builds or reuses the file for ``cfg.distill.cache`` and returns
the loaders that train on those views (:class:`CachedViewDataset`: one stored view per image and epoch,
with the soft label the teachers gave to exactly those pixels).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from distill.cache import (
    CACHE_FILE,
    SOFT_KEYS,
    TEMPERATURE_GRID,
    TENSORS,
    TeacherCache,
    fingerprint,
    load_cache,
    save_cache,
    topk_entries,
)
from distill.teachers_runtime import FrozenTeacher
from imat.errors import ImatError

log = logging.getLogger(__name__)


def _view_seed(seed: int, i: int, v: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(i), int(v)])


@torch.no_grad()
def build_cache(
    teachers: list[FrozenTeacher],
    train_df: pd.DataFrame,
    images_root: str | None,
    *,
    num_classes: int,
    topk: int,
    views_per_image: int,
    seed: int,
    scale: tuple[float, float],
    hflip: float = 0.5,
    temperatures: tuple[float, ...] = (1.0,),
    decoder: str = "cv2",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score ``views_per_image`` seeded views of every training image with every teacher:
    (index, logit, tail, views) as described in the module docstring.

    In a distributed job (every rank calls this) each rank decodes and scores its share of the images
    (:func:`imat.engine.distributed.shard_rows`) on ``device``, and the shares are summed across ranks,
    so every rank returns the whole cache, as one process would (each view is seeded by its image)."""
    from imat.data import apply_view, decode_image, resolve_paths, sample_view
    from imat.engine import distributed as dist_utils

    dev = torch.device(device)
    paths = resolve_paths(train_df, images_root)
    n, v_count, tn = len(paths), views_per_image, len(teachers)
    k = min(topk, num_classes)
    temps = tuple(float(t) for t in temperatures)
    index = torch.zeros(n, v_count, tn, k, dtype=torch.int32)
    logit = torch.zeros(n, v_count, tn, k, dtype=torch.float32)
    tail = torch.zeros(n, v_count, tn, len(temps), dtype=torch.float32)
    views = torch.zeros(n, v_count, 5, dtype=torch.int32)
    pending: list[tuple[int, int, np.ndarray]] = []  # (image, view, pixels)

    def flush() -> None:
        if not pending:
            return
        for t_i, t in enumerate(teachers):
            t.to(dev)
            t.model.eval()
            crops = np.stack([apply_view(img, views[i, v].tolist(), t.input_size) for i, v, img in pending])
            x = torch.from_numpy(crops).to(dev).permute(0, 3, 1, 2).float().div_(255.0)
            mean = torch.tensor(t.mean, device=dev).view(1, 3, 1, 1)
            std = torch.tensor(t.std, device=dev).view(1, 3, 1, 1)
            top_i, top_z, rest = topk_entries(t.model((x - mean) / std), k, temps)
            for row, (i, v, _) in enumerate(pending):
                index[i, v, t_i] = top_i[row].cpu()
                logit[i, v, t_i] = top_z[row].cpu()
                tail[i, v, t_i] = rest[row].cpu()
        pending.clear()

    for i in dist_utils.shard_rows(n):
        path = paths[i]
        try:
            img = decode_image(path, decoder)
        except ImatError as exc:
            log.warning("teacher cache: unreadable image left with a uniform soft label: %s", exc)
            h, w = 1, 1
            views[i, :, :] = torch.tensor([0, 0, w, h, 0], dtype=torch.int32)
            # all logits equal (0) at every temperature: the tail's log-sum-exp is log(C - k)
            logit[i] = 0.0
            tail[i] = float(np.log(num_classes - k)) if num_classes > k else float("-inf")
            index[i] = torch.arange(k, dtype=torch.int32)
            continue
        for v in range(v_count):
            view = sample_view(img.shape, _view_seed(seed, i, v), scale=scale, hflip=hflip)
            views[i, v] = torch.tensor(
                [view.x0, view.y0, view.x1, view.y1, int(view.flip)], dtype=torch.int32
            )
            pending.append((i, v, img))
        if len(pending) >= batch_size:
            flush()
    flush()
    for tensor in (index, logit, tail, views):  # other ranks' rows are zero here
        dist_utils.sum_rows_across_ranks_(tensor, dev)
    return index, logit, tail, views


class CachedViewDataset(Dataset):
    """Training items on one of the cached views per image and epoch, with that view's soft label."""

    def __init__(
        self,
        df: pd.DataFrame,
        images_root: str | None,
        cache: TeacherCache,
        input_size: int,
        mean: Any,
        std: Any,
        decoder: str = "cv2",
        seed: int = 0,
    ) -> None:
        from imat.data import ImageDataset, build_normalize_transform

        self.base = ImageDataset(df, images_root, None, decoder)
        self.cache = cache
        self.input_size = input_size
        self.normalize = build_normalize_transform(mean, std)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def view_of(self, index: int) -> int:
        """Which stored view image ``index`` uses this epoch (seeded, so a resumed epoch repeats)."""
        return int(
            np.random.default_rng([self.seed, self.epoch, int(index)]).integers(self.cache.views_per_image)
        )

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        from imat.data import apply_view

        image = self.base.load(index)
        if image is None:
            return None
        v = self.view_of(index)
        pixels = apply_view(image, self.cache.views[index, v].tolist(), self.input_size)
        return {
            "image": self.normalize(image=pixels)["image"],
            "label": int(self.base.labels[index]),
            "index": int(index),
            "view": v,
            **self.cache.fields(index, v),
        }


def collate_cached(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    from imat.data import collate_skip

    out = collate_skip(items)
    kept = [it for it in items if it is not None]
    if kept:
        out["view"] = torch.as_tensor([it["view"] for it in kept], dtype=torch.long)
        for key in SOFT_KEYS:
            out[key] = torch.stack([it[key] for it in kept])
    return out


def prepare_cache(
    cfg: Any,
    teachers: list[FrozenTeacher],
    data_cfg: dict[str, Any],
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    root: str | None,
    out_dir: Path,
) -> tuple[TeacherCache, Any, Any]:
    """Build (or reuse) the cache for ``cfg.distill.cache`` and the loaders that train on its views."""
    from distill.methods import get_method, method_names
    from distill.settings import default_selection, pool_dir_of, selection_probabilities
    from imat.data import build_loader, resolve_paths
    from imat.data.transforms import CROP_SCALE
    from teachers.pool import load_pool

    dcfg = cfg.distill
    method = get_method(dcfg.method)
    if not method.uses_cache:
        cached = [n for n in method_names() if get_method(n).uses_cache]
        raise ImatError(
            f"distill.cache: cached teacher outputs cover the final outputs only ({', '.join(cached)}), "
            f"not {dcfg.method}"
        )
    aug = dcfg.train.aug
    # A cached view is a random-resized crop and a flip (the `light` preset): what a teacher scored
    # must be what the student sees, so augmentations the cache cannot replay are refused, not dropped.
    if aug.preset != "light":
        raise ImatError(
            f"distill.train.aug.preset: the teacher cache stores crop + flip views (the light preset), "
            f"not {aug.preset!r}; set distill.train.aug.preset=light or distill.cache.enabled=false"
        )
    if aug.balanced_sampler:
        raise ImatError(
            "distill.train.aug.balanced_sampler: not supported with distill.cache.enabled (one epoch = "
            "each image once, on one of its cached views)"
        )
    method.check_cache(dcfg)
    ccfg = dcfg.cache
    entries = {e.name: e for e in load_pool(pool_dir_of(cfg), dcfg.teachers)}
    num_classes = next(iter(entries.values())).num_classes
    weights = [str(entries[t.name].weights_path) for t in teachers]
    scale, hflip = CROP_SCALE["light"], 0.5 if aug.flips else 0.0
    seed = dcfg.seed if dcfg.seed is not None else dcfg.train.seed
    t0 = time.perf_counter()  # hashing the teachers' weights counts as part of the cache's cost
    ids = train_df["image_id"].astype(str).tolist()
    paths = resolve_paths(train_df, root)
    fp = fingerprint(
        teachers, weights, ids, ccfg.topk, ccfg.views_per_image, seed, scale, num_classes, hflip, paths
    )
    needed = (1.0, float(dcfg.temperature))
    path = (Path(ccfg.dir) if ccfg.dir else out_dir / "teacher_cache") / CACHE_FILE
    loaded = load_cache(path, fp, needed)
    if loaded is None:
        from imat.engine import distributed as dist_utils

        dist_utils.init_from_env()  # under torchrun the ranks share the work (the engine joins later)
        temps = tuple(sorted({*TEMPERATURE_GRID, *needed}))
        index, logit, tail, views = build_cache(
            teachers,
            train_df,
            root,
            num_classes=num_classes,
            topk=ccfg.topk,
            views_per_image=ccfg.views_per_image,
            seed=seed,
            scale=scale,
            hflip=hflip,
            temperatures=temps,
            decoder=cfg.data.decoder,
            batch_size=dcfg.train.eval_batch_size or dcfg.train.batch_size,
            device=dist_utils.process_device(dcfg.train.device),
        )
        if dist_utils.rank() == 0:
            save_cache(
                path,
                {"index": index, "logit": logit, "tail": tail, "views": views},
                {
                    "fingerprint": fp,
                    "temperatures": list(temps),
                    "teachers": [t.name for t in teachers],
                    "topk": ccfg.topk,
                    "views_per_image": ccfg.views_per_image,
                },
            )
        log.info("teacher cache built in %.1fs: %s", time.perf_counter() - t0, path)
    else:
        (tensors, temps) = loaded
        index, logit, tail, views = (tensors[name] for name in TENSORS)
        log.info("teacher cache reused: %s", path)
    cache = TeacherCache(
        index,
        logit,
        tail,
        views,
        num_classes,
        [t.name for t in teachers],
        temps,
        default_selection(dcfg, teachers),
        seed,
        selection_probabilities(dcfg, teachers),
    )
    cache.build_seconds = time.perf_counter() - t0
    train_ds = CachedViewDataset(
        train_df,
        root,
        cache,
        data_cfg["input_size"],
        data_cfg["mean"],
        data_cfg["std"],
        cfg.data.decoder,
        seed,
    )
    recipe = dcfg.train
    train_loader = build_loader(
        train_ds,
        recipe.batch_size,
        shuffle=True,
        num_workers=cfg.data.num_workers,
        drop_last=len(train_df) > recipe.batch_size,
        seed=recipe.seed,
    )
    train_loader.collate_fn = collate_cached
    val_loader = _val_loader(cfg, data_cfg, val_df, root)
    return cache, train_loader, val_loader


def _val_loader(cfg: Any, data_cfg: dict[str, Any], val_df: pd.DataFrame, root: str | None) -> Any:
    from imat.data import ImageDataset, build_eval_transform, build_loader

    if val_df.empty:
        return None
    recipe = cfg.distill.train
    tf = build_eval_transform(data_cfg["input_size"], data_cfg["mean"], data_cfg["std"], data_cfg["crop_pct"])
    ds = ImageDataset(val_df, root, tf, cfg.data.decoder)
    return build_loader(
        ds, recipe.eval_batch_size or recipe.batch_size, False, cfg.data.num_workers, seed=recipe.seed
    )
