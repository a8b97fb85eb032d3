"""The engine tests' shared toy problem: a tiny learnable dataset, a 1-conv net and a config."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imat.config.train import TrainConfig


# A tiny learnable problem: the class shifts the mean of channel 0, so a 1-conv net learns it fast.
class ToyData(Dataset):
    def __init__(self, n=48, seed=0, classes=3, size=16):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % classes
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.x[:, 0] += 1.5 * self.y[:, None, None].float()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": int(self.y[i]), "index": i}


def collate(items):
    return {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([it["label"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        "skipped": 1 if len(items) % 2 else 0,
    }


def tiny_cnn(classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )


def loaders(n=48, batch=8, seed=0, generator=True, size=16):
    # generator=False: the sampler draws its order from the global torch RNG (the harder resume case)
    gen = torch.Generator().manual_seed(seed) if generator else None
    train = DataLoader(
        ToyData(n, size=size), batch_size=batch, shuffle=True, collate_fn=collate, generator=gen
    )
    val = DataLoader(ToyData(24, seed=1, size=size), batch_size=16, collate_fn=collate)
    return train, val


def train_cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, lr=0.05, device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base)
