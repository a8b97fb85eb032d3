"""Greedy forward selection of the teachers worth distilling.

Distilling from a teacher costs a forward pass per step, and a weak or redundant teacher can pull the
student down, so we keep only the teachers that make the ensemble better: start from the best single
teacher by the metric (top-3 by default: the leaderboard metric of these competitions) and keep adding
the teacher that improves the ensemble most, until none improves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from teachers.ensemble import ensemble_probs, topk_accuracy


@dataclass
class Selection:
    indices: list[int]  # selected teachers, in the order they were added
    names: list[str]
    score: float  # the ensemble's metric with the selected teachers
    history: list[tuple[str, float]] = field(default_factory=list)  # (teacher added, score after)
    metric: str = "top3"
    method: str = "mean"


def _score(probs: np.ndarray, labels: np.ndarray, members: list[int], method: str, k: int) -> float:
    if len(members) == 1:
        return topk_accuracy(probs[members[0]], labels, k)
    return topk_accuracy(ensemble_probs(probs, method, members), labels, k)


def greedy_select(
    probs: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str] | None = None,
    *,
    metric: str = "top3",
    method: str = "mean",
    min_gain: float = 0.0,
) -> Selection:
    """Forward selection over ``probs [T, N, C]`` by ensemble ``metric`` (``top1``/``top3``/``topK``).

    A teacher joins only when it raises the score by more than ``min_gain``; ties between candidates go
    to the one with the better top-1 for the ensemble, then to the earlier teacher (deterministic)."""
    if not metric.startswith("top") or not metric[3:].isdigit():
        raise ValueError(f"metric must be top1, top3, ..., got {metric!r}")
    k = int(metric[3:])
    t_count = probs.shape[0]
    names = list(names) if names is not None else [str(i) for i in range(t_count)]
    if len(names) != t_count:
        raise ValueError(f"{len(names)} names for {t_count} teachers")

    def key(members: list[int]) -> tuple[float, float]:
        # primary: the metric; secondary: top-1 (a finer signal when the metric ties)
        return (_score(probs, labels, members, method, k), _score(probs, labels, members, method, 1))

    first = max(range(t_count), key=lambda i: (key([i]), -i))
    chosen = [first]
    best = key(chosen)
    history = [(names[first], best[0])]
    while len(chosen) < t_count:
        candidates = [i for i in range(t_count) if i not in chosen]
        scored = [(key([*chosen, i]), -i, i) for i in candidates]
        top_key, _, top_i = max(scored)
        if top_key[0] - best[0] <= min_gain:
            break
        chosen.append(top_i)
        best = top_key
        history.append((names[top_i], best[0]))
    return Selection(chosen, [names[i] for i in chosen], best[0], history, metric, method)
