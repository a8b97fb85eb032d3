"""Loader workers run OpenCV on one thread each (N workers x all-cores pools oversubscribe a node), and
capping it does not deadlock a forked worker after the parent has used OpenCV's pool."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from imat.data import build_loader


class _Threads(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.zeros(1), "label": cv2.getNumThreads(), "index": index}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("persistent_epochs", [1, 2])
def test_workers_run_opencv_single_threaded(persistent_epochs: int) -> None:
    before = cv2.getNumThreads()
    cv2.setNumThreads(4)
    try:
        # a parallel op: the parent now has pool threads, which a forked child would wait for
        img = np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)
        cv2.GaussianBlur(img, (9, 9), 0)
        loader = build_loader(_Threads(), batch_size=2, shuffle=False, num_workers=2)
        for _ in range(persistent_epochs):
            threads = [int(t) for batch in loader for t in batch["label"]]
            assert threads == [1, 1, 1, 1]
        assert cv2.getNumThreads() == 4  # the parent keeps its own setting
        cv2.GaussianBlur(img, (9, 9), 0)
    finally:
        cv2.setNumThreads(before)
