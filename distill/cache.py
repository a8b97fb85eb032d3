"""Cached teacher outputs (FKD-style): run the teachers ONCE, reuse their soft labels every epoch.

Running every teacher on every batch dominates the cost of MEAL v2 and KD. Here, before training, each
training image gets ``views_per_image`` random-resized-crop views (box in source pixels + flip, seeded
per image and view); every teacher scores every view at its own input size and mean/std, and its top-k
LOGITS are stored with the view, together with the log-sum-exp of the other classes' logits / T for a
set of temperatures T (1, the tune space's 2..8 and the configured one). From these the soft label at
any stored T is exact for the top-k classes (softmax(z / T) restricted to them, the full normaliser
known) and exact in the tail's total mass, which is spread evenly over the other classes. During
training the student draws one of the stored views per image and epoch and is trained on exactly that
crop, so its soft label is the one the teachers gave to the pixels it sees.

MEAL's discriminator must compare like with like: the teacher side can only be "top-k known, the rest
flat", so the student's side goes through the same truncation (:meth:`TeacherCache.meal_vectors`): a
student identical to its teacher gives the discriminator identical inputs.

Files: ``cache_dir/teacher_cache.safetensors`` with ``index [N, V, Tn, k] int32``, ``logit [N, V, Tn, k]
float32``, ``tail [N, V, Tn, nT] float32`` (log-sum-exp of the non-top-k logits / T per stored T),
``views [N, V, 5] int32`` and metadata: the format version, the stored temperatures and a fingerprint
(the format, the teachers' weight CONTENTS, the image files (images root and paths), k, V, seed, crop
scale, flip); a cache whose fingerprint differs, or that lacks a needed temperature, is rebuilt.
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
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from distill.teachers_runtime import FrozenTeacher, draw_teachers
from imat.errors import ImatError
from imat.io import write_with

log = logging.getLogger(__name__)

CACHE_FILE = "teacher_cache.safetensors"
# 2: top-k logits + the tail's log-sum-exp per temperature (1 was top-k probabilities, inexact at T != 1)
CACHE_FORMAT = 2
# Temperatures every cache stores besides the configured one: those of the tune space
# (distill/tune_space.py), so a sweep over T reuses one cache.
TEMPERATURE_GRID = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
SOFT_KEYS = ("soft_index", "soft_logit", "soft_tail")  # the batch fields a cached view carries


def topk_entries(
    logits: torch.Tensor, k: int, temperatures: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full logits [..., C] -> what the cache keeps: top-k indices and logits [..., k], and for each
    temperature T the log-sum-exp of the other classes' logits / T [..., nT] (-inf when k = C)."""
    z = logits.float()
    top_z, top_i = z.topk(k, dim=-1)
    rest = z.scatter(-1, top_i, float("-inf"))
    tail = torch.stack([torch.logsumexp(rest / t, dim=-1) for t in temperatures], dim=-1)
    return top_i.to(torch.int32), top_z, tail


