"""`imat predict ... --ray`: the same top-k predictions as :func:`submit.predict.predict`, computed by Ray Data.

The image list (a folder, a manifest or a competition file, read exactly as the single-process path
reads it) becomes a Ray Dataset in blocks; ``map_batches`` runs :class:`OnnxPredictor`, a callable
class of which each of ``actors`` Ray actors holds one onnxruntime session (a GPU each when the
cluster has GPUs and the provider is not ``cpu``). Decoding and the eval transform run inside the
actors (the same ``imat.data`` dataset code as the single-process path), so only file paths travel
to them and only top-k indices and scores come back. The rows are put back in input order and written
by :func:`submit.predict.write_predictions`: the same Parquet, columns and metadata as ``imat predict``.

On a cluster the model file and the images must be at the same path on every node (shared storage).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from typing import Any

import numpy as np
import pandas as pd

from imat.errors import ImatError, require_file

log = logging.getLogger(__name__)


class OnnxPredictor:
    """One onnxruntime session per Ray actor; ``__call__`` maps a pandas batch of image rows to their
    top-k class indices and probabilities (``missing`` for unreadable images)."""

    def __init__(
        self,
        model: str,
        provider: str,
        threads: int | None,
        decoder: str,
        tta_flip: bool,
        k: int,
        save_probs: bool,
    ) -> None:
        from imat.data import build_eval_transform
        from submit.export import read_description
        from submit.runtime import Runner, create_session

        desc = read_description(model)
        session, self.provider = create_session(model, provider, threads=threads)
        self.runner = Runner(session, self.provider)
        self.probs_out = bool(desc.get("softmax_in_graph"))
        self.transform = build_eval_transform(
            int(desc["input_size"]), desc["mean"], desc["std"], float(desc.get("crop_pct", 0.875))
        )
        self.decoder, self.tta_flip, self.k, self.save_probs = decoder, tta_flip, k, save_probs

    def _probs(self, x: np.ndarray) -> np.ndarray:
        from submit.predict import softmax

        scores = self.runner(x)[0]
        probs = scores if self.probs_out else softmax(scores)
        if self.tta_flip:
            flipped = self.runner(np.ascontiguousarray(x[..., ::-1]))[0]
            probs = (probs + (flipped if self.probs_out else softmax(flipped))) / 2
        return probs

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from imat.data import ImageDataset
        from submit.verify import topk_indices

        rows = batch.reset_index(drop=True)
        dataset = ImageDataset(rows, None, self.transform, self.decoder)
        items = [dataset[i] for i in range(len(rows))]
        ok = np.array([it is not None for it in items], dtype=bool)
        n = len(rows)
        top_idx: list[list[int]] = [[] for _ in range(n)]
        top_scores: list[list[float]] = [[] for _ in range(n)]
        probs_col: list[Any] = [np.zeros(0, np.float32) for _ in range(n)]
        if ok.any():
            x = np.stack([it["image"].numpy() for it in items if it is not None])
            probs = self._probs(x)
            idx = topk_indices(probs, self.k)
            scores = np.take_along_axis(probs, idx, axis=1)
            for j, i in enumerate(np.flatnonzero(ok)):
                top_idx[i] = idx[j].tolist()
                top_scores[i] = scores[j].astype(np.float32).tolist()
                if self.save_probs:
                    probs_col[i] = probs[j].astype(np.float32)
        out = pd.DataFrame(
            {"_row": rows["_row"].to_numpy(), "top_idx": top_idx, "top_scores": top_scores, "missing": ~ok}
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
) -> pd.DataFrame:
    """:func:`submit.predict.predict` over Ray Data with ``actors`` onnxruntime actors.

    Connects to ``address`` (or ``RAY_ADDRESS``) or starts a local Ray (``num_cpus`` caps it). Returns
    the same frame (and writes the same Parquet to ``out``) as the single-process path.
    """
    import ray

    from submit.export import read_description
    from submit.inputs import read_images
    from submit.predict import class_map_of, write_predictions

    model = require_file(model, "model")
    if topk < 1:
        raise ImatError(f"--topk must be >= 1, got {topk}")
    if batch_size < 1:
        raise ImatError(f"--batch-size must be >= 1, got {batch_size}")
    if actors < 1:
        raise ImatError(f"--actors must be >= 1, got {actors}")
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
            "label": np.full(n, -1, dtype=np.int64),
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
    try:
        gpus = 1 if provider != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        blocks = max(actors, min(n, (n + batch_size - 1) // batch_size)) if n else 1
        # blocks made here (no repartition task): the actors may hold every CPU of a small machine
        chunks = [table.iloc[i : i + -(-n // blocks)] for i in range(0, max(n, 1), max(1, -(-n // blocks)))]
        ds = ray.data.from_pandas(chunks)
        result = ds.map_batches(
            OnnxPredictor,
            fn_constructor_kwargs={
                "model": str(model),
                "provider": provider,
                "threads": threads,
                "decoder": decoder,
                "tta_flip": tta_flip,
                "k": k,
                "save_probs": save_probs,
            },
            batch_size=batch_size,
            batch_format="pandas",
            concurrency=actors,
            num_cpus=1,
            num_gpus=gpus,
        ).to_pandas()
    except ray.exceptions.RayError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ImatError(f"Ray Data inference failed: {first[:300]}") from None
    finally:
        if started:
            ray.shutdown()

    result = result.sort_values("_row").reset_index(drop=True)
    if len(result) != n or not (result["_row"].to_numpy() == np.arange(n)).all():
        raise ImatError(f"Ray Data returned {len(result)} rows for {n} images")
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
    info = {
        "model": str(model),
        "precision": desc.get("precision"),
        "provider": active,
        "topk": k,
        "tta_flip": tta_flip,
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
