"""One discriminator per matched block: a small MLP that tells teacher vectors from student vectors.

Trained with BCE-with-logits, teacher = 1, student = 0. No activation after the last layer: the official
MEAL code's final ReLU made the logit >= 0, so its discriminator could never say "student" with p < 0.5.

Defaults chosen so the adversarial term is never inert (measured in docs/BENCHMARKS.md, "Discriminators"):

- widths ``max(64, d/2), max(32, d/4)``: the paper's ``d/2, d/4`` makes a 10-class logits discriminator a
  10 -> 5 -> 2 -> 1 MLP, and with ReLU some fresh initialisations pass no gradient at all. ``"paper"``
  keeps the paper's widths (and its ReLU) reachable from config;
- LeakyReLU(0.2) between layers, so no unit is ever dead;
- input normalisation ``auto``: ``log_softmax`` for the logits block (both sides become log-distributions,
  which is what the similarity loss compares; raw logits differ by an arbitrary per-sample shift a
  discriminator would learn instead, and cached teacher outputs, already log-probabilities, stay
  unchanged by it, so both paths compare like with like) and ``standardize`` for a stage block: its
  aligned vector (channel means at L pooled positions) varies by a few hundredths around its mean, so
  its log-softmax is nearly flat and a discriminator on it needs hundreds of steps to grow weights large
  enough to see anything (it stayed at chance in every benchmark);
- optional spectral normalisation of every layer (a Lipschitz bound that keeps D from overpowering the
  student; Miyato et al., 2018);
- conditioned on the teacher's predicted class (``num_classes`` set): a projection discriminator
  (Miyato and Koyama, "cGANs with projection discriminator", 2018), logit = w . h(x) + e_c . h(x). An
  unconditional D only sees the marginal distribution of output vectors, which a student matches within
  an epoch (confident-looking outputs), right or wrong; it sat at chance from the first epoch in every
  benchmark. Given the class the teacher chose for THIS image, D can tell a student that is not yet
  confident where the teacher is, and drifts toward chance only as the student agrees with the teacher.
  The class is the teacher's prediction, not the label, so unlabelled images condition it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

InputNorm = Literal["none", "log_softmax", "standardize"]
CHANCE_BAND = 0.05  # balanced accuracy within 0.5 +- this counts as "at chance"


def default_widths(dim: int) -> list[int]:
    """Hidden widths for a ``dim``-wide input: at least 64 and 32 units, d/2 and d/4 when larger."""
    return [max(64, dim // 2), max(32, dim // 4)]


def paper_widths(dim: int) -> list[int]:
    """MEAL's d -> d/2 -> d/4 -> 1."""
    return [max(1, dim // 2), max(1, dim // 4)]


def block_input_norm(kind: str, index: int | str) -> str:
    """The normalisation a block's discriminator uses: ``auto`` resolved for a stage index or "logits"."""
    if kind != "auto":
        return kind
    return "log_softmax" if index == "logits" else "standardize"


def normalize_input(x: torch.Tensor, kind: str) -> torch.Tensor:
    """What a discriminator sees of a (B, d) vector."""
    x = x.float()
    if kind == "log_softmax":
        return F.log_softmax(x, dim=-1)
    if kind == "standardize":
        return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-6)
    if kind == "none":
        return x
    raise ValueError(f"unknown discriminator input normalisation {kind!r}")


class Discriminator(nn.Module):
    def __init__(
        self,
        dim: int,
        widths: Sequence[int] | str | None = None,
        input_norm: str = "log_softmax",  # one kind; "auto" is resolved per block by block_input_norm
        spectral_norm: bool = False,
        activation: str | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if widths == "paper":
            hidden, act = paper_widths(dim), activation or "relu"
        else:
            hidden = list(widths) if widths is not None else default_widths(dim)
            act = activation or "leaky_relu"
        normalize_input(torch.zeros(1, 2), input_norm)  # unknown kinds fail here, not mid-training
        layers: list[nn.Module] = []
        prev = dim
        for w in [*hidden, 1]:
            lin = nn.Linear(prev, w)
            layers.append(nn.utils.parametrizations.spectral_norm(lin) if spectral_norm else lin)
            layers.append(nn.LeakyReLU(0.2, inplace=True) if act == "leaky_relu" else nn.ReLU(inplace=True))
            prev = w
        layers.pop()  # no activation after the output logit
        self.net = nn.Sequential(*layers)
        self.dim = dim
        self.input_norm = input_norm
        self.num_classes = num_classes
        self.embed: nn.Module | None = None
        if num_classes is not None:
            embed = nn.Embedding(num_classes, prev_hidden(dim, hidden))
            nn.init.normal_(embed.weight, std=0.02)  # starts as the unconditional D, learns the classes
            self.embed = nn.utils.parametrizations.spectral_norm(embed) if spectral_norm else embed

    def forward(self, x: torch.Tensor, cls: torch.Tensor | None = None) -> torch.Tensor:
        """(B, d) [+ (B,) classes when conditional] -> (B,) logits of "this vector came from a teacher"."""
        x = normalize_input(x, self.input_norm)
        if self.embed is None:
            return self.net(x).squeeze(-1)
        if cls is None:
            raise ValueError("a class-conditional discriminator needs the class of every vector")
        h = self.net[:-1](x)  # the last hidden layer's activations
        return self.net[-1](h).squeeze(-1) + (self.embed(cls) * h).sum(-1)


def prev_hidden(dim: int, hidden: Sequence[int]) -> int:
    """Width of the layer that feeds the output logit."""
    return int(hidden[-1]) if hidden else dim


def bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def discriminator_loss(
    d: Discriminator, teacher: torch.Tensor, student: torch.Tensor, cls: torch.Tensor | None = None
) -> torch.Tensor:
    """BCE(D(teacher), 1) + BCE(D(student), 0), each a batch mean (``cls``: the condition, if any)."""
    return bce(d(teacher, cls), 1.0) + bce(d(student, cls), 0.0)


@torch.no_grad()
def accuracy(
    d: Discriminator, teacher: torch.Tensor, student: torch.Tensor, cls: torch.Tensor | None = None
) -> tuple[float, float]:
    """Fraction of teacher vectors called teacher, and of student vectors called student."""
    return float((d(teacher, cls) > 0).float().mean()), float((d(student, cls) <= 0).float().mean())


def is_inert(balanced_accuracy: Sequence[float]) -> bool:
    """True when every value (per epoch and block) is within CHANCE_BAND of 0.5: D never told them apart."""
    values = [float(v) for v in balanced_accuracy]
    return bool(values) and all(abs(v - 0.5) <= CHANCE_BAND for v in values)
