"""Cached teacher outputs (FKD-style): run the teachers ONCE, reuse their soft labels every epoch.

Running every teacher on every batch dominates the cost of MEAL v2 and KD. Here, before training, each
training image gets ``views_per_image`` random-resized-crop views (box in source pixels + flip, seeded
per image and view); every teacher scores every view at its own input size and mean/std, and its top-k
LOGITS are stored with the view, together with the log-sum-exp of the other classes' logits / T for a
set of temperatures T (1, the tune space's 2..8 and the configured one). From these the soft label at
any stored T is exact for the top-k classes (softmax(z / T) restricted to them, the full normaliser
known) and exact in the tail's total mass, which is spread evenly over the other classes. During
training the student draws one of the stored views per image and epoch and is trained on exactly that
crop, so its soft label is the one the teachers gave to the pixels it sees. This module holds the
stored soft labels and their file; building them and training on the views is distill/cache_build.py.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from distill.teachers_runtime import FrozenTeacher, draw_teachers
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
