"""`imat tune`: a Ray Tune sweep of the distillation step, resumable after the driver is killed.

Every trial is one ``imat distill`` run: :func:`_trial` applies the trial's values to the config and
calls :func:`distill.train.distill`, the very entry of the command, inside an engine epoch-end hook
that reports the epoch's summary row with ``ray.tune.report`` and a checkpoint (the engine's
``last.ckpt`` and ``best.safetensors``). A trial that Ray restarts (PBT exploiting another trial, a
restored experiment, a retried failure) gets ``ray.tune.get_checkpoint()``, copies ``last.ckpt`` back
and continues with ``fit(resume=True)``; the config's learning rates win over the checkpoint's, so a
PBT mutation takes effect.

Layout under the storage path (default ``RUN_DIR/tune``)::

    tune/distill/            Ray's experiment (trial folders, checkpoints, experiment state)
    tune/distill/<trial>/run/student/    the trial's engine output (summary.csv, last.ckpt, ...)
    tune/trials.csv          one row per trial: values, epochs, last and best metric, status
    tune/best.yaml           the best trial's config, ready for `imat distill tune/best.yaml`
    tune/best/               the best trial's latest checkpoint (last.ckpt, best.safetensors, config.yaml)

Paths in the config are made absolute before the trials see them (trial processes run elsewhere);
on a cluster the run directory and the storage path must be on storage every node sees.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from imat.config import RunConfig
from imat.errors import ImatError

log = logging.getLogger(__name__)

EXPERIMENT = "distill"
CKPT_FILES = ("last.ckpt", "best.safetensors", "config.yaml")


@dataclass
class TuneOutcome:
    """What a sweep left behind."""

    storage: Path
    trials: pd.DataFrame
    best_config: dict[str, Any]
    best_yaml: Path
    best_checkpoint: Path | None
    restored: bool


# --- config handling -----------------------------------------------------------------------------------


def _abs(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else path


def trial_base(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as a plain dict with every path absolute (trials run in other processes,
    possibly other machines, with another working directory)."""
    from distill.settings import pool_dir_of

    raw = cfg.model_dump(mode="json")
    raw["run_dir"] = _abs(raw["run_dir"])
    data = raw["data"]
    for key in ("train", "val", "test", "images"):
        if isinstance(data.get(key), str):
            data[key] = _abs(data[key])
    raw["distill"]["pool"] = str(pool_dir_of(cfg).resolve())
    if raw["teachers"].get("dir"):
        raw["teachers"]["dir"] = _abs(raw["teachers"]["dir"])
    student = raw["distill"]["student"]
    if isinstance(student.get("pretrained"), str) and student["pretrained"] not in ("", "hub"):
        student["pretrained"] = _abs(student["pretrained"])
    return raw


def storage_of(cfg: RunConfig) -> Path:
    return Path(cfg.tune.storage or cfg.run_path / "tune").expanduser().resolve()


def _copy_atomic(src: Path, dest: Path) -> None:
    from imat.io import atomic_path

    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


# --- one trial (runs in a Ray worker) ------------------------------------------------------------------


def _numeric(row: dict[str, Any]) -> dict[str, float | int | bool]:
    out: dict[str, float | int | bool] = {}
    for key, value in row.items():
        if isinstance(value, bool | int | float) and not (isinstance(value, float) and math.isnan(value)):
            out[key] = value
    return out


