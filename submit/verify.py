"""How closely an exported model follows the PyTorch original, in the terms a leaderboard cares about.

``top3_agreement`` is the fraction of images whose *set* of three best classes is identical in both
models (order ignored): identical sets give an identical top-3 error on any labels, so this is the
number export gates on. The looser ``top1_in_top3`` (the reference's best class is among the
candidate's three) and the mean ``top3_overlap`` are reported beside it."""

from __future__ import annotations

from typing import Any

import numpy as np


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores per row, best first (stable for ties: lower index first)."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def agreement(reference: np.ndarray, candidate: np.ndarray, k: int = 3) -> dict[str, Any]:
    """Agreement figures between two (N, C) score arrays (logits or probabilities) for the same images."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {candidate.shape}")
    n = reference.shape[0]
    ref_k = topk_indices(reference, k)
    cand_k = topk_indices(candidate, k)
    same_top1 = ref_k[:, 0] == cand_k[:, 0]
    same_set = np.array([set(a) == set(b) for a, b in zip(ref_k, cand_k, strict=True)], dtype=bool)
    overlap = np.array([len(set(a) & set(b)) / ref_k.shape[1] for a, b in zip(ref_k, cand_k, strict=True)])
    top1_in = np.array([a[0] in set(b) for a, b in zip(ref_k, cand_k, strict=True)], dtype=bool)
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    return {
        "images": int(n),
        "top1_agreement": float(same_top1.mean()) if n else 0.0,
        f"top{k}_agreement": float(same_set.mean()) if n else 0.0,
        f"top{k}_overlap": float(overlap.mean()) if n else 0.0,
        f"top1_in_top{k}": float(top1_in.mean()) if n else 0.0,
        "max_abs_diff": float(diff.max()) if n else 0.0,
        "mean_abs_diff": float(diff.mean()) if n else 0.0,
    }


def accuracy_change(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray, k: int = 3
) -> dict[str, Any] | None:
    """Top-1/top-k accuracy of both models on the rows with a known label (>= 0), and the change
    (candidate - reference); None when no row has a label."""
    known = labels >= 0
    if not known.any():
        return None
    y = labels[known]
    out: dict[str, Any] = {"labelled_images": int(known.sum())}
    for name, scores in (("reference", reference[known]), ("candidate", candidate[known])):
        top = topk_indices(scores, k)
        out[f"{name}_top1_accuracy"] = float((top[:, 0] == y).mean())
        out[f"{name}_top{k}_accuracy"] = float((top == y[:, None]).any(axis=1).mean())
    out["top1_accuracy_change"] = out["candidate_top1_accuracy"] - out["reference_top1_accuracy"]
    out[f"top{k}_accuracy_change"] = out[f"candidate_top{k}_accuracy"] - out[f"reference_top{k}_accuracy"]
    return out
