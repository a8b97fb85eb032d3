"""Evaluation: loss, top-1/top-3 and (optionally) the logits of the model or its EMA on a loader,
summed over ranks when distributed. Mixed into :class:`imat.engine.loop.Engine`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from imat.engine import distributed as dist_utils
from imat.engine.runtime import as_dict_batch, batch_to_device, skipped_in
from imat.metrics import TopKMeter


class EvaluationMixin:
    """Needs the engine's ``task``, ``ema``, ``device``, ``channels_last``, ``val_loader``,
    ``distributed`` and ``autocast``."""

    @torch.no_grad()
    def evaluate(
        self, loader: Any, return_outputs: bool = False, use_ema: bool | None = None
    ) -> dict[str, Any]:
        """Cross-entropy loss, top-1/top-3 accuracy and errors of the evaluated model on ``loader``.

        Uses the EMA weights when EMA is on (``use_ema=None``), else ``task.eval_logits``. With
        ``return_outputs`` the result also has ``logits`` (N x C float, CPU), ``labels`` and ``index``.
        Labels < 0 (unknown) are excluded from the metrics but kept in the outputs.
        """
        use_ema = self.ema is not None if use_ema is None else use_ema
        if use_ema and self.ema is None:
            raise ValueError("use_ema=True but EMA is off (train.ema=false)")
        self.task.train(False)
        forward = self.ema.module if use_ema else self.task.eval_logits
        meter = TopKMeter((1, 3))
        skipped = 0
        outs: dict[str, list[torch.Tensor]] = {"logits": [], "labels": [], "index": []}
        normalize = getattr(loader, "device_normalize", None)
        for raw in loader:
            batch = batch_to_device(as_dict_batch(raw), self.device, self.channels_last, normalize)
            skipped += skipped_in(batch)
            labels = batch["label"]
            with self.autocast():
                logits = forward(batch["image"])
            logits = logits.float()
            valid = labels >= 0
            loss_sum = (
                F.cross_entropy(logits[valid], labels[valid], reduction="sum") if bool(valid.any()) else None
            )
            meter.update(logits, labels, loss_sum)
            if return_outputs:
                outs["logits"].append(logits.cpu())
                outs["labels"].append(labels.cpu())
                index = batch.get("index")
                if isinstance(index, torch.Tensor):
                    outs["index"].append(index.cpu())
        if self.distributed and loader is self.val_loader:  # sharded: count the whole split
            dist_utils.reduce_topk_meter(meter)
            skipped = int(dist_utils.sum_across_ranks({"skipped": skipped}, self.device)["skipped"])
        result: dict[str, Any] = meter.compute()
        result["skipped"] = skipped
        if return_outputs:
            for key, parts in outs.items():
                result[key] = torch.cat(parts) if parts else torch.empty(0)
        return result
