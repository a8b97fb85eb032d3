"""Ray Train for the engine: the same data-parallel run as under ``torchrun``, with Ray starting the
workers (one per GPU across a cluster) and restarting the group from the last epoch when one fails.

Every engine epoch is reported to Ray with a checkpoint holding ``last.ckpt``
(:func:`report_epoch_to_ray_train`); a restarted worker finds it back in place
(:func:`restore_ray_checkpoint`) and continues with ``resume=True``. :func:`run_entry_on_ray` runs a
command's entry (``imat distill --ray-workers N``, ``imat teachers train --ray-workers N``) this way. What
each rank does inside the engine is in :mod:`imat.engine.distributed`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from imat.engine.distributed import RAY_WORKER_ENV, rank
from imat.errors import ImatError

log = logging.getLogger("imat.engine")

RAY_CKPT_META = "imat_checkpoint.json"  # beside last.ckpt in a Ray checkpoint: whose it is and how far
# Reported with every epoch: the engine's best-epoch metric (train.best_metric on validation, else the
# train loss), signed so that higher is better; Ray keeps the best checkpoints by it (CheckpointConfig).
SCORE = "checkpoint_score"


def _numeric_metrics(row: Mapping[str, Any]) -> dict[str, float | int | bool]:
    """The numeric, finite-or-inf entries of a summary row (what Ray accepts as metrics)."""
    out: dict[str, float | int | bool] = {}
    for key, value in row.items():
        if isinstance(value, bool | int | float) and not (isinstance(value, float) and math.isnan(value)):
            out[key] = value
    return out


def _score(engine: Any, row: Mapping[str, Any]) -> float:
    from imat.engine.best import HIGHER_IS_BETTER

    value = engine._metric_of(row)
    if value is None:  # nothing measurable: ranks below every measured epoch
        return float("-inf")
    higher = HIGHER_IS_BETTER[engine.cfg.best_metric] if engine.val_loader is not None else False
    return value if higher else -value


def report_epoch_to_ray_train(engine: Any, row: dict[str, Any]) -> None:
    """Epoch-end hook inside a Ray Train worker: ``ray.train.report`` the epoch's metrics on every rank
    (Ray needs the same number of reports from each) with a ``Checkpoint`` of rank 0's ``last.ckpt``
    (rank 0 alone writes it; Ray keeps the latest), so Ray can restart a failed run from it."""
    import tempfile

    import ray.train

    metrics = _numeric_metrics(row)
    metrics[SCORE] = _score(engine, row)
    if rank() != 0 or not engine.ckpt_path.is_file():
        ray.train.report(metrics, checkpoint=None)
        return
    import json
    import shutil

    with tempfile.TemporaryDirectory(prefix="imat-ray-ckpt-") as tmp:
        shutil.copyfile(engine.ckpt_path, Path(tmp) / "last.ckpt")
        meta = {"out_dir": str(engine.out_dir), "epoch": int(row["epoch"]), "global_step": engine.global_step}
        (Path(tmp) / RAY_CKPT_META).write_text(json.dumps(meta))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore_ray_checkpoint(checkpoint: Any) -> Path | None:
    """Put a Ray checkpoint's ``last.ckpt`` back where its engine writes (``out_dir`` in its meta) unless
    the file there is as far or further (a run directory on shared storage still holds it); returns the
    out_dir, or None for a checkpoint that is not the engine's."""
    import json

    from imat.engine.checkpoint import load_checkpoint
    from imat.io import atomic_path

    with checkpoint.as_directory() as d:
        meta_path, ckpt = Path(d) / RAY_CKPT_META, Path(d) / "last.ckpt"
        if not (meta_path.is_file() and ckpt.is_file()):
            return None
        meta = json.loads(meta_path.read_text())
        out_dir = Path(meta["out_dir"])
        local = out_dir / "last.ckpt"
        behind = True
        if local.is_file():
            try:
                behind = int(load_checkpoint(local)["global_step"]) < int(meta["global_step"])
            except ImatError:  # unreadable local copy: Ray's wins
                behind = True
        if behind:
            import shutil

            out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(local) as tmp:
                shutil.copyfile(ckpt, tmp)
            log.info("restored %s from Ray's checkpoint (epoch %s)", local, meta.get("epoch"))
        return out_dir


def _ray_worker(config: dict[str, Any], fn: Callable[..., Any]) -> Any:
    """What every Ray Train worker runs: mark the process as a Ray Train rank (device binding), put Ray's
    latest checkpoint back in place when Ray restarted the run, and report every engine epoch to Ray.
    ``fn(config, resumed)`` then continues from ``last.ckpt`` when ``resumed``."""
    import ray.train

    from imat.engine.hooks import epoch_end_hook

    os.environ[RAY_WORKER_ENV] = "1"
    checkpoint = ray.train.get_checkpoint()
    resumed = checkpoint is not None and restore_ray_checkpoint(checkpoint) is not None
    with epoch_end_hook(report_epoch_to_ray_train):
        return fn(config, resumed)


