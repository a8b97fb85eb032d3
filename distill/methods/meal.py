"""MEAL (Shen et al. 2019): block-wise similarity to the selected teacher(s) plus one discriminator per block.

The engine owns the loop; the task says what one step computes. MEAL's adversarial game comes in three
modes:

- ``alternating`` (default, ``manual_optimization = True``): a discriminator step on detached vectors
  (teacher = 1, student = 0), then a student step whose adversarial loss is BCE(D(student), 1): the
  student is rewarded for being classified as a teacher. Two optimisers, ``main`` and ``disc``.
- ``grl``: one backward through a gradient-reversal layer in front of each discriminator's student input:
  D minimises its BCE, the student receives the negated gradient. One optimiser with two groups.
- ``joint``: MEAL's official code: total = similarity + D loss, one step over student and D, so the
  student also MINIMISES the D loss (it is pushed away from the teacher). Kept for reproduction only.

In every mode the discriminators have their own base lr (``adversarial.lr``); the engine scales each
param group's schedule from its own base lr, so the student's and the discriminators' rates follow the
same schedule shape independently (MEAL v2's code overwrote the discriminators' rate).

Every epoch each block logs ``t_entropy_b{k}`` (the teachers' vector entropy), ``t_entropy_uniform_b{k}``
(ln L, its value when the vectors say nothing) and ``sim_kl_b{k}`` (the KL term: the part of the soft
loss that aligning the student can reduce).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distill.align import Aligner
from distill.blocks import BlockIndex, extract_blocks, num_blocks, resolve_index
from distill.discriminator import Discriminator, bce, block_input_norm
from distill.grl import grad_reverse
from distill.losses import kl_divergence, similarity, teacher_probs
from distill.methods.base import DistillMethod, MethodInputs, register_method
from distill.tasks import DistillTaskBase, frozen, hard_loss
from distill.teachers_runtime import FrozenTeacher, TeacherEnsemble
from imat.config.distill import AdversarialConfig, DistillConfig
from imat.errors import ImatError

log = logging.getLogger(__name__)


@dataclass
class ResolvedBlocks:
    """``distill.blocks`` resolved per network: ``student[k]`` and ``teachers[t][k]`` are block ``k``'s
    stage index in the student and in teacher ``t`` (negative indices resolve per network), or "logits"."""

    student: list[BlockIndex]
    teachers: list[list[BlockIndex]]


def resolve_blocks(
    dcfg: DistillConfig, student: nn.Module, teachers: Sequence[FrozenTeacher]
) -> ResolvedBlocks:
    """Each block's index in every network; a missing stage is a one-line error naming the network."""
    s_count = num_blocks(student)
    s_idx = [resolve_index(b.index, s_count, f"student {dcfg.student.arch}") for b in dcfg.blocks]
    t_idx = []
    for t in teachers:
        count = num_blocks(t.model)
        t_idx.append([resolve_index(b.index, count, f"teacher {t.name}") for b in dcfg.blocks])
    return ResolvedBlocks(s_idx, t_idx)


