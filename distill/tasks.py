"""Distillation as task objects for the shared engine: MEAL (v1 blocks + random teacher, v2 mean of
teachers on the logits), KD (Hinton) and CE (the student alone).

The engine owns the loop; a task says what one step computes. MEAL's adversarial game comes in three
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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.align import Aligner
from distill.blocks import BlockIndex, extract_blocks
from distill.discriminator import Discriminator, bce, block_input_norm
from distill.grl import grad_reverse
from distill.losses import similarity, soft_cross_entropy, teacher_probs
from distill.teachers_runtime import FrozenTeacher, TeacherEnsemble
from imat.engine.task import Task


def hard_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy on the labelled rows: class indices with -1 for "no label" (extra images), or a label
    mass matrix from :func:`imat.data.mixing.mix_with_unlabelled` whose rows sum to each image's labelled
    share (a half-unlabelled mixed image counts half). Zero when nothing in the batch has a label."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if labels.dim() == 2:
        mass = labels.float().sum(-1, keepdim=True)
        if float(mass.sum()) <= 0:
            return logp.new_zeros(())
        target = (1 - smoothing) * labels.float() + smoothing / labels.shape[-1] * mass
        return -(target * logp).sum() / mass.sum()
    if not bool((labels >= 0).any()):
        return logp.new_zeros(())
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing, ignore_index=-1)


@contextlib.contextmanager
def frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Temporarily stop gradients into ``modules``' parameters (the student step must not train D)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


class DistillTaskBase(Task):
    """What every distillation task shares: the student, the frozen teachers' placement, defaults, and
    consistent teaching: ``mixup`` (see :func:`imat.data.mixing.build_label_mass_mixup`) mixes the batch
    once in :meth:`mixed`, before any network sees it, so every teacher scores exactly the image the
    student trains on (Beyer et al., CVPR 2022)."""

    manual_optimization = False

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, mixup: Any = None) -> None:
        super().__init__(model)
        self.label_smoothing = label_smoothing
        self.mixup = mixup

    def mixed(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with mixed images and a label-mass matrix, or unchanged without mixup."""
        if self.mixup is None:
            return batch
        from imat.data.mixing import mix_with_unlabelled

        images, labels = mix_with_unlabelled(self.mixup, batch["image"], batch["label"])
        return {**batch, "image": images, "label": labels}

    def frozen_teachers(self) -> list[FrozenTeacher]:
        """Teachers to move with the task (never checkpointed, never put in train mode by the engine)."""
        return []

    def to(self, device: torch.device, memory_format: torch.memory_format | None = None) -> Task:
        super().to(device, memory_format)
        for t in self.frozen_teachers():
            t.to(device)
            if memory_format is not None:
                t.model.to(memory_format=memory_format)
        return self

    @staticmethod
    def _autocast(ctx: Any) -> contextlib.AbstractContextManager:
        fn = getattr(ctx, "autocast", None)
        return fn() if fn is not None else contextlib.nullcontext()


class CETask(DistillTaskBase):
    """The student alone on the (possibly noisy) labels: the baseline every method must beat."""

    def step(self, batch: dict[str, Any], ctx: Any) -> dict[str, torch.Tensor]:
        batch = self.mixed(batch)
        with self._autocast(ctx):
            logits = self.model(batch["image"])
        loss = hard_loss(logits, batch["label"], self.label_smoothing)
        return {"loss": loss, "ce": loss.detach()}


