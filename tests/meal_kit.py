"""Shared by the MEAL unit tests: tiny timm nets, a batch, the slice of the engine's ctx a task uses,
and a MealTask with one or more teachers."""

from __future__ import annotations

import contextlib

import timm
import torch

from distill.discriminator import discriminator_loss
from distill.methods.meal import MealTask, ResolvedBlocks
from distill.teachers_runtime import FrozenTeacher, TeacherEnsemble
from imat.config.distill import DistillConfig

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


class Ctx:
    """The slice of the engine's ctx a task uses, with plain SGD optimisers."""

    device = torch.device("cpu")
    epoch = 0
    step = 0

    def __init__(self, task, lr: float = 0.05) -> None:
        self.opts = {
            name: torch.optim.SGD(groups, lr=lr, momentum=0.0) for name, groups in task.param_groups().items()
        }
        self.calls: list[str] = []

    def autocast(self):
        return contextlib.nullcontext()

    def optimize(self, name: str, loss: torch.Tensor) -> None:
        self.calls.append(name)
        opt = self.opts[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(self, task, batch) -> dict:
        """One engine step: manual tasks optimise themselves, others get backward + step of every optimiser."""
        if task.manual_optimization:
            return task.step(batch, self)
        for opt in self.opts.values():
            opt.zero_grad(set_to_none=True)
        out = task.step(batch, self)
        out["loss"].backward()
        for opt in self.opts.values():
            opt.step()
        return out


def tiny(seed: int, classes: int = 5, arch: str = "resnet10t") -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=classes)


def batch(n: int = 4, size: int = 32, classes: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 3, size, size, generator=g),
        "label": torch.randint(classes, (n,), generator=g),
        "index": torch.arange(n),
    }


def make_meal(
    mode: str,
    teachers: int = 1,
    gamma: float = 1.0,
    adversarial: bool = True,
    train_mode=False,
    condition: str = "none",
):
    student = tiny(100)
    ts = [
        FrozenTeacher(f"t{i}", tiny(i, arch="resnet18"), 40, MEAN, STD, train_mode) for i in range(teachers)
    ]
    ens = TeacherEnsemble(ts, "random" if teachers > 1 else "mean", seed=0)
    blocks = [2, "logits"]
    return meal_task(
        student,
        ens,
        blocks,
        [blocks] * teachers,
        lengths=[20, None],
        gamma=gamma,
        num_classes=5,
        adversarial=dict(enabled=adversarial, mode=mode, lr=0.05, condition=condition),
    )


def meal_config(
    indices, lengths, gamma: float = 1.0, adversarial=None, block_temperatures=None, **distill
) -> DistillConfig:
    """The ``distill`` section of a MEAL task on tiny networks: ``indices`` as the config gives them,
    adversarial defaults as the tests were written for (D on the student's optimiser, weight 1, no class
    condition) unless ``adversarial`` says otherwise."""
    adv = {"optimizer": "same", "weight": 1.0, "lr": 1e-3, "condition": "none", **(adversarial or {})}
    temps = block_temperatures or [None] * len(indices)
    blocks = [
        {"index": i, "length": L, "gamma": gamma, "eta": 1.0, "temperature": t}
        for i, L, t in zip(indices, lengths, temps, strict=True)
    ]
    # the aligner these task tests were written for (MEAL's official one: channel mean, T 1)
    distill = {"channel_reduce": "avg", "block_temperature": 1.0, **distill}
    return DistillConfig(blocks=blocks, adversarial=adv, **distill)


def meal_task(
    student,
    ens,
    student_indices,
    teacher_indices,
    lengths,
    num_classes: int,
    gamma: float = 1.0,
    adversarial=None,
    cache=None,
    mean=MEAN,
    std=STD,
    block_temperatures=None,
    **distill,
) -> MealTask:
    dcfg = meal_config(student_indices, lengths, gamma, adversarial, block_temperatures, **distill)
    return MealTask(
        student,
        ens,
        dcfg,
        ResolvedBlocks(list(student_indices), [list(t) for t in teacher_indices]),
        {"mean": mean, "std": std},
        num_classes,
        cache,
    )


def capture_vectors(task):
    seen = []
    orig = task.vectors

    def wrapped(b, c):
        out = orig(b, c)
        seen.append(out)
        return out

    task.vectors = wrapped
    return seen


def d_loss_on(discs, t_raw, s_vecs, cls=None) -> float:
    with torch.no_grad():
        return sum(
            float(discriminator_loss(d, t.detach(), s.detach(), cls))
            for d, t, s in zip(discs, t_raw, s_vecs, strict=True)
        )


def d_student_logit(discs, s_vecs, cls=None) -> float:
    """Mean D logit on student vectors: higher = D calls them teacher more = larger D error."""
    with torch.no_grad():
        return sum(float(d(s.detach(), cls).mean()) for d, s in zip(discs, s_vecs, strict=True))