def _trial_config(config: dict[str, Any], base: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """The trial's raw config (its values applied, run_dir in the trial folder, the run's manifest linked
    in) and its student folder."""
    from ray import tune

    from distill.train import STUDENT_DIR
    from distill.tune_space import apply_values
    from imat.config.loader import validate

    ctx = tune.get_context()
    run_dir = Path(ctx.get_trial_dir()) / "run"
    raw = apply_values(base, config)
    raw["run_dir"] = str(run_dir)
    validate(raw, f"trial {ctx.get_trial_name()}")
    student_dir = run_dir / STUDENT_DIR
    student_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(base["run_dir"]) / "data"  # the run's manifest, shared by every trial
    if data_dir.is_dir() and not (run_dir / "data").exists():
        (run_dir / "data").symlink_to(data_dir, target_is_directory=True)
    return raw, student_dir


def _check_metric(metric: str, metrics: dict[str, Any]) -> None:
    if metric not in metrics:
        raise ImatError(
            f"tune.metric: {metric!r} is not in the epoch summary (has {', '.join(sorted(metrics))})"
        )


def _trial(config: dict[str, Any], base: dict[str, Any], metric: str) -> None:
    """A Ray Tune function trainable: ``imat distill`` with the trial's values, reporting each epoch."""
    from ray import tune

    from distill.train import distill
    from imat.config.loader import validate
    from imat.engine.hooks import epoch_end_hook

    raw, student_dir = _trial_config(config, base)
    cfg = validate(raw, f"trial {tune.get_context().get_trial_name()}")
    resume = False
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            for name in CKPT_FILES:
                if (Path(d) / name).is_file():
                    _copy_atomic(Path(d) / name, student_dir / name)
        resume = (student_dir / "last.ckpt").is_file()
    elif (student_dir / "last.ckpt").exists():  # a fresh start of a trial folder used before
        (student_dir / "last.ckpt").unlink()

    def report(engine: Any, row: dict[str, Any]) -> None:
        if not engine.is_main:
            return
        metrics = _numeric(row)
        _check_metric(metric, metrics)
        with tempfile.TemporaryDirectory(prefix="imat-ckpt-") as tmp:
            for name in CKPT_FILES:
                if (engine.out_dir / name).is_file():
                    shutil.copyfile(engine.out_dir / name, Path(tmp) / name)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    with epoch_end_hook(report):
        distill(cfg, resume=resume, progress=False)


def _trial_worker(config: dict[str, Any], resumed: bool) -> None:
    """One Ray Train worker of a multi-worker trial: ``imat distill`` as one rank; the engine's epochs
    go to Ray Train (imat.engine.distributed), and from there to Tune (TuneReportCallback)."""
    from distill.train import distill
    from imat.config.loader import validate
    from imat.engine.hooks import epoch_end_hook

    cfg = validate(config["config"], "tune trial worker")
    with epoch_end_hook(lambda engine, row: _check_metric(config["metric"], _numeric(row))):
        distill(cfg, resume=resumed, progress=False)


def _trial_driver(
    config: dict[str, Any],
    base: dict[str, Any],
    metric: str,
    workers: int,
    per_worker: dict[str, float],
    train_storage: str,
    max_failures: int,
    keep_checkpoints: int = 2,
    score: tuple[str, str] = ("val_top3_err", "min"),
) -> None:
    """A Ray Tune trial that is a Ray Train run of ``workers`` data-parallel workers (the "Tuner over a
    driver" pattern Ray documents from 2.51 on): this function only launches and watches the
    TorchTrainer; ``TuneReportCallback`` hands each epoch's metrics (with the path of Ray Train's
    checkpoint) to Tune. The Train run is named after the trial, so a restarted trial (Tune's
    ``max_failures``, a restored sweep) continues the same run from its last checkpoint, and a lost
    worker is restarted by Ray Train itself (``FailureConfig``) without losing the trial."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from imat.engine.ray_train import run_ray_train

    raw, _ = _trial_config(config, base)
    gpus = per_worker.get("gpu", 0.0)
    run_ray_train(
        _trial_worker,
        {"config": raw, "metric": metric},
        workers,
        use_gpu=gpus > 0,
        cpus_per_worker=per_worker["cpu"],
        gpus_per_worker=gpus or None,
        storage=train_storage,
        name=f"trial_{tune.get_context().get_trial_id()}",
        max_failures=max_failures,
        callbacks=[TuneReportCallback()],
        keep_checkpoints=keep_checkpoints,
        score=score,
    )


# --- the driver ----------------------------------------------------------------------------------------


def _trial_dirname(trial: Any) -> str:
    """Short trial folder names (Ray's default spells out every value)."""
    return f"trial_{trial.trial_id}"


def _scheduler(cfg: RunConfig, specs: dict[str, dict[str, Any]]) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    from distill.tune_space import pbt_mutations

    t = cfg.tune
    if t.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=cfg.distill.train.epochs,
            grace_period=min(t.grace_period, cfg.distill.train.epochs),
            reduction_factor=t.reduction_factor,
        )
    if t.scheduler == "pbt":
        mutations, explore = pbt_mutations(specs)  # choice keys resampled, numbers kept in bounds
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=t.perturbation_interval,
            hyperparam_mutations=mutations,
            custom_explore_fn=explore,
        )
    return FIFOScheduler()