class TeacherCache:
    """Top-k teacher logits (+ tail log-sum-exp per temperature) per image, view and teacher, and the views."""

    def __init__(
        self,
        index: torch.Tensor,
        logit: torch.Tensor,
        tail: torch.Tensor,
        views: torch.Tensor,
        num_classes: int,
        teachers: list[str],
        temperatures: tuple[float, ...] = (1.0,),
        selection: str = "mean",
        seed: int = 0,
        probabilities: list[float] | None = None,
    ) -> None:
        self.index = index  # [N, V, Tn, k] int
        self.logit = logit  # [N, V, Tn, k] float32
        self.tail = tail  # [N, V, Tn, nT] float32
        self.views = views  # [N, V, 5] int
        self.num_classes = num_classes
        self.teachers = teachers
        self.temperatures = tuple(float(t) for t in temperatures)
        self.selection = selection
        self.probabilities = torch.tensor(probabilities, dtype=torch.float64) if probabilities else None
        self.generator = torch.Generator().manual_seed(int(seed))
        self.picks = [0] * len(teachers)
        self.build_seconds = 0.0

    @property
    def views_per_image(self) -> int:
        return int(self.views.shape[1])

    def choose(self) -> list[int]:
        """This step's teachers (one drawn, uniformly or weighted, or all), counted for the epoch log."""
        chosen = draw_teachers(self.selection, len(self.teachers), self.generator, self.probabilities)
        for i in chosen:
            self.picks[i] += 1
        return chosen

    def fields(self, i: int, v: int) -> dict[str, torch.Tensor]:
        """Image ``i``'s view ``v`` as batch fields (SOFT_KEYS), [Tn, k] and [Tn, nT] each."""
        return {"soft_index": self.index[i, v], "soft_logit": self.logit[i, v], "soft_tail": self.tail[i, v]}

    def log_probs(
        self, batch: dict[str, Any], temperature: float, chosen: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chosen teachers' exact log-probabilities at T: (top-k classes [B, t, k] long, their
        log-probabilities [B, t, k], the log of the tail's total mass [B, t])."""
        hits = [j for j, t in enumerate(self.temperatures) if abs(t - temperature) <= 1e-6 * max(1.0, t)]
        if not hits:
            raise ValueError(f"the teacher cache holds temperatures {self.temperatures}, not {temperature}")
        idx = batch["soft_index"][:, chosen].long()
        z = batch["soft_logit"][:, chosen].float() / temperature
        tail = batch["soft_tail"][:, chosen, hits[0]].float()
        lse = torch.logaddexp(torch.logsumexp(z, dim=-1), tail)  # log of softmax's full normaliser at T
        return idx, z - lse.unsqueeze(-1), tail - lse

    def dense(
        self, batch: dict[str, Any], temperature: float = 1.0, chosen: list[int] | None = None
    ) -> torch.Tensor:
        """[B, C] target: the chosen teachers' mean of softmax(z / T), exact on each teacher's top-k and
        in its tail's mass, which is spread evenly over that teacher's other classes."""
        if chosen is None:
            chosen = self.choose()
        idx, lp_top, lp_tail = self.log_probs(batch, temperature, chosen)
        b, t, k = idx.shape
        others = max(self.num_classes - k, 1)
        fill = (lp_tail.exp() / others).unsqueeze(-1).expand(b, t, self.num_classes)
        return fill.scatter(2, idx, lp_top.exp()).mean(1)

    def meal_vectors(
        self, batch: dict[str, Any], s_logits: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MEAL's logits block from the cache: (student's discriminator input, teacher's discriminator
        input, teacher probabilities at T for the similarity loss).

        The discriminator inputs are log-probabilities (T = 1) in one representation for both sides:
        exact on the classes every chosen teacher ranks in its top-k (set S), the rest of the mass
        spread evenly over the other classes. S is the largest set on which the cache knows the
        teachers' (mean) distribution exactly, so a student identical to its teacher(s) gives
        identical inputs, and D can only learn from real differences.
        """
        chosen = self.choose()
        dev = s_logits.device
        batch = {key: batch[key].to(dev) for key in SOFT_KEYS}
        probs_t = self.dense(batch, temperature, chosen)
        idx, lp_top, lp_tail = self.log_probs(batch, 1.0, chosen)
        b, t, k = idx.shape
        c = self.num_classes
        neg = torch.finfo(torch.float32).min  # finite "log 0": keeps gradients free of inf - inf
        in_top = torch.zeros(b, t, c, dtype=torch.bool, device=dev).scatter_(2, idx, True)
        in_s = in_top.all(1)  # [B, C]
        count = (c - in_s.sum(-1, keepdim=True)).clamp_min(1)
        # teacher: mean over teachers on S (each knows these classes exactly); the tail mass of the
        # mean, exactly, as the mean of each teacher's mass outside S (its own tail + its top-k not in S)
        lp_dense = torch.full((b, t, c), neg, device=dev).scatter(2, idx, lp_top)
        log_t = float(np.log(t))
        t_on_s = torch.logsumexp(lp_dense, dim=1) - log_t
        off_s = lp_top.masked_fill(in_s.gather(1, idx.flatten(1)).view(b, t, k), neg)
        t_rest = (
            torch.logsumexp(torch.logsumexp(torch.cat([off_s, lp_tail.unsqueeze(-1)], -1), -1), 1) - log_t
        )
        t_vec = torch.where(in_s, t_on_s, t_rest.unsqueeze(-1) - count.log())
        # student: its own log-probabilities on S, its own mass outside S spread the same way
        s_lp = F.log_softmax(s_logits.float(), dim=-1)
        s_rest = torch.logsumexp(s_lp.masked_fill(in_s, neg), dim=-1, keepdim=True)
        s_vec = torch.where(in_s, s_lp, s_rest - count.log())
        return s_vec, t_vec, probs_t

    def pick_counts(self) -> dict[str, float]:
        out = {f"pick_{n}": float(c) for n, c in zip(self.teachers, self.picks, strict=True)}
        self.picks = [0] * len(self.teachers)
        return out


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks (weights files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    image_paths: list[str] | None = None,
) -> str:
    """What the cached soft labels depend on: the teachers by their weights' CONTENT (not path, size or
    mtime, which a rewrite can keep), the image files (absolute paths: the images root included), the
    views and k. Temperatures are not in it: a cache lacking one is rebuilt (see prepare_cache)."""
    h = hashlib.sha256()
    h.update(f"imat-teacher-cache|{CACHE_FORMAT}".encode())
    for t, w in zip(teachers, weights, strict=True):
        digest = file_sha256(w) if Path(w).is_file() else "-"
        h.update(f"{t.name}|{digest}|{t.input_size}|{t.mean}|{t.std}\n".encode())
    h.update("\n".join(image_ids).encode())
    h.update(b"\0")
    h.update("\n".join(str(Path(p).absolute()) for p in image_paths or []).encode())
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
    temperatures: tuple[float, ...] = (1.0,),
    decoder: str = "cv2",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score ``views_per_image`` seeded views of every training image with every teacher:
    (index, logit, tail, views) as described in the module docstring."""
    from imat.data import apply_view, decode_image, resolve_paths, sample_view

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

    for i, path in enumerate(paths):
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
    return index, logit, tail, views