def stage_map_sizes(model: nn.Module, input_size: int | Sequence[int]) -> list[tuple[int, int]] | None:
    """(H, W) of each stage output at ``input_size`` from timm's ``feature_info`` reductions (no forward);
    None when the network does not declare them."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not all(isinstance(f, dict) and "reduction" in f for f in info):
        return None
    size = [input_size, input_size] if isinstance(input_size, int) else list(input_size)[-2:]
    h, w = int(size[0]), int(size[1])
    return [(math.ceil(h / f["reduction"]), math.ceil(w / f["reduction"])) for f in info]


def warn_small_blocks(
    dcfg: DistillConfig,
    who: str,
    model: nn.Module,
    input_size: int | Sequence[int],
    indices: Sequence[BlockIndex],
) -> list[str]:
    """One warning per stage block whose feature map has fewer positions than its pooled length L: the
    adaptive pool then repeats values, so the vector holds only H*W distinct numbers (a 2x2 stage pooled
    to 16 is 4 values, each 4 times). Names the block, its map and a stage that would hold L positions."""
    sizes = stage_map_sizes(model, input_size)
    if sizes is None:
        return []
    side = input_size if isinstance(input_size, int) else list(input_size)[-1]
    out = []
    for k, (b, idx) in enumerate(zip(dcfg.blocks, indices, strict=True)):
        if idx == "logits" or b.length is None:
            continue
        h, w = sizes[int(idx)]
        if h * w >= b.length:
            continue
        fits = [i for i, (hh, ww) in enumerate(sizes) if hh * ww >= b.length]
        hint = (
            f"use stage {fits[-1]} ({sizes[fits[-1]][0]}x{sizes[fits[-1]][1]}) or length <= {h * w}"
            if fits
            else f"use length <= {h * w}"
        )
        msg = (
            f"distill.blocks.{k}: stage {b.index} of {who} is {h}x{w} at {side} px ({h * w} positions) for "
            f"length {b.length}: its vector repeats values; {hint}"
        )
        log.warning(msg)
        out.append(msg)
    return out


def check_logits_length(dcfg: DistillConfig, num_classes: int) -> None:
    for i, b in enumerate(dcfg.blocks):
        if b.index == "logits" and b.length is not None and b.length != num_classes:
            raise ImatError(
                f"distill.blocks.{i}.length: the logits block has the class count {num_classes}, not {b.length}"
            )


def disc_optimizer_options(adv: AdversarialConfig) -> dict[str, Any] | None:
    """The discriminators' own optimiser (alternating mode), or None for the student's recipe one."""
    optimizer = "adam" if adv.optimizer == "auto" and adv.mode == "alternating" else adv.optimizer
    if optimizer in ("same", "auto"):
        return None
    out: dict[str, Any] = {"optimizer": optimizer, "weight_decay": adv.weight_decay}
    if optimizer in ("adam", "adamw"):
        out["betas"] = tuple(adv.betas)
    return out


class MealTask(DistillTaskBase):
    """MEAL: block-wise similarity to the selected teacher(s) plus one discriminator per block.

    ``student_indices[k]`` and ``teacher_indices[t][k]`` are block ``k`` resolved for the student and for
    teacher ``t`` (negative indices resolve per network). ``lengths[k]`` is L_k (None for logits).
    """

    def __init__(
        self,
        model: nn.Module,
        ensemble: TeacherEnsemble,
        dcfg: DistillConfig,
        blocks: ResolvedBlocks,
        student_data: dict[str, Any],
        num_classes: int,
        cache: Any = None,
        mixup: Any = None,
    ) -> None:
        super().__init__(model, dcfg.train.aug.label_smoothing, mixup)
        specs = dcfg.blocks
        if not (len(blocks.student) == len(specs)):
            raise ValueError("the resolved blocks need one student index per distill.blocks entry")
        if len(blocks.teachers) != len(ensemble.teachers):
            raise ValueError("the resolved blocks need one index list per teacher")
        adv = dcfg.adversarial
        self.ensemble = ensemble
        self.num_classes = num_classes
        self.student_indices = list(blocks.student)
        self.teacher_indices = [list(t) for t in blocks.teachers]
        lengths = [None if b.index == "logits" else b.length for b in specs]
        dims = [num_classes if L is None else int(L) for L in lengths]
        self.aligners = [Aligner(L, dcfg.spatial_pool, dcfg.channel_reduce) for L in lengths]  # type: ignore[arg-type]
        self.gammas = [b.gamma for b in specs]
        self.etas = [b.eta for b in specs]
        self.mean = tuple(student_data["mean"])
        self.std = tuple(student_data["std"])
        self.similarity_kind = dcfg.similarity
        self.temperature = dcfg.temperature
        # each block's softmax temperature: the logits' distill.temperature, a stage block's own or else
        # distill.block_temperature
        self.temperatures = [
            dcfg.temperature
            if b.index == "logits"
            else (b.temperature if b.temperature is not None else dcfg.block_temperature)
            for b in specs
        ]
        self.hard_label_weight = dcfg.hard_label_weight
        self.adversarial = adv.enabled
        self.mode = adv.mode
        self.adv_weight = adv.student_weight()
        self.grl_lambda = adv.grl_lambda
        self.disc_lr = adv.lr
        self.disc_weight_decay = adv.weight_decay
        self.disc_optimizer = disc_optimizer_options(adv)  # engine optimizer_options for "disc"
        # Offline teacher outputs (logits block only): the teachers are not run; the discriminator then
        # compares log-probabilities, both sides truncated alike (TeacherCache.meal_vectors).
        self.cache = cache
        if cache is not None and any(i != "logits" for i in self.student_indices):
            raise ValueError("cached teacher outputs cover the logits block only")
        # One set of discriminators per teacher when one teacher is drawn per step: each then learns one
        # network's outputs against the student's, instead of chasing whichever teacher the last step drew.
        single_draw = ensemble.selection in ("random", "weighted") and cache is None
        self._sets = len(ensemble.teachers) if adv.per_teacher and single_draw else 1
        self._set = 0  # the set of this step (the drawn teacher's)
        # conditioned on the class the teacher predicts for each image (distill/discriminator.py says why)
        self.conditional = adv.enabled and adv.condition == "teacher_class"
        self.teacher_class: torch.Tensor | None = None  # set by vectors() every step
        cond_classes = num_classes if self.conditional else None
        self.discriminators = nn.ModuleList(
            [
                Discriminator(
                    d,
                    adv.widths,
                    block_input_norm(adv.input_norm, index),
                    adv.spectral_norm,
                    num_classes=cond_classes,
                )
                for _ in range(self._sets)
                for d, index in zip(dims, self.student_indices, strict=True)
            ]
            if adv.enabled
            else []
        )
        self.manual_optimization = adv.enabled and adv.mode == "alternating"
        self.d_steps = int(adv.d_steps)
        n = len(specs)
        self._acc = torch.zeros(max(n, 1), 2)
        self._acc_n = 0
        # per block: summed (teacher entropy, KL) on the step's device (no host sync per step), and steps
        self._info: list[torch.Tensor | None] = [None] * n
        self._info_n = [0] * n

    # -- engine hooks -------------------------------------------------------------------------------
    def frozen_teachers(self) -> list[FrozenTeacher]:
        return self.ensemble.teachers

    def optimizer_options(self) -> dict[str, dict[str, Any]]:
        if self.manual_optimization and self.disc_optimizer is not None:
            return {"disc": dict(self.disc_optimizer)}
        return {}

    def modules(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"model": self.model}
        if self.adversarial:
            out["disc"] = self.discriminators
        return out

    def param_groups(self) -> dict[str, list[dict[str, Any]]]:
        main = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        if not self.adversarial:
            return {"main": main}
        disc = [
            {
                "params": list(self.discriminators.parameters()),
                "lr": self.disc_lr,
                "weight_decay": self.disc_weight_decay,
            }
        ]
        if self.manual_optimization:
            return {"main": main, "disc": disc}
        return {"main": main + disc}  # one step over both, each group from its own base lr

    def epoch_extras(self) -> dict[str, float]:
        out = self.cache.pick_counts() if self.cache is not None else self.ensemble.pick_counts()
        if self.adversarial and self._acc_n:
            acc = self._acc / self._acc_n
            for k in range(len(self.aligners)):
                out[f"d_acc_teacher_b{k}"] = float(acc[k, 0])
                out[f"d_acc_student_b{k}"] = float(acc[k, 1])
                out[f"d_acc_b{k}"] = float(acc[k].mean())  # balanced accuracy: 0.5 is chance
        self._acc.zero_()
        self._acc_n = 0
        for k, al in enumerate(self.aligners):
            info = self._info[k]
            if info is not None and self._info_n[k]:
                entropy, kl = (info / self._info_n[k]).tolist()
                width = al.length if al.length is not None else self.num_classes
                out[f"t_entropy_b{k}"] = entropy
                out[f"t_entropy_uniform_b{k}"] = math.log(width)  # ln L: a block whose vectors say nothing
                out[f"sim_kl_b{k}"] = kl
        self._info = [None] * len(self._info)
        self._info_n = [0] * len(self._info_n)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"ensemble": self.ensemble.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ensemble" in state:
            self.ensemble.load_state_dict(state["ensemble"])

    # -- the step ------------------------------------------------------------------------------------
    def vectors(
        self, batch: dict[str, Any], ctx: Any
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """(student vectors, teacher raw vectors, teacher probabilities at T, student logits) per block.
        Also sets ``self.teacher_class``: the class the step's teacher(s) predict for each image."""
        x = batch["image"]
        if self.cache is not None and "soft_index" in batch:
            with self._autocast(ctx):
                s_logits = self.model(x)
            s_vec, t_vec, probs_t = self.cache.meal_vectors(batch, s_logits, self.temperature)
            self.teacher_class = probs_t.argmax(-1)
            n = len(self.aligners)
            return [s_vec] * n, [t_vec] * n, [probs_t] * n, s_logits
        chosen = self.ensemble.pick()
        self._set = chosen[0] if self._sets > 1 else 0
        want = list(self.student_indices)
        if "logits" not in want:
            want.append("logits")
        with self._autocast(ctx):
            s_out = extract_blocks(self.model, x, want)
            # the teachers' logits too (same forward), for the class their prediction conditions D on
            t_outs = [
                self.ensemble.teachers[i].blocks(x, [*self.teacher_indices[i], "logits"], self.mean, self.std)
                for i in chosen
            ]
        s_logits = s_out[want.index("logits")]  # the logits block may sit anywhere in the block list
        s_vecs = [al(s_out[k]) for k, al in enumerate(self.aligners)]
        t_raw, t_probs = [], []
        for k, al in enumerate(self.aligners):
            per_teacher = [al(out[k]).float() for out in t_outs]
            t_raw.append(torch.stack(per_teacher).mean(0) if len(per_teacher) > 1 else per_teacher[0])
            t_probs.append(teacher_probs(per_teacher, self.temperatures[k]))
        self.teacher_class = teacher_probs([out[-1] for out in t_outs]).argmax(-1)
        return s_vecs, t_raw, t_probs, s_logits

    def _similarity(
        self, s_vecs: list[torch.Tensor], t_raw: list[torch.Tensor], t_probs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        total = s_vecs[0].new_zeros((), dtype=torch.float32)
        for k, (s, tr, tp) in enumerate(zip(s_vecs, t_raw, t_probs, strict=True)):
            loss = similarity(self.similarity_kind, s, tr, tp, self.temperatures[k])
            parts[f"sim_b{k}"] = loss.detach()
            total = total + self.gammas[k] * loss
            self._record_block(k, s, tp)
        parts["sim"] = total.detach()
        return total, parts

    def _record_block(self, k: int, s: torch.Tensor, tp: torch.Tensor) -> None:
        """Accumulate block ``k``'s information figures for the epoch: the teachers' vector entropy (ln L
        when their softmax is uniform: a block that carries nothing) and the KL term, the part of the soft
        loss that aligning the student can reduce (CE = teacher entropy + KL)."""
        with torch.no_grad():
            tp = tp.detach().float()
            entropy = -(tp * tp.clamp_min(1e-12).log()).sum(-1).mean()
            kl = kl_divergence(s.detach(), tp, self.temperatures[k])
            stats = torch.stack([entropy, kl]).double()
        prev = self._info[k]
        self._info[k] = stats if prev is None else prev + stats
        self._info_n[k] += 1

    def active_discriminators(self) -> list[Discriminator]:
        """This step's discriminator per block (the drawn teacher's set with per-teacher ones)."""
        n = len(self.aligners)
        return [self.discriminators[self._set * n + k] for k in range(n)]  # type: ignore[misc]

    def _d(self, d: Discriminator, v: torch.Tensor) -> torch.Tensor:
        """D's logit for vectors ``v`` of this step (conditioned on the teacher's class when set)."""
        return d(v, self.teacher_class if self.conditional else None)

    def _record_acc(self, k: int, d_teacher: torch.Tensor, d_student: torch.Tensor) -> None:
        self._acc[k, 0] += float((d_teacher.detach() > 0).float().mean())
        self._acc[k, 1] += float((d_student.detach() <= 0).float().mean())

    def step(self, batch: dict[str, Any], ctx: Any) -> dict[str, torch.Tensor]:
        if self.adversarial:
            self.discriminators.to(batch["image"].device)
        batch = self.mixed(batch)
        s_vecs, t_raw, t_probs, s_logits = self.vectors(batch, ctx)
        # cached targets: s_vecs is the student's top-k view for D; the similarity sees its full logits
        cached = self.cache is not None and "soft_index" in batch
        sim, parts = self._similarity([s_logits] * len(s_vecs) if cached else s_vecs, t_raw, t_probs)
        total = sim
        if self.hard_label_weight > 0:
            hard = hard_loss(s_logits, batch["label"], self.label_smoothing)
            parts["ce"] = hard.detach()
            total = total + self.hard_label_weight * hard
        if not self.adversarial:
            parts["loss"] = total
            return parts
        n = len(self.discriminators)
        if self.mode == "alternating":
            # 1) discriminator step(s) on detached vectors; accuracy is recorded before the first update,
            #    on vectors D has not been trained on (a held-out figure, not a training one)
            #    (the engine clears D's gradients: per step, or at a cycle's start when accumulating)
            for d_step in range(self.d_steps):
                d_total = s_vecs[0].new_zeros((), dtype=torch.float32)
                for k, d in enumerate(self.active_discriminators()):
                    dt, ds = self._d(d, t_raw[k].detach()), self._d(d, s_vecs[k].detach())
                    if d_step == 0:
                        self._record_acc(k, dt, ds)
                    d_total = d_total + self.etas[k] * (bce(dt, 1.0) + bce(ds, 0.0))
                ctx.optimize("disc", d_total)
            # 2) student step: similarity + being classified as teacher (D frozen for this step)
            adv = s_vecs[0].new_zeros((), dtype=torch.float32)
            with frozen([self.discriminators]):
                for k, d in enumerate(self.active_discriminators()):
                    adv = adv + self.etas[k] * bce(self._d(d, s_vecs[k]), 1.0)
            total = total + self.adv_weight * adv
            ctx.optimize("main", total)
            parts.update({"loss": total.detach(), "adv": adv.detach(), "d_loss": d_total.detach()})
        else:
            d_total = s_vecs[0].new_zeros((), dtype=torch.float32)
            for k, d in enumerate(self.active_discriminators()):
                dt = self._d(d, t_raw[k].detach())
                if self.mode == "grl":
                    ds = self._d(d, grad_reverse(s_vecs[k], self.grl_lambda * self.adv_weight))
                else:  # joint: the official code, the student minimises D's loss too
                    ds = self._d(d, s_vecs[k])
                self._record_acc(k, dt, ds)
                d_total = d_total + self.etas[k] * (bce(dt, 1.0) + bce(ds, 0.0))
            total = total + d_total
            parts.update({"loss": total, "d_loss": d_total.detach()})
        self._acc_n += 1 if n else 0
        return parts


@register_method
class Meal(DistillMethod):
    """MEAL v1: stage blocks and/or logits, one teacher drawn per step by default."""

    name = "meal"

    @classmethod
    def default_selection(cls, dcfg: DistillConfig, teachers: Sequence[FrozenTeacher]) -> str:
        """One teacher per step, by validation accuracy (``weighted``) when pool.json holds every
        teacher's, else uniformly. Weighted is the default because a uniform draw lets a weak teacher
        teach its share of the steps: in the reduced CIFAR-10 benchmark a 42%-error teacher drawn a third
        of the time put uniform MEAL 3.3 points behind the student alone, and the weighted draw brought it
        level (docs/BENCHMARKS.md)."""
        known = len(teachers) > 1 and all(t.val_top1 is not None for t in teachers)
        return "weighted" if known else "random"

    @classmethod
    def check(cls, dcfg: DistillConfig) -> None:
        if not dcfg.blocks:
            raise ImatError("distill.blocks: MEAL needs at least one block (e.g. [{index: logits}])")
        for i, b in enumerate(dcfg.blocks):
            if b.index == "logits" and b.temperature is not None:
                raise ImatError(
                    f"distill.blocks.{i}.temperature: the logits block uses distill.temperature (a block's "
                    f"own temperature is for stage blocks)"
                )

    @classmethod
    def tune_space(cls, cfg: Any) -> dict[str, dict[str, Any]]:
        """The discriminators' lr (a decade either side) and the similarity weight of the logits block
        (or the first block; 1/4 to 4x), each around the config's own value."""
        d = cfg.distill
        space: dict[str, dict[str, Any]] = {}
        if d.adversarial.enabled:
            a = float(d.adversarial.lr)
            space["distill.adversarial.lr"] = {"type": "loguniform", "low": a / 10, "high": a * 10}
        k = next((i for i, b in enumerate(d.blocks) if b.index == "logits"), 0)
        gamma = float(d.blocks[k].gamma) if d.blocks else 0.0
        if gamma > 0:
            space[f"distill.blocks.{k}.gamma"] = {"type": "loguniform", "low": gamma / 4, "high": gamma * 4}
        return space

    @classmethod
    def build_task(cls, dcfg: DistillConfig, inputs: MethodInputs) -> DistillTaskBase:
        if inputs.ensemble is None:
            raise ValueError("MEAL needs teachers")
        blocks = resolve_blocks(dcfg, inputs.student, inputs.teachers)
        check_logits_length(dcfg, inputs.num_classes)
        size = inputs.student_data.get("input_size", (3, 224, 224))
        warn_small_blocks(dcfg, f"student {dcfg.student.arch}", inputs.student, size, blocks.student)
        for t, idx in zip(inputs.teachers, blocks.teachers, strict=True):
            warn_small_blocks(dcfg, f"teacher {t.name}", t.model, t.input_size, idx)
        return MealTask(
            inputs.student,
            inputs.ensemble,
            dcfg,
            blocks,
            inputs.student_data,
            inputs.num_classes,
            inputs.cache,
            inputs.mixup,
        )