def _search(cfg: RunConfig) -> Any:
    """The search algorithm: None (Tune's random sampling of the space) or Optuna's TPE sampler through
    Ray Tune's ``OptunaSearch``, which proposes each new trial from the results so far."""
    t = cfg.tune
    if t.search == "random":
        return None
    if t.scheduler == "pbt":
        raise ImatError("tune.search=optuna cannot drive tune.scheduler=pbt (PBT mutates trials itself)")
    try:  # optuna is a dependency; a trimmed environment may lack it (Ray asserts it in the constructor)
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=t.metric, mode=t.mode, seed=cfg.distill.train.seed)
    except (ImportError, AssertionError) as exc:
        raise ImatError(f"tune.search=optuna needs the optuna package ({exc})") from None


def _checkpoints_to_keep(t: Any) -> int:
    """Per trial, the best ones by ``tune.metric`` (Ray always keeps the latest one too); PBT keeps at
    least 3, since another trial may still be copying an older one."""
    return max(t.keep_checkpoints, 3) if t.scheduler == "pbt" else t.keep_checkpoints


# What the driver of a multi-worker trial reserves: it only launches and watches its Train run.
DRIVER_RESOURCES = {"cpu": 0.1}


def _resources(cfg: RunConfig) -> dict[str, float]:
    """Per-trial resources (per worker when ``workers_per_trial > 1``): the config's, else one CPU per
    loader worker (at least one) and a whole GPU when the cluster has GPUs; a fraction of a GPU lets
    several small trials share one."""
    import ray

    t = cfg.tune
    cpus = t.cpus_per_trial if t.cpus_per_trial is not None else float(max(1, cfg.data.num_workers))
    gpus = t.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"cpu": float(cpus), "gpu": float(gpus)}


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address`` (or ``RAY_ADDRESS``) or start a local Ray; True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    # "local" always starts a fresh Ray here (never a stale cluster left by a killed driver);
    # `--address auto` joins one started with `ray start` on this machine
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address == "local" and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise ImatError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    return True


def trials_table(results: Any, keys: list[str], metric: str, mode: str, epochs: int) -> pd.DataFrame:
    """One row per trial: its values, epochs done, the metric's last and best value, status."""
    rows = []
    for r in results:
        hist = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        series = hist[metric].dropna() if metric in hist else pd.Series(dtype=float)
        done = int(r.metrics.get("training_iteration", 0) or 0) if r.metrics else 0
        status = "error" if r.error else ("done" if done >= epochs else "stopped")
        row: dict[str, Any] = {"trial": Path(r.path).name if r.path else ""}
        for key in keys:
            row[key] = (r.config or {}).get(key)
        row["epochs"] = done
        row[f"last_{metric}"] = float(series.iloc[-1]) if len(series) else float("nan")
        if len(series):
            row[f"best_{metric}"] = float(series.min() if mode == "min" else series.max())
        else:
            row[f"best_{metric}"] = float("nan")
        row["status"] = status
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values(f"best_{metric}", ascending=mode == "min", na_position="last")
    return df.reset_index(drop=True)


def record_tuned_batch(raw: dict[str, Any], workers: int) -> str:
    """Pin ``distill.train.lr_base_batch`` of the config ``raw`` (the batch its learning rates are set
    for) and return a YAML comment with the global batch the sweep trained at. Replayed on another
    number of ranks, batch size or accumulation, its learning rates are then rescaled from that base
    (``train.lr_scale``) instead of used as written."""
    train = raw["distill"]["train"]
    base = int(train.get("lr_base_batch") or train["batch_size"])
    train["lr_base_batch"] = base
    batch, accum = int(train["batch_size"]), int(train.get("accum_steps") or 1)
    return (
        f"# tuned at global batch {batch * workers * accum} ({workers} worker(s) x batch {batch} x "
        f"{accum} accumulation step(s)); its learning rates are set for batch {base} and rescaled to "
        "the global batch of the run that replays it"
    )


