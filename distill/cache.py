"""Cached teacher outputs (FKD-style): run the teachers ONCE, reuse their soft labels every epoch.

Running every teacher on every batch dominates the cost of MEAL v2 and KD. Here, before training, each
training image gets ``views_per_image`` random-resized-crop views (box in source pixels + flip, seeded
per image and view); every teacher scores every view at its own input size and mean/std, and the top-k
probabilities are stored with the view. During training the student draws one of the stored views per
image and epoch and is trained on exactly that crop, so its soft label is the one the teachers gave
to the pixels it sees. The rest of the probability mass (1 - sum top-k) is spread uniformly over the
other classes when the dense target is rebuilt; a temperature T is applied to the rebuilt distribution
(p^(1/T), renormalised), which is exact for the top-k classes.

Files: ``cache_dir/teacher_cache.safetensors`` with ``index [N, V, Tn, k] int32``, ``prob [N, V, Tn, k]
float16``, ``views [N, V, 5] int32`` and a metadata fingerprint (teachers' weights, image ids, k, V,
seed, crop scale); a cache whose fingerprint differs is rebuilt, a matching one is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from distill.teachers_runtime import FrozenTeacher
from imat.errors import ImatError
from imat.io import write_with

log = logging.getLogger(__name__)

CACHE_FILE = "teacher_cache.safetensors"


class TeacherCache:
    """Top-k teacher probabilities per image, view and teacher, and the views themselves."""

    def __init__(
        self,
        index: torch.Tensor,
        prob: torch.Tensor,
        views: torch.Tensor,
        num_classes: int,
        teachers: list[str],
        selection: str = "mean",
        seed: int = 0,
    ) -> None:
        self.index = index  # [N, V, Tn, k] int
        self.prob = prob  # [N, V, Tn, k] float16
        self.views = views  # [N, V, 5] int
        self.num_classes = num_classes
        self.teachers = teachers
        self.selection = selection
        self.generator = torch.Generator().manual_seed(int(seed))
        self.picks = [0] * len(teachers)
        self.build_seconds = 0.0

    @property
    def views_per_image(self) -> int:
        return int(self.views.shape[1])

    def choose(self) -> list[int]:
        """This step's teachers: one at random or all (mean), counted for the epoch log."""
        tn = len(self.teachers)
        chosen = list(range(tn))
        if self.selection == "random":
            chosen = [int(torch.randint(tn, (1,), generator=self.generator))]
        for i in chosen:
            self.picks[i] += 1
        return chosen

    def dense(
        self,
        index: torch.Tensor,
        prob: torch.Tensor,
        temperature: float = 1.0,
        chosen: list[int] | None = None,
    ) -> torch.Tensor:
        """[B, Tn, k] top-k (indices, probabilities) -> [B, C] target: the chosen teachers' mean."""
        b, tn, k = index.shape
        if chosen is None:
            chosen = self.choose()
        p = prob[:, chosen].float().clamp_min(1e-8)
        idx = index[:, chosen].long()
        rest = (1.0 - p.sum(-1, keepdim=True)).clamp_min(0.0)
        others = max(self.num_classes - k, 1)
        fill = (rest / others).clamp_min(1e-8)  # [B, t, 1]
        dense = fill.expand(b, len(chosen), self.num_classes).clone()
        dense.scatter_(2, idx, p)
        if temperature != 1.0:
            dense = dense.pow(1.0 / temperature)
        dense = dense / dense.sum(-1, keepdim=True)
        return dense.mean(1)

    def pick_counts(self) -> dict[str, float]:
        out = {f"pick_{n}": float(c) for n, c in zip(self.teachers, self.picks, strict=True)}
        self.picks = [0] * len(self.teachers)
        return out


