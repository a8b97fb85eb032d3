"""The parameter-free aligner: any block output becomes one vector of a fixed length per sample.

Teacher and student stages differ in channels and spatial size, and MEAL aligns them without learned
adapters: (B, C, H, W) -> (B, C, H*W) -> adaptive avg/max pool of the spatial axis to L -> mean/max over
the channels -> (B, L). When L > H*W the adaptive pool up-samples by repetition. Logits (B, K) pass
through unchanged. Nothing is squeezed, so a batch of one keeps its batch axis.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def align(
    feat: torch.Tensor,
    length: int | None,
    spatial_pool: Literal["avg", "max"] = "avg",
    channel_reduce: Literal["avg", "max"] = "avg",
) -> torch.Tensor:
    """Map a block output to (B, length); 2-D inputs (logits) are returned as they are."""
    if feat.dim() == 2:
        return feat
    if length is None:
        raise ValueError("a spatial block needs a pooled length L")
    if feat.dim() == 3:  # (B, C, N): already flattened (e.g. tokens laid out channels-first)
        flat = feat
    elif feat.dim() == 4:
        b, c = feat.shape[:2]
        flat = feat.reshape(b, c, -1)
    else:
        raise ValueError(f"cannot align a block of shape {tuple(feat.shape)}")
    flat = flat.float()  # pooling/reductions in fp32 even under autocast: the vectors feed softmaxes
    pooled = (
        F.adaptive_avg_pool1d(flat, length) if spatial_pool == "avg" else F.adaptive_max_pool1d(flat, length)
    )
    return pooled.mean(dim=1) if channel_reduce == "avg" else pooled.amax(dim=1)


class Aligner:
    """``align`` with its settings bound: one per block, shared by teachers and student."""

    def __init__(
        self,
        length: int | None,
        spatial_pool: Literal["avg", "max"] = "avg",
        channel_reduce: Literal["avg", "max"] = "avg",
    ) -> None:
        self.length = length
        self.spatial_pool = spatial_pool
        self.channel_reduce = channel_reduce

    def __call__(self, feat: torch.Tensor) -> torch.Tensor:
        return align(feat, self.length, self.spatial_pool, self.channel_reduce)
