from __future__ import annotations

import math

import pytest
import torch

from imat.metrics import (
    TopKMeter,
    confusion_matrix,
    per_class_accuracy,
    topk_accuracy,
    topk_correct,
    topk_error,
)

# 4 classes, 5 rows. Ranking of each row (best first) written next to it.
LOGITS = torch.tensor(
    [
        [0.9, 0.5, 0.1, 0.0],  # 0,1,2,3
        [0.1, 0.2, 0.3, 0.4],  # 3,2,1,0
        [0.0, 1.0, 2.0, 3.0],  # 3,2,1,0
        [5.0, 4.0, 3.0, 6.0],  # 3,0,1,2
        [0.3, 0.1, 0.2, 0.0],  # 0,2,1,3
    ]
)
LABELS = torch.tensor([0, 1, 0, 2, 2])
# row0: label 0 is rank 1 -> top1 hit; row1: label 1 rank 3 -> top3 hit; row2: label 0 rank 4 -> miss;
# row3: label 2 rank 4 -> miss; row4: label 2 rank 2 -> top3 hit.


def test_topk_by_hand() -> None:
    assert topk_correct(LOGITS, LABELS, (1, 2, 3)) == {1: 1, 2: 2, 3: 3}
    acc = topk_accuracy(LOGITS, LABELS)
    assert acc == {"top1": pytest.approx(1 / 5), "top3": pytest.approx(3 / 5)}
    err = topk_error(LOGITS, LABELS)
    assert err == {"top1_err": pytest.approx(4 / 5), "top3_err": pytest.approx(2 / 5)}


def test_unknown_labels_are_ignored_and_k_is_clamped() -> None:
    labels = torch.tensor([0, -1, -1, -1, 2])  # only rows 0 (top1 hit) and 4 (top2 hit) count
    assert topk_accuracy(LOGITS, labels) == {"top1": 0.5, "top3": 1.0}
    two_class = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    assert topk_accuracy(two_class, torch.tensor([0, 1]), (1, 3)) == {"top1": 0.0, "top3": 1.0}
    assert math.isnan(topk_accuracy(LOGITS, torch.full((5,), -1))["top1"])


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        topk_correct(LOGITS, LABELS[:3])
    with pytest.raises(ValueError):
        topk_correct(LOGITS[0], LABELS[:1])


def test_meter_matches_function_over_batches() -> None:
    meter = TopKMeter((1, 3))
    losses = torch.nn.functional.cross_entropy(LOGITS, LABELS, reduction="none")
    meter.update(LOGITS[:2], LABELS[:2], losses[:2].sum())
    meter.update(LOGITS[2:], LABELS[2:], losses[2:].sum())
    out = meter.compute()
    assert out["n"] == 5
    assert out["top1"] == pytest.approx(0.2) and out["top3"] == pytest.approx(0.6)
    assert out["top3_err"] == pytest.approx(0.4)
    assert out["loss"] == pytest.approx(losses.mean().item())


def test_confusion_matrix() -> None:
    cm = confusion_matrix(LOGITS, LABELS, 4)
    # predictions (argmax): 0, 3, 3, 3, 0 ; labels 0, 1, 0, 2, 2
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in [(0, 0), (1, 3), (0, 3), (2, 3), (2, 0)]:
        expected[t, p] += 1
    assert torch.equal(cm, expected)
    assert torch.equal(confusion_matrix(torch.tensor([0, 3, 3, 3, 0]), LABELS, 4), expected)
    recall = per_class_accuracy(cm)
    assert recall[0].item() == pytest.approx(0.5) and recall[1].item() == 0.0 and math.isnan(recall[3].item())