def fingerprint(
    teachers: list[FrozenTeacher],
    weights: list[str],
    image_ids: list[str],
    topk: int,
    views: int,
    seed: int,
    scale: tuple[float, float],
    num_classes: int,
    hflip: float = 0.5,
) -> str:
    h = hashlib.sha256()
    for t, w in zip(teachers, weights, strict=True):
        p = Path(w)
        stat = p.stat() if p.is_file() else None
        h.update(
            f"{t.name}|{w}|{stat.st_size if stat else 0}|{stat.st_mtime_ns if stat else 0}|{t.input_size}|"
            f"{t.mean}|{t.std}".encode()
        )
    h.update("\n".join(image_ids).encode())
    h.update(f"{topk}|{views}|{seed}|{scale}|{num_classes}|{hflip}".encode())
    return h.hexdigest()


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
    decoder: str = "cv2",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score ``views_per_image`` seeded views of every training image with every teacher."""
    from imat.data import apply_view, decode_image, resolve_paths, sample_view

    dev = torch.device(device)
    paths = resolve_paths(train_df, images_root)
    n, v_count, tn = len(paths), views_per_image, len(teachers)
    k = min(topk, num_classes)
    index = torch.zeros(n, v_count, tn, k, dtype=torch.int32)
    prob = torch.zeros(n, v_count, tn, k, dtype=torch.float16)
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
            p = torch.softmax(t.model((x - mean) / std).float(), dim=1)
            top_p, top_i = p.topk(k, dim=1)
            for row, (i, v, _) in enumerate(pending):
                index[i, v, t_i] = top_i[row].to(torch.int32).cpu()
                prob[i, v, t_i] = top_p[row].to(torch.float16).cpu()
        pending.clear()

    for i, path in enumerate(paths):
        try:
            img = decode_image(path, decoder)
        except ImatError as exc:
            log.warning("teacher cache: unreadable image left with a uniform soft label: %s", exc)
            h, w = 1, 1
            views[i, :, :] = torch.tensor([0, 0, w, h, 0], dtype=torch.int32)
            prob[i] = 1.0 / num_classes
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
    return index, prob, views


def save_cache(
    path: Path, index: torch.Tensor, prob: torch.Tensor, views: torch.Tensor, meta: dict[str, Any]
) -> Path:
    tensors = {"index": index.contiguous(), "prob": prob.contiguous(), "views": views.contiguous()}
    return write_with(
        path, lambda tmp: save_file(tensors, str(tmp), metadata={"imat_cache": json.dumps(meta)})
    )


def load_cache(path: Path, expected: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The cached tensors when ``path`` exists and its fingerprint is ``expected``; else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("imat_cache", "{}"))
            if meta.get("fingerprint") != expected:
                return None
            return fh.get_tensor("index"), fh.get_tensor("prob"), fh.get_tensor("views")
    except Exception:  # a damaged cache is rebuilt, never trusted
        log.warning("teacher cache %s unreadable: rebuilding it", path)
        return None


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
            "soft_index": self.cache.index[index, v],
            "soft_prob": self.cache.prob[index, v],
        }


def collate_cached(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    from imat.data import collate_skip

    out = collate_skip(items)
    kept = [it for it in items if it is not None]
    if kept:
        out["view"] = torch.as_tensor([it["view"] for it in kept], dtype=torch.long)
        out["soft_index"] = torch.stack([it["soft_index"] for it in kept])
        out["soft_prob"] = torch.stack([it["soft_prob"] for it in kept])
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
    from distill.train import default_selection, pool_dir_of
    from imat.data import build_loader
    from imat.data.transforms import CROP_SCALE
    from teachers.pool import load_pool

    dcfg = cfg.distill
    if dcfg.method not in ("kd", "meal-v2"):
        raise ImatError(
            f"distill.cache: cached teacher outputs cover the final outputs only (kd, meal-v2), not {dcfg.method}"
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
    ccfg = dcfg.cache
    entries = {e.name: e for e in load_pool(pool_dir_of(cfg), dcfg.teachers)}
    num_classes = next(iter(entries.values())).num_classes
    weights = [str(entries[t.name].weights_path) for t in teachers]
    scale, hflip = CROP_SCALE["light"], 0.5 if aug.flips else 0.0
    seed = dcfg.seed if dcfg.seed is not None else dcfg.train.seed
    ids = train_df["image_id"].astype(str).tolist()
    fp = fingerprint(teachers, weights, ids, ccfg.topk, ccfg.views_per_image, seed, scale, num_classes, hflip)
    path = (Path(ccfg.dir) if ccfg.dir else out_dir / "teacher_cache") / CACHE_FILE
    loaded = load_cache(path, fp)
    t0 = time.perf_counter()
    if loaded is None:
        from imat.engine.runtime import resolve_device

        index, prob, views = build_cache(
            teachers,
            train_df,
            root,
            num_classes=num_classes,
            topk=ccfg.topk,
            views_per_image=ccfg.views_per_image,
            seed=seed,
            scale=scale,
            hflip=hflip,
            decoder=cfg.data.decoder,
            batch_size=dcfg.train.eval_batch_size or dcfg.train.batch_size,
            device=resolve_device(dcfg.train.device),
        )
        save_cache(
            path,
            index,
            prob,
            views,
            {
                "fingerprint": fp,
                "teachers": [t.name for t in teachers],
                "topk": ccfg.topk,
                "views_per_image": ccfg.views_per_image,
            },
        )
        log.info("teacher cache built in %.1fs: %s", time.perf_counter() - t0, path)
    else:
        index, prob, views = loaded
        log.info("teacher cache reused: %s", path)
    cache = TeacherCache(
        index, prob, views, num_classes, [t.name for t in teachers], default_selection(dcfg), seed
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