def run_ray_train(
    fn: Callable[[dict[str, Any], bool], Any],
    config: dict[str, Any],
    num_workers: int,
    *,
    use_gpu: bool | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
    address: str | None = None,
    storage: str | None = None,
    name: str = "imat-train",
    max_failures: int = 0,
    callbacks: list[Any] | None = None,
    keep_checkpoints: int = 2,
    score: tuple[str, str] = (SCORE, "max"),
) -> Any:
    """Run ``fn(config, resumed)`` on ``num_workers`` Ray Train workers (a TorchTrainer), each one rank
    of a process group that Ray sets up (gloo on CPUs, NCCL on GPUs); the engine inside ``fn`` then
    behaves exactly as under torchrun, each rank on its own GPU. ``use_gpu`` defaults to whether the
    cluster has GPUs. Returns Ray's ``Result``; a failed run raises ImatError with the first line of
    the worker's error.

    Every engine epoch is reported to Ray with a checkpoint (:func:`report_epoch_to_ray_train`); when a
    worker dies Ray restarts the whole group up to ``max_failures`` times (``FailureConfig``) and ``fn``
    gets ``resumed=True`` with the latest ``last.ckpt`` back in place. A new run of the same ``name``
    in the same ``storage`` continues the old one (Ray's run state), so a caller starting over removes
    ``storage/name`` first (:func:`run_entry_on_ray` does unless resuming).

    Ray keeps the ``keep_checkpoints`` best checkpoints by ``score`` (metric, ``"max"``/``"min"``;
    default the engine's best-epoch metric) and always the latest one, the one a restart needs.

    ``fn`` must write to storage every worker sees (rank 0 writes the run directory).
    """
    import functools

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if num_workers < 1:
        raise ImatError(f"--ray-workers must be >= 1, got {num_workers}")
    if keep_checkpoints < 1:
        raise ImatError(f"--keep-checkpoints must be >= 1, got {keep_checkpoints}")
    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if address == "local" and os.environ.get("IMAT_RAY_NUM_CPUS"):
            kwargs["num_cpus"] = int(os.environ["IMAT_RAY_NUM_CPUS"])
        ray.init(address=address, **kwargs)
        started = True
    try:
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        resources: dict[str, float] = {"CPU": cpus_per_worker}
        if use_gpu:
            resources["GPU"] = 1.0 if gpus_per_worker is None else gpus_per_worker
        trainer = TorchTrainer(
            functools.partial(_ray_worker, fn=fn),
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=max_failures),
                checkpoint_config=CheckpointConfig(
                    num_to_keep=keep_checkpoints,
                    checkpoint_score_attribute=score[0],
                    checkpoint_score_order=score[1],
                ),
                callbacks=callbacks,
            ),
        )
        try:
            return trainer.fit()
        except Exception as exc:  # Ray wraps worker failures in several error types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ImatError(f"Ray Train run failed: {first[:300]}") from None
    finally:
        if started:
            ray.shutdown()


def absolute_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A resolved config dict with its paths made absolute, for workers that run elsewhere."""

    def fix(section: dict[str, Any], key: str) -> None:
        value = section.get(key)
        if isinstance(value, str) and value and value != "hub":
            section[key] = str(Path(value).expanduser().resolve())

    fix(raw, "run_dir")
    for key in ("train", "val", "test", "images"):
        fix(raw.get("data", {}), key)
    fix(raw.get("teachers", {}), "dir")
    fix(raw.get("distill", {}), "pool")
    return raw


def _entry_worker(config: dict[str, Any], resumed: bool = False) -> None:
    """A Ray Train worker: validate the config and call the command's entry (``module:function``),
    with ``resume=True`` when Ray restarted the run from a checkpoint."""
    import importlib

    from imat.config.loader import validate

    module, _, name = config["entry"].partition(":")
    cfg = validate(config["config"], "ray train worker")
    kwargs = dict(config.get("kwargs", {}))
    if resumed:  # Ray restarted the run: continue it (a forced re-run was forced on the first attempt)
        kwargs["resume"] = True
        if "force" in kwargs:
            kwargs["force"] = False
    getattr(importlib.import_module(module), name)(cfg, **kwargs)


def run_entry_on_ray(
    entry: str,
    cfg: Any,
    num_workers: int,
    kwargs: dict[str, Any] | None = None,
    address: str | None = None,
    use_gpu: bool | None = None,
    max_failures: int = 0,
    keep_checkpoints: int = 2,
) -> Any:
    """Run a command's entry function (e.g. ``"distill.train:distill"``) as one data-parallel job of
    ``num_workers`` Ray Train workers: ``imat distill --ray-workers N`` and ``imat teachers train
    --ray-workers N``. Ray restarts it from its last epoch up to ``max_failures`` times when a worker
    or node fails, and keeps ``keep_checkpoints`` of its epoch checkpoints (the best ones and the latest).
    The run directory must be on storage every worker's node sees."""
    import shutil

    kwargs = dict(kwargs or {})
    raw = absolute_config(cfg.model_dump(mode="json"))
    storage = Path(raw["run_dir"]) / "ray_train"
    name = entry.replace(":", "-").replace(".", "-")
    if not kwargs.get("resume") and (storage / name).exists():
        shutil.rmtree(storage / name)  # a fresh run: Ray would otherwise continue the old one's state
    return run_ray_train(
        _entry_worker,
        {"entry": entry, "config": raw, "kwargs": kwargs},
        num_workers,
        use_gpu=use_gpu,
        address=address,
        storage=str(storage),
        name=name,
        max_failures=max_failures,
        keep_checkpoints=keep_checkpoints,
    )
