"""`imat tune`: a 2-trial, 2-epoch ASHA sweep on the CPU, and a sweep restored after its driver is killed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from scale_kit import make_run

from imat.app.cli import main
from imat.config import load_config

IMAT = [sys.executable, "-m", "imat.app.cli"]


def storage(cfg: Path) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["run_dir"]) / "tune"


def test_space_errors_are_one_line(tmp_path, capsys):
    cfg = make_run(
        tmp_path, extra={"tune.space": {"distill.train.lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}}
    )
    assert main(["tune", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imat tune: error:") and "lrr" in err and "\n" not in err
    assert main(["tune", str(cfg), "tune.space={distill.train.lr: {type: loguniform, low: 0, high: 1}}"]) == 2
    assert "low > 0" in capsys.readouterr().err
    assert main(["tune", str(cfg), "tune.space={distill.train.lr: {type: gauss}}"]) == 2
    assert "unknown 'gauss'" in capsys.readouterr().err


def test_asha_sweep_writes_best_config_and_checkpoint(tmp_path, capsys):
    # a 2-trial, 2-epoch ASHA sweep on the embedded kit (MNIST digits, 10 classes)
    cfg = make_run(tmp_path, n_train=60, n_val=20, data="kit", extra={"tune.metric": "val_loss"})
    assert main(["tune", str(cfg), "--num-cpus", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "sweep finished; 2 trial(s)" in out
    st = storage(cfg)
    trials = pd.read_csv(st / "trials.csv")
    assert len(trials) == 2 and set(trials["status"]) <= {"done", "stopped"}
    assert trials["epochs"].max() == 2  # ASHA lets at least the leader run both epochs
    assert trials["best_val_loss"].notna().all()
    # best.yaml is a ready-to-run config holding the best trial's values
    best = load_config(st / "best.yaml")
    row = trials.iloc[0]
    assert best.distill.train.lr == pytest.approx(row["distill.train.lr"])
    assert best.distill.temperature == pytest.approx(row["distill.temperature"])
    assert Path(best.run_dir) == Path(yaml.safe_load(cfg.read_text())["run_dir"])
    ckpt = torch.load(st / "best" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] >= 1 and "model" in ckpt["modules"]
    assert ckpt["config"]["lr"] == pytest.approx(row["distill.train.lr"])
    assert (st / "best" / "best.safetensors").is_file()
    # every trial ran the real `imat distill` engine (its own summary.csv with the engine's columns)
    summaries = list((st / "distill").glob("trial_*/run/student/summary.csv"))
    assert len(summaries) == 2
    assert {"epoch", "train_loss", "val_loss", "val_top3_err"} <= set(pd.read_csv(summaries[0]).columns)


def _first_reports(trial_dir: Path) -> dict[int, float]:
    """val_loss of the first report of each epoch the trial made itself (Ray's result.json)."""
    out: dict[int, float] = {}
    for line in (trial_dir / "result.json").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out.setdefault(row["training_iteration"], row["val_loss"])
    return out


def test_pbt_sweep_exploits_with_a_categorical_key(tmp_path, capsys):
    """PBT over a space with a choice key (strings Ray cannot multiply): every trial runs to the end,
    the choice keeps values from its list, numbers stay in their bounds, and at least one trial
    continued from another trial's checkpoint (its history's first epoch is the other trial's)."""
    extra = {
        "tune.metric": "val_loss",
        "tune.scheduler": "pbt",
        "tune.samples": 4,  # PBT exploits the bottom quarter: it needs four trials to act at all
        "tune.perturbation_interval": 1,
        "tune.space": {
            "distill.train.lr": {"type": "loguniform", "low": 0.001, "high": 0.2},
            # unused by kd: what matters here is how PBT perturbs a categorical value
            "distill.adversarial.mode": ["alternating", "grl"],
        },
        "distill.train.epochs": 3,
        "distill.train.schedule": "constant",
    }
    cfg = make_run(tmp_path, extra=extra)
    assert main(["tune", str(cfg), "--num-cpus", "2", "--quiet"]) == 0
    assert "sweep finished; 4 trial(s)" in capsys.readouterr().out
    st = storage(cfg)
    trials = pd.read_csv(st / "trials.csv")
    assert len(trials) == 4 and (trials["epochs"] == 3).all()
    assert set(trials["distill.adversarial.mode"]) <= {"alternating", "grl"}
    assert trials["distill.train.lr"].between(0.001, 0.2).all()
    assert load_config(st / "best.yaml").tune.scheduler == "pbt"
    assert (st / "distill" / "pbt_global.txt").read_text().strip()  # Ray logged an exploit
    first = {d.name: _first_reports(d) for d in (st / "distill").glob("trial_*")}
    continued = []
    for name, own in first.items():
        history = pd.read_csv(st / "distill" / name / "run" / "student" / "summary.csv")
        epoch1 = float(history["val_loss"].iloc[0])
        others = [r[1] for n, r in first.items() if n != name]
        if epoch1 != pytest.approx(own[1], rel=1e-6) and any(
            epoch1 == pytest.approx(v, rel=1e-6) for v in others
        ):
            continued.append(name)
    assert continued, first


def _iterations(trial_dir: Path) -> list[int]:
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line)["training_iteration"] for line in path.read_text().splitlines() if line.strip()]