class SoftTargets:
    """Where the teachers' soft labels come from: the live frozen ensemble, or the offline cache."""

    def __init__(
        self,
        ensemble: TeacherEnsemble | None,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        cache: Any = None,
    ) -> None:
        if ensemble is None and cache is None:
            raise ValueError("soft targets need teachers or a cache")
        self.ensemble = ensemble
        self.cache = cache
        self.mean = tuple(student_mean)
        self.std = tuple(student_std)

    def logits_probs(
        self, batch: dict[str, Any], temperature: float
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(mean teacher logits or None when cached, mean teacher probabilities at T)."""
        if self.cache is not None and "soft_index" in batch:
            probs = self.cache.dense(batch, temperature)
            return None, probs.to(batch["image"].device)
        assert self.ensemble is not None
        chosen = self.ensemble.pick()
        outs = [
            self.ensemble.teachers[i].blocks(batch["image"], ["logits"], self.mean, self.std)[0]
            for i in chosen
        ]
        raw = torch.stack([o.float() for o in outs]).mean(0)
        return raw, teacher_probs(outs, temperature)

    def extras(self) -> dict[str, float]:
        if self.cache is not None:
            return self.cache.pick_counts()
        return self.ensemble.pick_counts() if self.ensemble is not None else {}


class KDTask(DistillTaskBase):
    """Hinton KD from the pool's mean probabilities: alpha * T^2 * soft CE + (1 - alpha) * hard CE."""

    def __init__(
        self,
        model: nn.Module,
        targets: SoftTargets,
        alpha: float = 0.9,
        temperature: float = 4.0,
        label_smoothing: float = 0.0,
        mixup: Any = None,
    ) -> None:
        super().__init__(model, label_smoothing, mixup)
        self.targets = targets
        self.alpha = alpha
        self.temperature = temperature

    def step(self, batch: dict[str, Any], ctx: Any) -> dict[str, torch.Tensor]:
        batch = self.mixed(batch)
        with self._autocast(ctx):
            _, probs = self.targets.logits_probs(batch, self.temperature)
            logits = self.model(batch["image"])
        soft_l = soft_cross_entropy(logits, probs, self.temperature)
        hard = hard_loss(logits, batch["label"], self.label_smoothing)
        total = self.alpha * soft_l + (1 - self.alpha) * hard
        return {"loss": total, "kd_soft": soft_l.detach(), "ce": hard.detach()}

    def frozen_teachers(self) -> list[FrozenTeacher]:
        return self.targets.ensemble.teachers if self.targets.ensemble is not None else []

    def epoch_extras(self) -> dict[str, float]:
        return self.targets.extras()

    def state_dict(self) -> dict[str, Any]:
        e = self.targets.ensemble
        return {"ensemble": e.state_dict()} if e is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.targets.ensemble is not None and "ensemble" in state:
            self.targets.ensemble.load_state_dict(state["ensemble"])


class MealTask(DistillTaskBase):
    """MEAL: block-wise similarity to the selected teacher(s) plus one discriminator per block.

    ``student_indices[k]`` and ``teacher_indices[t][k]`` are block ``k`` resolved for the student and for
    teacher ``t`` (negative indices resolve per network). ``lengths[k]`` is L_k (None for logits).
    """

    def __init__(
        self,
        model: nn.Module,
        ensemble: TeacherEnsemble,
        student_indices: Sequence[BlockIndex],
        teacher_indices: Sequence[Sequence[BlockIndex]],
        lengths: Sequence[int | None],
        gammas: Sequence[float],
        etas: Sequence[float],
        dims: Sequence[int],
        student_mean: Sequence[float],
        student_std: Sequence[float],
        similarity_kind: str = "ce",
        temperature: float = 1.0,
        hard_label_weight: float = 0.0,
        spatial_pool: str = "avg",
        channel_reduce: str = "avg",
        adversarial: bool = True,
        mode: str = "alternating",
        disc_widths: Sequence[int] | str | None = None,
        disc_input_norm: str = "auto",
        disc_spectral_norm: bool = False,
        disc_lr: float = 1e-3,
        disc_weight_decay: float = 0.0,
        adv_weight: float = 1.0,
        grl_lambda: float = 1.0,
        label_smoothing: float = 0.0,
        disc_optimizer: dict[str, Any] | None = None,
        cache: Any = None,
        mixup: Any = None,
        d_steps: int = 1,
        per_teacher: bool = False,
        disc_condition: str = "none",
        num_classes: int | None = None,
    ) -> None:
        super().__init__(model, label_smoothing, mixup)
        n = len(student_indices)
        if not (len(lengths) == len(gammas) == len(etas) == len(dims) == n):
            raise ValueError("blocks, lengths, gammas, etas and dims must have one entry per block")
        if len(teacher_indices) != len(ensemble.teachers):
            raise ValueError("teacher_indices needs one list per teacher")
        if mode not in ("alternating", "grl", "joint"):
            raise ValueError(f"unknown adversarial mode {mode!r}")
        if disc_condition not in ("none", "teacher_class"):
            raise ValueError(f"unknown discriminator condition {disc_condition!r}")
        if disc_condition == "teacher_class" and num_classes is None:
            raise ValueError("a discriminator conditioned on the teacher's class needs num_classes")
        self.ensemble = ensemble
        self.student_indices = list(student_indices)
        self.teacher_indices = [list(t) for t in teacher_indices]
        self.aligners = [Aligner(L, spatial_pool, channel_reduce) for L in lengths]  # type: ignore[arg-type]
        self.gammas = list(gammas)
        self.etas = list(etas)
        self.mean = tuple(student_mean)
        self.std = tuple(student_std)
        self.similarity_kind = similarity_kind
        self.temperature = temperature
        self.hard_label_weight = hard_label_weight
        self.adversarial = adversarial
        self.mode = mode
        self.adv_weight = adv_weight
        self.grl_lambda = grl_lambda
        self.disc_lr = disc_lr
        self.disc_weight_decay = disc_weight_decay
        self.disc_optimizer = disc_optimizer  # engine optimizer_options for "disc" (alternating only)
        # Offline teacher outputs (logits block only): the teachers are not run; the discriminator then
        # compares log-probabilities, both sides truncated alike (TeacherCache.meal_vectors).
        self.cache = cache
        if cache is not None and any(i != "logits" for i in self.student_indices):
            raise ValueError("cached teacher outputs cover the logits block only")
        # One set of discriminators per teacher when one teacher is drawn per step: each then learns one
        # network's outputs against the student's, instead of chasing whichever teacher the last step drew.
        single_draw = ensemble.selection in ("random", "weighted") and cache is None
        self._sets = len(ensemble.teachers) if per_teacher and single_draw else 1
        self._set = 0  # the set of this step (the drawn teacher's)
        # conditioned on the class the teacher predicts for each image (distill/discriminator.py says why)
        self.conditional = adversarial and disc_condition == "teacher_class"
        self.teacher_class: torch.Tensor | None = None  # set by vectors() every step
        cond_classes = num_classes if self.conditional else None
        self.discriminators = nn.ModuleList(
            [
                Discriminator(
                    d,
                    disc_widths,
                    block_input_norm(disc_input_norm, index),
                    disc_spectral_norm,
                    num_classes=cond_classes,
                )
                for _ in range(self._sets)
                for d, index in zip(dims, self.student_indices, strict=True)
            ]
            if adversarial
            else []
        )
        self.manual_optimization = adversarial and mode == "alternating"
        self.d_steps = int(d_steps)
        self._acc = torch.zeros(max(n, 1), 2)
        self._acc_n = 0

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
            t_probs.append(teacher_probs(per_teacher, self.temperature))
        self.teacher_class = teacher_probs([out[-1] for out in t_outs]).argmax(-1)
        return s_vecs, t_raw, t_probs, s_logits

    def _similarity(
        self, s_vecs: list[torch.Tensor], t_raw: list[torch.Tensor], t_probs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        total = s_vecs[0].new_zeros((), dtype=torch.float32)
        for k, (s, tr, tp) in enumerate(zip(s_vecs, t_raw, t_probs, strict=True)):
            loss = similarity(self.similarity_kind, s, tr, tp, self.temperature)
            parts[f"sim_b{k}"] = loss.detach()
            total = total + self.gammas[k] * loss
        parts["sim"] = total.detach()
        return total, parts

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
            for d_step in range(self.d_steps):
                for p in self.discriminators.parameters():
                    p.grad = None
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