def tune_distill(
    cfg: RunConfig,
    *,
    samples: int | None = None,
    address: str | None = None,
    restart: bool = False,
    num_cpus: int | None = None,
    verbose: int = 1,
) -> TuneOutcome:
    """Run (or restore and finish) the sweep of ``cfg.tune`` and write the best config and checkpoint.

    An experiment already in the storage path is restored with ``Tuner.restore`` (unfinished and
    errored trials continue from their last checkpoints) unless ``restart`` removes it first.
    ``num_cpus`` caps a local Ray (ignored with an address).
    """
    import yaml
    from ray import tune

    from distill.methods import get_method
    from distill.settings import pool_dir_of
    from distill.train import check_method
    from distill.tune_space import apply_values, check_keys, default_space, parse_space, to_ray
    from imat.io import write_csv, write_text

    t = cfg.tune
    if t.space:
        specs = parse_space(t.space)
    else:
        specs = parse_space(default_space(cfg))
        log.info("tune: no tune.space in the config; sweeping the default %s", ", ".join(specs))
    if t.workers_per_trial > 1 and t.scheduler == "pbt":
        raise ImatError("tune.scheduler=pbt needs tune.workers_per_trial=1 (PBT exploits Tune checkpoints)")
    check_method(cfg.distill)
    if get_method(cfg.distill.method).needs_teachers and not (pool_dir_of(cfg) / "pool.json").is_file():
        raise ImatError(
            f"teacher pool not found: {pool_dir_of(cfg) / 'pool.json'} (run `imat teachers train` first)"
        )
    base = trial_base(cfg)
    check_keys(base, specs, "config")
    keys = list(specs)
    storage = storage_of(cfg)
    exp_dir = storage / EXPERIMENT
    started = _init_ray(address or t.address, num_cpus)
    try:
        space = to_ray(specs)
        if t.workers_per_trial > 1:
            driver = tune.with_parameters(
                _trial_driver,
                base=base,
                metric=t.metric,
                workers=t.workers_per_trial,
                per_worker=_resources(cfg),
                train_storage=str(storage / "train"),
                max_failures=t.max_failures,
                keep_checkpoints=t.keep_checkpoints,
                score=(t.metric, t.mode),
            )
            trainable = tune.with_resources(driver, DRIVER_RESOURCES)
        else:
            trainable = tune.with_resources(
                tune.with_parameters(_trial, base=base, metric=t.metric), _resources(cfg)
            )
        restored = False
        if exp_dir.exists() and restart:
            shutil.rmtree(exp_dir)
        if exp_dir.exists() and tune.Tuner.can_restore(str(exp_dir)):
            log.info("tune: restoring the experiment in %s (use --restart to start over)", exp_dir)
            tuner = tune.Tuner.restore(
                str(exp_dir), trainable, resume_unfinished=True, resume_errored=True, param_space=space
            )
            restored = True
        else:
            if exp_dir.exists():
                raise ImatError(f"{exp_dir}: exists but holds no restorable experiment; use --restart")
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=t.metric,
                    mode=t.mode,
                    scheduler=_scheduler(cfg, specs),
                    search_alg=_search(cfg),
                    num_samples=samples or t.samples,
                    max_concurrent_trials=t.max_concurrent,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=str(storage),
                    checkpoint_config=tune.CheckpointConfig(
                        num_to_keep=_checkpoints_to_keep(t),
                        checkpoint_score_attribute=t.metric,
                        checkpoint_score_order=t.mode,
                    ),
                    failure_config=tune.FailureConfig(max_failures=t.max_failures),
                    verbose=verbose,
                ),
            )
        results = tuner.fit()
    finally:
        if started:
            import ray

            ray.shutdown()

    table = trials_table(results, keys, t.metric, t.mode, cfg.distill.train.epochs)
    write_csv(storage / "trials.csv", table)
    ok = [r for r in results if r.error is None and r.metrics and t.metric in r.metrics]
    if not ok:
        first = next((r.error for r in results if r.error is not None), None)
        why = str(first).strip().splitlines()[-1][:300] if first is not None else "no trial reported"
        raise ImatError(f"tune: no trial finished an epoch ({why}); see {exp_dir}")
    best = results.get_best_result(metric=t.metric, mode=t.mode, scope="all", filter_nan_and_inf=True)
    values = {k: (best.config or {}).get(k) for k in keys}
    best_raw = apply_values(cfg.model_dump(mode="json"), values)
    note = record_tuned_batch(best_raw, t.workers_per_trial)
    best_yaml = write_text(storage / "best.yaml", f"{note}\n{yaml.safe_dump(best_raw, sort_keys=False)}")
    best_dir = storage / "best"
    best_ckpt = None
    if best.checkpoint is not None:
        with best.checkpoint.as_directory() as d:
            for name in CKPT_FILES:
                if (Path(d) / name).is_file():
                    _copy_atomic(Path(d) / name, best_dir / name)
    elif best.path:  # a multi-worker trial: its Train run wrote the student folder in the trial folder
        from distill.train import STUDENT_DIR

        student = Path(best.path) / "run" / STUDENT_DIR
        for name in CKPT_FILES:
            if (student / name).is_file():
                _copy_atomic(student / name, best_dir / name)
    best_ckpt = best_dir / "last.ckpt" if (best_dir / "last.ckpt").is_file() else None
    return TuneOutcome(storage, table, values, best_yaml, best_ckpt, restored)
