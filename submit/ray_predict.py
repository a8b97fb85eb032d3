"""`imat predict ... --ray`: the same top-k predictions as :func:`submit.predict.predict`, computed by Ray Data.

The image list (a folder, a manifest or a competition file, read exactly as the single-process path
reads it) becomes a Ray Dataset in blocks, processed in two stages:

1. :func:`decode_batch` in CPU ``map_batches`` tasks: JPEG decoding and the eval transform (the same
   ``imat.data`` code as the single-process path), so the GPU actors never wait on decoding;
2. :class:`OnnxPredictor` in an actor pool (``compute=ActorPoolStrategy(size=actors)``): one
   onnxruntime session per actor, a GPU each when the cluster has GPUs and the provider is not ``cpu``.

The actors' results are written by the workers (``write_parquet`` into ``OUT.parts/``) rather than
gathered on the driver, then read back and joined to the input list on row number and image id, and
written by :func:`submit.predict.write_predictions`: the same Parquet, columns and metadata as
``imat predict``.

On a cluster the model file, the images and the output folder must be at the same path on every node
(shared storage).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imat.errors import ImatError, require_file

log = logging.getLogger(__name__)


def decode_batch(
    batch: dict[str, np.ndarray],
    size: int,
    mean: list[float],
    std: list[float],
    crop: float,
    decoder: str,
    scales: list[float] | None = None,
) -> dict[str, np.ndarray]:
    """A CPU task: image rows -> their pre-processed tensors (the eval transform of imat.data, as in
    the single-process path; with several TTA ``scales``, one view per scale: ``(n, V, 3, S, S)``); an
    unreadable image gets zeros and ``ok`` False."""
    from imat.data import ImageDataset
    from submit.tta import view_transform

    scales = list(scales or [1.0])
    desc = {"input_size": size, "mean": mean, "std": std, "crop_pct": crop}
    rows = pd.DataFrame({"image_id": batch["image_id"], "path": batch["path"], "label": -1})
    dataset = ImageDataset(rows, None, view_transform(desc, scales), decoder)
    views = () if scales == [1.0] else (len(scales),)
    images = np.zeros((len(rows), *views, 3, size, size), np.float32)
    ok = np.zeros(len(rows), dtype=bool)
    for i in range(len(rows)):
        item = dataset[i]
        if item is not None:
            images[i] = item["image"].numpy()
            ok[i] = True
    return {"_row": batch["_row"], "image_id": batch["image_id"], "image": images, "ok": ok}


class OnnxPredictor:
    """One onnxruntime session per Ray actor (a GPU each on a GPU cluster); ``__call__`` maps a batch
    of decoded images to their top-k class indices and probabilities (``missing`` where unreadable)."""

    def __init__(
        self,
        model: str,
        provider: str,
        threads: int | None,
        tta_flip: bool,
        k: int,
        save_probs: bool,
        batch_size: int,
    ) -> None:
        from submit.export import read_description
        from submit.runtime import Runner, create_session

        desc = read_description(model)
        session, self.provider = create_session(
            model, provider, threads=threads, description=desc, max_batch=batch_size, warn_target=False
        )  # the driver warns once about a model meant for another device, not every actor
        self.runner = Runner(session, self.provider, fixed_batch=batch_size)
        self.probs_out = bool(desc.get("softmax_in_graph"))
        self.tta_flip, self.k, self.save_probs = tta_flip, k, save_probs

    def _probs(self, x: np.ndarray) -> np.ndarray:
        from submit.tta import average_views

        # x is (B, 3, S, S), or (B, V, 3, S, S) with one view per TTA scale (decode_batch)
        return average_views(lambda b: self.runner(b)[0], x, self.tta_flip, self.probs_out)

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        from submit.verify import topk_indices

        ok = np.asarray(batch["ok"], dtype=bool)
        n = len(ok)
        top_idx: list[list[int]] = [[] for _ in range(n)]
        top_scores: list[list[float]] = [[] for _ in range(n)]
        probs_col: list[Any] = [np.zeros(0, np.float32) for _ in range(n)]
        if ok.any():
            probs = self._probs(np.ascontiguousarray(batch["image"][ok], dtype=np.float32))
            idx = topk_indices(probs, self.k)
            scores = np.take_along_axis(probs, idx, axis=1)
            for j, i in enumerate(np.flatnonzero(ok)):
                top_idx[i] = idx[j].tolist()
                top_scores[i] = scores[j].astype(np.float32).tolist()
                if self.save_probs:
                    probs_col[i] = probs[j].astype(np.float32)
        out = pd.DataFrame(
            {
                "_row": np.asarray(batch["_row"], dtype=np.int64),
                "image_id": np.asarray(batch["image_id"]).astype(str),
                "top_idx": top_idx,
                "top_scores": top_scores,
                "missing": ~ok,
            }
        )
        out["provider"] = self.provider
        out["_actor"] = os.getpid()  # which actor process did the work (reported, then dropped)
        if self.save_probs:
            out["probs"] = probs_col
        return out


def ray_predict(
    model: str | os.PathLike[str],
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
    split: str | None = None,
    topk: int = 3,
    provider: str = "auto",
    batch_size: int = 64,
    tta_flip: bool = False,
    save_probs: bool = False,
    threads: int | None = None,
    decoder: str = "cv2",
    actors: int = 2,
    address: str | None = None,
    num_cpus: int | None = None,
    tta_scales: str | list[float] | None = None,
) -> pd.DataFrame:
    """:func:`submit.predict.predict` over Ray Data with ``actors`` onnxruntime actors.

    Connects to ``address`` (or ``RAY_ADDRESS``) or starts a local Ray (``num_cpus`` caps it). Returns
    the same frame (and writes the same Parquet to ``out``) as the single-process path.
    """
    import ray
    from ray.data import ActorPoolStrategy

    from submit.export import read_description
    from submit.inputs import read_images
    from submit.predict import class_map_of, write_predictions
    from submit.runtime import target_mismatch
    from submit.tta import make_tta

    model = require_file(model, "model")
    if topk < 1:
        raise ImatError(f"--topk must be >= 1, got {topk}")
    if batch_size < 1:
        raise ImatError(f"--batch-size must be >= 1, got {batch_size}")
    if actors < 1:
        raise ImatError(f"--actors must be >= 1, got {actors}")
    tta = make_tta(tta_flip, tta_scales)
    desc = read_description(model)
    classes = class_map_of(desc, str(model))
    k = min(topk, classes.num_classes)
    rows = read_images(source, images, split).reset_index(drop=True)
    n = len(rows)
    table = pd.DataFrame(
        {
            "_row": np.arange(n, dtype=np.int64),
            "image_id": rows["image_id"].astype(str).to_numpy(dtype=object),
            "path": rows["path"].astype(str).to_numpy(dtype=object),
        }
    )
    started = False
    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS") or "local"
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if addr == "local" and num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        try:
            ray.init(address=addr, **kwargs)
        except ConnectionError as exc:
            raise ImatError(f"cannot reach the Ray cluster at {addr}: {exc}") from None
        started = True
    parts = Path(f"{out}.parts") if out is not None else Path(tempfile.mkdtemp(prefix="imat-ray-predict-"))
    if parts.exists():
        shutil.rmtree(parts)
    try:
        gpus = 1 if provider != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0
        cpus = float(ray.cluster_resources().get("CPU", 1))
        # CPU actors must leave a CPU to the decoding tasks, or a small machine deadlocks
        actor_cpus = 1.0 if gpus else min(1.0, max(0.1, (cpus - 1) / actors))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        blocks = max(actors, min(n, (n + batch_size - 1) // batch_size)) if n else 1
        chunks = [table.iloc[i : i + -(-n // blocks)] for i in range(0, max(n, 1), max(1, -(-n // blocks)))]
        decoded = ray.data.from_pandas(chunks).map_batches(
            decode_batch,
            fn_kwargs={
                "size": int(desc["input_size"]),
                "mean": list(desc["mean"]),
                "std": list(desc["std"]),
                "crop": float(desc.get("crop_pct", 0.875)),
                "decoder": decoder,
                "scales": list(tta.scales),
            },
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=1,
        )
        predicted = decoded.map_batches(
            OnnxPredictor,
            fn_constructor_kwargs={
                "model": str(model),
                "provider": provider,
                "threads": threads,
                "tta_flip": tta_flip,
                "k": k,
                "save_probs": save_probs,
                "batch_size": batch_size,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=actors),
            num_cpus=actor_cpus,
            num_gpus=gpus,
        )
        predicted.write_parquet(str(parts))  # by the actors' tasks: nothing gathered on the driver
    except ray.exceptions.RayError as exc:
        shutil.rmtree(parts, ignore_errors=True)
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ImatError(f"Ray Data inference failed: {first[:300]}") from None
    finally:
        if started:
            ray.shutdown()
    try:
        written = pd.read_parquet(parts) if any(parts.glob("*.parquet")) else pd.DataFrame()
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    if len(written) != n:
        raise ImatError(f"Ray Data returned {len(written)} rows for {n} images")
    written["image_id"] = written["image_id"].astype(str)
    result = table[["_row", "image_id"]].merge(written, on=["_row", "image_id"], how="left", validate="1:1")
    if result["missing"].isna().any():
        raise ImatError(
            f"Ray Data results do not match the input images ({int(result['missing'].isna().sum())} lost)"
        )
    missing = result["missing"].astype(bool).to_numpy()
    frame = pd.DataFrame(
        {
            "image_id": table["image_id"].to_numpy(dtype=object),
            "topk_labels": [
                [classes.to_source(int(i)) for i in idx] if not m else []
                for idx, m in zip(result["top_idx"], missing, strict=True)
            ],
            "topk_scores": [
                [float(s) for s in sc] if not m else []
                for sc, m in zip(result["top_scores"], missing, strict=True)
            ],
            "missing": missing,
        }
    )
    if save_probs:
        frame["probs"] = [np.asarray(p, np.float32) for p in result["probs"]]
    if missing.any():
        log.warning("%d of %d images could not be read; flagged missing", int(missing.sum()), n)
    active = str(result["provider"].iloc[0]) if n else provider
    mismatch = target_mismatch(desc, active)
    if mismatch:
        log.warning("%s", mismatch)
    info = {
        "model": str(model),
        "precision": desc.get("precision"),
        "provider": active,
        "topk": k,
        "tta_flip": tta_flip,
        "tta": {**tta.to_dict(), "label": tta.label},
        "images": n,
        "missing": int(missing.sum()),
        "classes": classes.to_dict(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ray_actors": actors,
        "ray_actors_used": int(result["_actor"].nunique()) if n else 0,
    }
    frame.attrs["imat"] = info
    if out is not None:
        write_predictions(out, frame, info)
    log.info(
        "predicted %d images with Ray Data (%d of %d actors did work, provider %s)",
        n,
        info["ray_actors_used"],
        actors,
        active,
    )
    return frame
