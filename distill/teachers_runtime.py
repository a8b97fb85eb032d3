"""Frozen teachers at training time: each sees the batch the way it was trained, none ever learns.

The loader normalises a batch with the STUDENT's mean/std at the student's input size. Each teacher was
trained with its own mean/std and input size, so its view is un-normalised, re-normalised with the
teacher's statistics and resized (bilinear) to the teacher's size. Teachers have ``requires_grad=False``,
run under ``torch.no_grad()`` and in eval mode (BN running statistics are neither used from the batch nor
updated) unless the legacy ``teacher_train_mode`` flag asks for MEAL v1's behaviour (BN on batch
statistics; running stats still never change because a copy of them is restored after each forward).

Selection: ``random`` draws one teacher per iteration, uniformly, for the whole batch (MEAL v1);
``weighted`` draws it with the probabilities of :func:`accuracy_weights` (a teacher's share grows with its
validation accuracy, so a weak teacher is rarely the one taught from); ``mean`` runs all teachers (MEAL v2,
KD). Picks are counted per teacher for the epoch log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distill.blocks import BlockIndex, extract_blocks


@dataclass
class FrozenTeacher:
    name: str
    model: nn.Module
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_mode: bool = False
    val_top1: float | None = None  # from pool.json: what weighted selection draws by
    _device: torch.device | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.train(self.train_mode)

    def to(self, device: torch.device) -> FrozenTeacher:
        if self._device != device:
            self.model.to(device)
            self._device = device
        return self

    def prepare(
        self, x: torch.Tensor, student_mean: Sequence[float], student_std: Sequence[float]
    ) -> torch.Tensor:
        """The student-normalised batch ``x`` as this teacher expects it (its mean/std and size)."""
        s_mean = torch.tensor(student_mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        s_std = torch.tensor(student_std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        t_mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        t_std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        x = x.float()
        if not (torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std)):
            x = (x * s_std + s_mean - t_mean) / t_std
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        return x

    @torch.no_grad()
    def blocks(
        self,
        x: torch.Tensor,
        indices: Sequence[BlockIndex],
        student_mean: Sequence[float],
        student_std: Sequence[float],
    ) -> list[torch.Tensor]:
        """The teacher's outputs at ``indices`` for the student-normalised batch ``x`` (no graph)."""
        self.to(x.device)
        xin = self.prepare(x, student_mean, student_std)
        if not self.train_mode:
            self.model.eval()
            return extract_blocks(self.model, xin, indices)
        # Legacy train-mode BN: batch statistics, but the running buffers are restored afterwards so the
        # frozen teacher stays bit-identical.
        saved = {
            k: v.clone() for k, v in self.model.state_dict().items() if "running" in k or "num_batches" in k
        }
        self.model.train()
        try:
            return extract_blocks(self.model, xin, indices)
        finally:
            sd = self.model.state_dict()
            for k, v in saved.items():
                sd[k].copy_(v)


def accuracy_weights(accuracies: Sequence[float], temperature: float) -> list[float]:
    """Drawing probabilities ``softmax(accuracy / temperature)``: at 0.03, a teacher 3 points below the
    best is drawn e times less often, one 15 points below about 150 times less."""
    acc = torch.tensor([float(a) for a in accuracies], dtype=torch.float64)
    return [float(p) for p in torch.softmax(acc / float(temperature), dim=0)]


def draw_teachers(
    selection: str, count: int, generator: torch.Generator, probabilities: torch.Tensor | None = None
) -> list[int]:
    """This step's teachers out of ``count``: one uniformly (``random``), one by ``probabilities``
    (``weighted``), or all of them (``mean``). Shared by the live ensemble and the teacher cache."""
    if selection == "random":
        return [int(torch.randint(count, (1,), generator=generator))]
    if selection == "weighted":
        if probabilities is None or len(probabilities) != count:
            raise ValueError("weighted selection needs one probability per teacher")
        return [int(torch.multinomial(probabilities, 1, generator=generator))]
    if selection == "mean":
        return list(range(count))
    raise ValueError(f"unknown teacher selection {selection!r}")


class TeacherEnsemble:
    """The frozen teachers plus the per-iteration selection and its pick counts."""

    def __init__(
        self,
        teachers: Sequence[FrozenTeacher],
        selection: str,
        seed: int = 0,
        probabilities: Sequence[float] | None = None,
    ) -> None:
        if not teachers:
            raise ValueError("at least one teacher is needed")
        if selection not in ("random", "mean", "weighted"):
            raise ValueError(f"unknown teacher selection {selection!r}")
        if selection == "weighted" and (probabilities is None or len(probabilities) != len(teachers)):
            raise ValueError("weighted selection needs one probability per teacher")
        self.teachers = list(teachers)
        self.selection = selection
        self.probabilities = torch.tensor(list(probabilities), dtype=torch.float64) if probabilities else None
        self.generator = torch.Generator().manual_seed(int(seed))
        self.picks = [0] * len(self.teachers)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.teachers]

    def pick(self) -> list[int]:
        """Indices of this iteration's teachers: one at random (uniformly or weighted), or all of them."""
        chosen = draw_teachers(self.selection, len(self.teachers), self.generator, self.probabilities)
        for i in chosen:
            self.picks[i] += 1
        return chosen

    def pick_counts(self, reset: bool = True) -> dict[str, float]:
        out = {f"pick_{t.name}": float(n) for t, n in zip(self.teachers, self.picks, strict=True)}
        if reset:
            self.picks = [0] * len(self.teachers)
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "picks": list(self.picks)}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
        if "picks" in state:
            self.picks = [int(v) for v in state["picks"]]
