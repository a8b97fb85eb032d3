"""Block extraction: the stage outputs and the logits of a timm network from ONE forward pass.

MEAL matches networks block by block. timm's ``forward_intermediates`` returns ``(final features,
[stage outputs])``; the logits are ``forward_head(final features)``, so intermediates and logits come from
the same pass (no hooks, no second forward). A block is named by its positional stage index (negative
indices count from the end, as in Python) or by ``"logits"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from imat.errors import ImatError

BlockIndex = int | str  # an int stage index or "logits"


def num_blocks(model: nn.Module) -> int:
    """How many stage outputs ``forward_intermediates`` gives for ``model`` (0 when it has none)."""
    if not hasattr(model, "forward_intermediates"):
        return 0
    info = getattr(model, "feature_info", None)
    if info is not None:
        try:
            return len(info)
        except TypeError:
            pass
    return 0


def resolve_index(index: BlockIndex, count: int, who: str) -> BlockIndex:
    """A stage index made non-negative and checked against ``count`` stages of network ``who``."""
    if index == "logits":
        return "logits"
    if not isinstance(index, int):
        raise ImatError(f"distill.blocks: index must be an int or 'logits', got {index!r}")
    if count == 0:
        raise ImatError(
            f"distill.blocks: {who} has no forward_intermediates, so only the 'logits' block can be used "
            f"(got index {index})"
        )
    if not -count <= index < count:
        raise ImatError(
            f"distill.blocks: block index {index} does not exist in {who} "
            f"(it has {count} stages, valid -{count}..{count - 1})"
        )
    return index % count


def extract_blocks(model: nn.Module, x: torch.Tensor, indices: Sequence[BlockIndex]) -> list[torch.Tensor]:
    """The outputs of ``model`` at ``indices`` (already resolved by ``resolve_index``), in that order.

    Only-logits requests use the plain forward (cheapest, works for every model)."""
    if all(i == "logits" for i in indices):
        logits = model(x)
        return [logits for _ in indices]
    final, inters = model.forward_intermediates(x)
    logits = model.forward_head(final) if any(i == "logits" for i in indices) else None
    return [logits if i == "logits" else inters[int(i)] for i in indices]
