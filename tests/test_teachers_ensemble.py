"""teachers.ensemble and teachers.select: probabilities, mean/geomean ensembles, top-k, greedy selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from imat.errors import ImatError
from teachers.ensemble import ensemble_probs, evaluate_probs, predict_probs, topk_accuracy
from teachers.select import greedy_select


class Fixed(nn.Module):
    """Logits = a fixed linear map of the mean pixel per channel: easy to compute by hand."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :, :2].mean(dim=(2, 3)) @ self.weight  # left columns only: a flip changes it


def _batches(images: torch.Tensor, bs: int = 3):
    for start in range(0, len(images), bs):
        yield {
            "image": images[start : start + bs],
            "index": torch.arange(start, min(start + bs, len(images))),
        }


def test_ensemble_matches_hand_computed_softmax():
    torch.manual_seed(0)
    images = torch.randn(7, 3, 4, 4)
    models = [Fixed(torch.randn(3, 5)), Fixed(torch.randn(3, 5))]
    probs = np.stack([predict_probs(m, _batches(images), 7)[0] for m in models])
    hand = [torch.softmax(m(images), 1).detach().numpy() for m in models]
    np.testing.assert_allclose(probs[0], hand[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ensemble_probs(probs, "mean"), (hand[0] + hand[1]) / 2, rtol=1e-5, atol=1e-6)
    geo = np.sqrt(hand[0] * hand[1])
    geo /= geo.sum(1, keepdims=True)
    np.testing.assert_allclose(ensemble_probs(probs, "geomean"), geo, rtol=1e-4, atol=1e-6)
    # flip TTA: the mean of the image's and its mirror's probabilities
    flipped = predict_probs(models[0], _batches(images), 7, tta_flip=True)[0]
    by_hand = (hand[0] + torch.softmax(models[0](images.flip(3)), 1).detach().numpy()) / 2
    np.testing.assert_allclose(flipped, by_hand, rtol=1e-5, atol=1e-6)
    assert not np.allclose(flipped, hand[0])


def test_predict_probs_places_rows_by_index_and_marks_unseen():
    model = Fixed(torch.eye(3))
    images = torch.randn(2, 3, 4, 4)
    batches = [{"image": images, "index": torch.tensor([3, 0])}]
    probs, seen = predict_probs(model, batches, 5)
    assert seen.tolist() == [True, False, False, True, False]
    np.testing.assert_allclose(probs[3], torch.softmax(model(images[:1]), 1)[0].detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(probs[1], np.full(3, 1 / 3), rtol=1e-6)


def test_topk_accuracy_skips_unlabelled_rows():
    p = np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]], dtype=np.float32)
    labels = np.array([1, 0, -1])
    assert topk_accuracy(p, labels, 1) == 0.0
    assert topk_accuracy(p, labels, 3) == 0.5  # row 0: label 1 is 2nd; row 1: label 0 is last
    assert np.isnan(topk_accuracy(p, np.array([-1, -1, -1]), 1))
    with pytest.raises(ImatError):
        ensemble_probs(p[None], "median")


def _onehot(preds: list[int], c: int = 4, conf: float | list[float] = 0.7) -> np.ndarray:
    conf_arr = np.broadcast_to(np.asarray(conf, dtype=np.float32), (len(preds),))
    p = np.repeat(((1 - conf_arr) / (c - 1))[:, None], c, axis=1).astype(np.float32)
    p[np.arange(len(preds)), preds] = conf_arr
    return p


def test_greedy_selection_on_hand_made_arrays():
    # 6 images, label = image index mod 4. top-1 ensembles are what top-3 cannot separate with 4 classes,
    # so select on top1 here; teacher c duplicates a (adds nothing), b fixes a's mistakes.
    labels = np.array([0, 1, 2, 3, 0, 1])
    a = _onehot([0, 1, 2, 0, 2, 2], conf=0.9)  # 3/6 right: wrong on 3, 4, 5
    b = _onehot([1, 3, 1, 3, 0, 1], conf=[0.5, 0.5, 0.5, 0.95, 0.95, 0.95])  # 3/6: right on 3-5, surely
    c = a.copy()
    d = _onehot([3, 3, 3, 3, 3, 3])  # 1/6
    probs = np.stack([a, b, c, d])
    sel = greedy_select(probs, labels, ["a", "b", "c", "d"], metric="top1")
    assert sel.names[0] == "a"  # tie a/b/c on top1 -> a wins by index
    assert sel.names == ["a", "b"]
    expected = topk_accuracy(ensemble_probs(probs, "mean", [0, 1]), labels, 1)
    assert sel.score == pytest.approx(expected) and expected > 0.5
    assert [h[0] for h in sel.history] == ["a", "b"]


def test_greedy_stops_when_nothing_improves_and_starts_from_best_top3():
    labels = np.array([0, 1, 2, 3])
    good = _onehot([0, 1, 2, 3])
    bad = _onehot([1, 2, 3, 0], conf=0.97)
    sel = greedy_select(np.stack([bad, good]), labels, ["bad", "good"])
    assert sel.names == ["good"] and sel.score == 1.0 and sel.metric == "top3"


def test_evaluate_probs_rows():
    labels = np.array([0, 1, 2, 3])
    probs = np.stack([_onehot([0, 1, 2, 0]), _onehot([0, 1, 1, 3])])
    df = evaluate_probs(probs, labels, ["x", "y"], selection=[0, 1])
    assert df["name"].tolist() == ["x", "y", "ensemble_mean", "ensemble_geomean", "greedy_selection"]
    assert df.loc[0, "top1"] == 0.75 and df.loc[2, "members"] == "x y"
