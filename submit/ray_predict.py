"""`imat predict ... --ray`: the same top-k predictions as :func:`submit.predict.predict`, computed by Ray Data.

The image list (a folder, a manifest or a competition file, read exactly as the single-process path
reads it) becomes a Ray Dataset in blocks, processed in two stages:

1. :func:`decode_batch` in CPU ``map_batches`` tasks: JPEG decoding, resizing and cropping (the eval
   geometry of ``imat.data``), handed on as uint8 (a quarter of float32's bytes through the object
   store), so the GPU actors never wait on decoding;
2. :class:`OnnxPredictor` in an actor pool: normalisation, then one onnxruntime session per actor. By
   default one actor per GPU of the cluster (provider not ``cpu``), else CPU actors of a few cores each,
   one CPU left to decoding; onnxruntime's intra-op threads = the CPUs the actor holds (:func:`plan_actors`).

The actors' results are written by the workers (``write_parquet`` into ``OUT.parts/``), never gathered
whole on the driver: it reads back only the small columns (top-k, missing) to write the predictions
file with :func:`submit.predict.write_predictions` (the same Parquet, columns and metadata as
``imat predict``). With ``--save-probs`` the full probabilities stay in those worker-written shards,
kept as ``OUT.probs/`` (named in the file's metadata, ``probs_shards``); :func:`submit.predict.read_predictions`
attaches them for the consumer that needs them. ``max_driver_bytes`` bounds what the driver reads.

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

from imat.data.decode import DEFAULT_MAX_PIXELS
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
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: bool = True,
) -> dict[str, np.ndarray]:
    """A CPU task: image rows -> their resized, cropped uint8 CHW images (the eval geometry of
    imat.data, as in the single-process path; with several TTA ``scales``, one view per scale:
    ``(n, V, 3, S, S)``), normalised by the actor; an unreadable image, or one whose header declares
    more than ``max_pixels`` pixels (never decoded), gets zeros and ``ok`` False. ``draft``: big JPEGs
    are decoded at the DCT scale the closest view needs, as the single-process path decodes them."""
    from imat.data import ImageDataset
    from imat.data.recipe import decode_side
    from submit.tta import view_transform

    scales = list(scales or [1.0])
    desc = {"input_size": size, "mean": mean, "std": std, "crop_pct": crop}
    rows = pd.DataFrame({"image_id": batch["image_id"], "path": batch["path"], "label": -1})
    side = decode_side(None, size, crop / max(scales)) if draft else None
    dataset = ImageDataset(
        rows, None, view_transform(desc, scales, normalize=False), decoder, max_pixels, side
    )
    views = () if scales == [1.0] else (len(scales),)
    images = np.zeros((len(rows), *views, 3, size, size), np.uint8)  # the actor normalises
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
        # albumentations' Normalize on uint8: (x - mean * 255) / (std * 255)
        # (3, 1, 1): broadcasts over (B, 3, S, S) and over (B, V, 3, S, S) TTA views alike
        self.shift = (np.asarray(desc["mean"], np.float32) * 255).reshape(3, 1, 1)
        self.scale = (1 / (np.asarray(desc["std"], np.float32) * 255)).reshape(3, 1, 1)
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

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        """A pyarrow table with plain list columns: Parquet any reader (and :func:`read_small_columns`)
        reads without Ray's tensor extension types; the probabilities as one list<float32> column."""
        import pyarrow as pa

        from submit.verify import topk_indices

        ok = np.asarray(batch["ok"], dtype=bool)
        n = len(ok)
        top_idx: list[list[int]] = [[] for _ in range(n)]
        top_scores: list[list[float]] = [[] for _ in range(n)]
        probs = np.zeros((0, 0), np.float32)
        if ok.any():
            images = (np.asarray(batch["image"][ok], np.float32) - self.shift) * self.scale
            probs = self._probs(np.ascontiguousarray(images, dtype=np.float32)).astype(np.float32)
            idx = topk_indices(probs, self.k)
            scores = np.take_along_axis(probs, idx, axis=1)
            for j, i in enumerate(np.flatnonzero(ok)):
                top_idx[i] = idx[j].tolist()
                top_scores[i] = scores[j].tolist()
        columns = {
            "_row": pa.array(np.asarray(batch["_row"], dtype=np.int64)),
            "image_id": pa.array(np.asarray(batch["image_id"]).astype(str).tolist(), pa.string()),
            "top_idx": pa.array(top_idx, pa.list_(pa.int64())),
            "top_scores": pa.array(top_scores, pa.list_(pa.float32())),
            "missing": pa.array(~ok),
            "provider": pa.array([self.provider] * n, pa.string()),
            "_actor": pa.array([os.getpid()] * n, pa.int64()),  # which actor did the work (reported)
        }
        if self.save_probs:  # one flat buffer and offsets: an unreadable image has an empty list
            lengths = np.where(ok, probs.shape[1] if len(probs) else 0, 0)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            columns["probs"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(probs.reshape(-1)))
        return pa.table(columns)