def test_sweep_restores_after_driver_is_killed(tmp_path):
    # enough epochs that the kill lands mid-trial even on a fast machine (an epoch here is ~0.5 s)
    epochs = 10
    cfg = make_run(
        tmp_path,
        n_train=48,
        # every checkpoint kept: with epochs (0.5 s) faster than the experiment snapshots (1 s), rotating
        # them can delete the one the last snapshot names before the kill, and Ray then cannot restore
        # that trial. Real sweeps snapshot every 10 s or more and keep 2 of epochs that take minutes.
        extra={
            "tune.metric": "val_loss",
            "tune.scheduler": "fifo",
            "tune.keep_checkpoints": epochs,
            "distill.train.epochs": epochs,
        },
    )
    st = storage(cfg)
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    cmd = IMAT + ["tune", str(cfg), "--num-cpus", "2", "--quiet"]
    driver = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 150
        first: Path | None = None
        while time.monotonic() < deadline and driver.poll() is None:
            done = [d for d in (st / "distill").glob("trial_*") if (d / "checkpoint_000000").is_dir()]
            if done:
                first = done[0]
                time.sleep(1.5)  # let the driver save the experiment state once more
                break
            time.sleep(0.5)
        assert driver.poll() is None, "the sweep finished before it could be killed"
        assert first is not None, "no trial reported within the time limit"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait(30)
    before = _iterations(first)
    assert before and max(before) < epochs
    assert list(st.glob("distill/experiment_state-*.json"))
    assert not (st / "best.yaml").exists()

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "restored and finished" in proc.stdout
    trials = pd.read_csv(st / "trials.csv")
    assert len(trials) == 2 and (trials["epochs"] == epochs).all(), trials.to_string()
    after = _iterations(first)
    # the killed trial continued from its checkpoint: its iterations carry on, never start again at 1
    assert after[-1] == epochs and after.count(1) == 1, after
    assert load_config(st / "best.yaml").distill.train.epochs == epochs


def test_default_space_when_the_config_declares_none():
    """The demo config has a tune: section without a space: the student's lr, the discriminators' lr and
    the logits block's similarity weight are swept around its values, and every key validates."""
    from distill.tune_space import check_keys, default_space, parse_space

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "demo.yaml")
    assert cfg.tune.space == {} and cfg.tune.samples == 4
    space = default_space(cfg)
    assert space == {
        "distill.train.lr": {"type": "loguniform", "low": pytest.approx(0.01), "high": pytest.approx(0.3)},
        "distill.adversarial.lr": {
            "type": "loguniform",
            "low": pytest.approx(1e-3),
            "high": pytest.approx(1e-1),
        },
        "distill.blocks.1.gamma": {"type": "loguniform", "low": 0.25, "high": 4.0},
    }
    check_keys(cfg.model_dump(mode="json"), parse_space(space), "demo")
    kd = load_config(repo / "configs" / "demo.yaml", ["distill.method=kd"])
    assert list(default_space(kd)) == ["distill.train.lr"]


def test_search_algorithm_and_trial_retries_come_from_the_config(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    from distill.tune import _search
    from imat.errors import ImatError

    cfg = load_config(make_run(tmp_path, extra={"tune.search": "optuna", "tune.metric": "val_loss"}))
    assert cfg.tune.max_failures == 1  # a failed trial is retried once from its checkpoint by default
    search = _search(cfg)
    assert isinstance(search, OptunaSearch) and search.metric == "val_loss" and search.mode == "min"
    assert _search(load_config(make_run(tmp_path / "r"))) is None
    with pytest.raises(ImatError, match="pbt"):
        _search(
            load_config(make_run(tmp_path / "p", extra={"tune.search": "optuna", "tune.scheduler": "pbt"}))
        )


def test_trials_of_two_ray_train_workers_with_optuna_and_the_default_space(tmp_path, capsys):
    """Each trial is a TorchTrainer of 2 workers (Tuner over a driver): both ranks train every epoch
    (24 images in 3 steps of 2 x 4), epochs reach Tune through TuneReportCallback, Optuna proposes the
    trials, and with no tune.space the student's lr is swept."""
    extra = {
        "tune.space": {},
        "tune.search": "optuna",
        "tune.scheduler": "fifo",
        "tune.metric": "val_loss",
        "tune.workers_per_trial": 2,
        "tune.max_concurrent": 1,
        "tune.keep_checkpoints": 1,
        "distill.train.batch_size": 4,
        "distill.train.epochs": 3,
    }
    cfg = make_run(tmp_path, extra=extra)
    assert main(["tune", str(cfg), "--samples", "2", "--num-cpus", "3", "--quiet"]) == 0
    assert "sweep finished; 2 trial(s)" in capsys.readouterr().out
    st = storage(cfg)
    trials = pd.read_csv(st / "trials.csv")
    assert len(trials) == 2 and (trials["epochs"] == 3).all() and (trials["status"] == "done").all()
    assert trials["distill.train.lr"].between(0.005, 0.15).all() and trials["distill.train.lr"].nunique() == 2
    for summary in (st / "distill").glob("trial_*/run/student/summary.csv"):
        df = pd.read_csv(summary)
        assert list(df["epoch"]) == [1, 2, 3] and (df["train_images"] == 24).all()
        assert list(df["global_step"]) == [3, 6, 9]  # 2 ranks x batch 4: 3 steps per epoch
        # the trial's Train run keeps tune.keep_checkpoints (1) best by tune.metric, and the latest
        trial = summary.parents[2].name
        kept = sorted(
            json.loads(m.read_text())["epoch"]
            for m in (st / "train" / trial).glob("checkpoint_*/imat_*.json")
        )
        best = set(df.loc[df["val_loss"] == df["val_loss"].min(), "epoch"])
        assert 3 in kept and best & set(kept) and len(kept) == (1 if 3 in best else 2), (kept, df["val_loss"])
    assert (st / "best" / "last.ckpt").is_file() and (st / "best.yaml").is_file()
