"""Classification metrics from logits: top-k accuracy and error, confusion matrices.

Accuracies are fractions in [0, 1] (not percentages) so that ``1 - top3`` is directly the competition's
top-3 error. Rows whose label is negative (unknown) are ignored everywhere, because a manifest marks
unlabelled images with -1 and they must never count as wrong answers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _valid(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.ndim != 2:
        raise ValueError(f"logits must be N x C, got shape {tuple(logits.shape)}")
    labels = labels.reshape(-1).to(logits.device)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows but {labels.shape[0]} labels")
    keep = labels >= 0
    if not bool(keep.all()):
        logits, labels = logits[keep], labels[keep]
    return logits, labels


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 3)) -> dict[int, int]:
    """Number of rows whose label is among the k highest logits, for each k.

    A k larger than the number of classes is clamped to it (top-3 of a 2-class problem is always right),
    so small test problems and real ones share one code path.
    """
    ks = tuple(ks)
    logits, labels = _valid(logits, labels)
    if logits.shape[0] == 0:
        return {k: 0 for k in ks}
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # N x kmax, best first
    hit = top.eq(labels[:, None])
    return {k: int(hit[:, : min(k, kmax)].any(dim=1).sum().item()) for k in ks}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 3)) -> dict[str, float]:
    """``{"top1": fraction, "top3": fraction}`` over the labelled rows (nan when there are none)."""
    ks = tuple(ks)
    n = int((labels.reshape(-1) >= 0).sum().item())
    correct = topk_correct(logits, labels, ks)
    return {f"top{k}": (correct[k] / n if n else float("nan")) for k in ks}


def topk_error(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 3)) -> dict[str, float]:
    """``{"top1_err": 1 - top1, "top3_err": 1 - top3}``: what competitions score and tune minimises."""
    return {f"{key}_err": 1.0 - value for key, value in topk_accuracy(logits, labels, ks).items()}


def confusion_matrix(preds_or_logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``num_classes x num_classes`` int64 counts, rows = true label, columns = predicted label.

    Accepts either predicted indices (N) or logits (N x C, arg-maxed here).
    """
    preds = preds_or_logits.argmax(dim=1) if preds_or_logits.ndim == 2 else preds_or_logits
    preds = preds.reshape(-1).long().cpu()
    labels = labels.reshape(-1).long().cpu()
    keep = labels >= 0
    preds, labels = preds[keep], labels[keep]
    flat = labels * num_classes + preds
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Recall of each class from a confusion matrix (nan for classes without samples)."""
    totals = confusion.sum(dim=1).double()
    return confusion.diagonal().double() / totals.where(totals > 0, torch.full_like(totals, float("nan")))


class TopKMeter:
    """Accumulates loss and top-k hits over batches without a host sync per batch.

    Counts stay on the logits' device until :meth:`compute`, so evaluating on a GPU costs one
    synchronisation per pass instead of one per batch.
    """

    def __init__(self, ks: Iterable[int] = (1, 3)) -> None:
        self.ks = tuple(ks)
        self.reset()

    def reset(self) -> None:
        self._hits: dict[int, torch.Tensor | int] = {k: 0 for k in self.ks}
        self._loss_sum: torch.Tensor | float = 0.0
        self._n: torch.Tensor | int = 0

    @torch.no_grad()
    def update(
        self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor | None = None
    ) -> None:
        """Add a batch; ``loss_sum`` is the summed (not averaged) loss over its labelled rows."""
        logits, labels = _valid(logits.detach(), labels)
        if logits.shape[0] == 0:
            return
        kmax = min(max(self.ks), logits.shape[1])
        hit = logits.topk(kmax, dim=1).indices.eq(labels[:, None])
        for k in self.ks:
            self._hits[k] = self._hits[k] + hit[:, : min(k, kmax)].any(dim=1).sum()
        self._n = self._n + logits.shape[0]
        if loss_sum is not None:
            self._loss_sum = self._loss_sum + loss_sum.detach().float()

    def compute(self) -> dict[str, float]:
        """``{"loss", "top1", "top3", "top1_err", "top3_err", "n"}`` (nan when nothing was labelled)."""
        n = int(self._n)
        out: dict[str, float] = {"loss": float(self._loss_sum) / n if n else float("nan")}
        for k in self.ks:
            acc = float(self._hits[k]) / n if n else float("nan")
            out[f"top{k}"] = acc
            out[f"top{k}_err"] = 1.0 - acc
        out["n"] = n
        return out