def plan_actors(
    cluster_cpus: float, cluster_gpus: float, provider: str, actors: int | None, threads: int | None
) -> tuple[int, float, int, int]:
    """(actors, CPUs per actor, GPUs per actor, onnxruntime intra-op threads per actor).

    With GPUs (and a provider other than ``cpu``): one actor per GPU unless ``actors`` says otherwise,
    each holding one CPU. On CPUs: ``threads`` cores per actor (default up to 4), as many actors as fit
    beside one CPU kept for the decoding tasks (a small machine gets fractions rather than a deadlock);
    each actor's onnxruntime runs on the CPUs it holds, not on every core of the node."""
    if provider != "cpu" and cluster_gpus >= 1:
        n = actors or int(cluster_gpus)
        return n, 1.0, 1, threads or 1
    spare = max(cluster_cpus - 1, 0.1)
    per = float(threads) if threads else max(1.0, min(4.0, spare))
    n = actors or max(1, int(spare // per))
    actor_cpus = min(per, spare / n)
    return n, actor_cpus, 0, threads or max(1, int(actor_cpus))


SMALL_COLUMNS = ["_row", "image_id", "top_idx", "top_scores", "missing", "provider", "_actor"]


def read_small_columns(parts: Path, max_bytes: int | None = None) -> pd.DataFrame:
    """The top-k columns of the worker-written shards (never ``probs``); ImatError when they alone
    exceed ``max_bytes`` (the driver's budget)."""
    import pyarrow.dataset as pads

    if not any(parts.glob("*.parquet")):
        return pd.DataFrame(columns=SMALL_COLUMNS)
    table = pads.dataset(str(parts), format="parquet").to_table(columns=SMALL_COLUMNS)
    if max_bytes is not None and table.nbytes > max_bytes:
        raise ImatError(
            f"the predictions' top-k columns take {table.nbytes} bytes, over the driver budget of {max_bytes}"
        )
    return table.to_pandas()


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
    actors: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    tta_scales: str | list[float] | None = None,
    max_driver_bytes: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: bool = True,
) -> pd.DataFrame:
    """:func:`submit.predict.predict` over Ray Data with ``actors`` onnxruntime actors (default: from
    the cluster, :func:`plan_actors`; ``threads``: CPUs and intra-op threads per actor).

    Connects to ``address`` (or ``RAY_ADDRESS``) or starts a local Ray (``num_cpus`` caps it). Returns
    the same frame (and writes the same Parquet to ``out``) as the single-process path, except that
    with ``save_probs`` the probabilities stay in the workers' shards (``OUT.probs/``, which needs
    ``out``) and the frame has no ``probs`` column. ``max_driver_bytes``: refuse to read more than this
    into the driver.
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
    if actors is not None and actors < 1:
        raise ImatError(f"--actors must be >= 1, got {actors}")
    tta = make_tta(tta_flip, tta_scales)
    if save_probs and out is None:
        raise ImatError("--save-probs with --ray writes the probabilities as shards beside --out: give --out")
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
        resources = ray.cluster_resources()
        actors, actor_cpus, gpus, threads = plan_actors(
            float(resources.get("CPU", 1)), float(resources.get("GPU", 0)), provider, actors, threads
        )
        log.info(
            "Ray Data: %d actor(s), %.2g CPU and %d GPU each, %d onnxruntime thread(s)",
            actors,
            actor_cpus,
            gpus,
            threads,
        )
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
                "max_pixels": max_pixels,
                "draft": draft,
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
    probs_dir = Path(f"{out}.probs") if save_probs else None
    try:
        written = read_small_columns(parts, max_driver_bytes)
        if probs_dir is not None:  # the workers' shards are the probabilities file: kept, not read
            shutil.rmtree(probs_dir, ignore_errors=True)
            parts.rename(probs_dir)
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
    if probs_dir is not None:
        info["probs_shards"] = probs_dir.name  # beside the predictions file
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