TENSORS = ("index", "logit", "tail", "views")


def save_cache(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """``tensors`` (TENSORS) and ``meta`` (with "fingerprint" and "temperatures"), written atomically."""
    data = {name: tensors[name].contiguous() for name in TENSORS}
    meta = {**meta, "format": CACHE_FORMAT}
    return write_with(path, lambda tmp: save_file(data, str(tmp), metadata={"imat_cache": json.dumps(meta)}))


def load_cache(
    path: Path, expected: str, temperatures: tuple[float, ...] = (1.0,)
) -> tuple[dict[str, torch.Tensor], tuple[float, ...]] | None:
    """(tensors, stored temperatures) when ``path`` exists in this format, its fingerprint is
    ``expected`` and it stores every one of ``temperatures``; else None (the caller rebuilds)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("imat_cache", "{}"))
            if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != expected:
                return None
            stored = tuple(float(t) for t in meta.get("temperatures", ()))
            if not all(any(abs(t - s) <= 1e-6 * max(1.0, s) for s in stored) for t in temperatures):
                return None
            return {name: fh.get_tensor(name) for name in TENSORS}, stored
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
    from distill.settings import default_selection, pool_dir_of, selection_probabilities
    from imat.data import build_loader, resolve_paths
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
    if dcfg.method == "meal-v2" and dcfg.similarity in ("l1", "l2"):
        # l1/l2 compare raw logits; the cache keeps only the top-k ones, so they would silently compare
        # something else: refused rather than changed in meaning
        raise ImatError(
            f"distill.similarity: {dcfg.similarity} compares full teacher logits, which the teacher cache "
            f"does not keep; use ce, kl, l1_soft or l2_soft, or set distill.cache.enabled=false"
        )
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
        from imat.engine.runtime import resolve_device

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
            device=resolve_device(dcfg.train.device),
        )
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
