"""The `tune.space` section -> Ray Tune search domains, checked before Ray starts.

Each key is a dotted config path (usually under ``distill.``; list entries by index, as in ``k=v``
overrides) and each value a mapping with ``type`` and its bounds::

    tune:
      space:
        distill.train.lr: {type: loguniform, low: 0.01, high: 0.2}
        distill.adversarial.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
        distill.blocks.0.gamma: {type: uniform, low: 0.1, high: 2.0}
        distill.temperature: {type: quniform, low: 1, high: 8, q: 1}
        distill.adversarial.mode: {type: choice, values: [alternating, grl]}
        distill.train.aug.label_smoothing: {type: choice, values: [0.0, 0.1]}
        distill.train.batch_size: {type: randint, low: 16, high: 65}   # high exclusive

A bare list is shorthand for ``choice``. Every key is validated by applying a value sampled from its
domain to the config and validating the result, so a typo or an out-of-range bound is a one-line
error before any trial starts.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

from imat.errors import ImatError

TYPES = ("loguniform", "uniform", "quniform", "randint", "choice")
_BOUNDS = {"loguniform": ("low", "high"), "uniform": ("low", "high"), "quniform": ("low", "high", "q")}


def _spec(key: str, raw: Any) -> dict[str, Any]:
    if isinstance(raw, list):
        raw = {"type": "choice", "values": raw}
    if not isinstance(raw, dict) or "type" not in raw:
        raise ImatError(f"tune.space.{key}: expected {{type: {'|'.join(TYPES)}, ...}} or a list, got {raw!r}")
    kind = raw["type"]
    if kind not in TYPES:
        raise ImatError(f"tune.space.{key}.type: unknown {kind!r} (one of {', '.join(TYPES)})")
    needed = _BOUNDS.get(kind, ("low", "high") if kind == "randint" else ("values",))
    extra = set(raw) - {"type", *needed}
    if extra:
        raise ImatError(
            f"tune.space.{key}: unknown field(s) {sorted(extra)} for {kind} (takes {list(needed)})"
        )
    missing = [f for f in needed if f not in raw]
    if missing:
        raise ImatError(f"tune.space.{key}: {kind} needs {', '.join(missing)}")
    if kind == "choice":
        if not isinstance(raw["values"], list) or not raw["values"]:
            raise ImatError(f"tune.space.{key}.values: a non-empty list is needed")
        return dict(raw)
    for f in needed:
        if isinstance(raw[f], bool) or not isinstance(raw[f], int | float):
            raise ImatError(f"tune.space.{key}.{f}: a number is needed (got {raw[f]!r})")
    if not raw["low"] < raw["high"]:
        raise ImatError(f"tune.space.{key}: low must be < high (got {raw['low']}, {raw['high']})")
    if kind == "loguniform" and raw["low"] <= 0:
        raise ImatError(f"tune.space.{key}.low: loguniform needs low > 0 (got {raw['low']})")
    if kind == "randint" and not all(isinstance(raw[f], int) for f in ("low", "high")):
        raise ImatError(f"tune.space.{key}: randint needs integer low/high")
    if kind == "quniform" and raw["q"] <= 0:
        raise ImatError(f"tune.space.{key}.q: must be > 0")
    return dict(raw)


def parse_space(space: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Checked specs, in the config's order; an empty space is an error (nothing to sweep)."""
    if not space:
        raise ImatError("tune.space: empty; declare at least one key to sweep (see docs/SCALING.md)")
    return {str(k): _spec(str(k), v) for k, v in space.items()}


def default_space(cfg: Any) -> dict[str, dict[str, Any]]:
    """The sweep when a config declares no ``tune.space``: the student's lr (a decade below to 3x above
    the config's) and what the method adds (``tune_space`` of its file in :mod:`distill.methods`; MEAL:
    the discriminators' lr and the logits block's similarity weight)."""
    from distill.methods import get_method

    d = cfg.distill
    lr = float(d.train.lr)
    space: dict[str, dict[str, Any]] = {
        "distill.train.lr": {"type": "loguniform", "low": lr / 10, "high": lr * 3}
    }
    space.update(get_method(d.method).tune_space(cfg))
    return space


def sample(spec: dict[str, Any], rng: random.Random) -> Any:
    """One value from ``spec`` without Ray (for validating the keys up front)."""
    kind = spec["type"]
    if kind == "choice":
        return rng.choice(spec["values"])
    if kind == "randint":
        return rng.randrange(spec["low"], spec["high"])
    if kind == "loguniform":
        return spec["low"]
    value = rng.uniform(spec["low"], spec["high"])
    return round(value / spec["q"]) * spec["q"] if kind == "quniform" else value


def to_ray(specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ray Tune domains for the checked specs."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, s in specs.items():
        kind = s["type"]
        if kind == "choice":
            out[key] = tune.choice(s["values"])
        elif kind == "randint":
            out[key] = tune.randint(s["low"], s["high"])
        elif kind == "loguniform":
            out[key] = tune.loguniform(s["low"], s["high"])
        elif kind == "quniform":
            out[key] = tune.quniform(s["low"], s["high"], s["q"])
        else:
            out[key] = tune.uniform(s["low"], s["high"])
    return out


def pbt_mutations(specs: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], Any]:
    """PBT's ``hyperparam_mutations`` and ``custom_explore_fn`` for the checked specs.

    Ray perturbs a domain by multiplying its value (x0.8 or x1.2), which a categorical value cannot
    take: a choice key is handed over as its list of values instead, which Ray resamples or shifts
    to a neighbouring value. Numeric keys are perturbed by Ray, then put back inside their bounds
    (randint and quniform on their grid) by the explore function."""
    mutations: dict[str, Any] = {}
    for key, s in specs.items():
        mutations[key] = list(s["values"]) if s["type"] == "choice" else to_ray({key: s})[key]

    def explore(config: dict[str, Any]) -> dict[str, Any]:
        for key, s in specs.items():
            if s["type"] == "choice" or key not in config:
                continue
            value = min(max(config[key], s["low"]), s["high"])
            if s["type"] == "randint":
                value = min(int(round(value)), s["high"] - 1)
            elif s["type"] == "quniform":
                value = min(max(round(value / s["q"]) * s["q"], s["low"]), s["high"])
            config[key] = value
        return config

    return mutations, explore


def apply_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the raw config dict with each dotted key set to its value."""
    from imat.config.loader import apply_override

    out = copy.deepcopy(raw)
    for key, value in values.items():
        apply_override(out, f"{key}={json.dumps(value)}")
    return out


def check_keys(raw: dict[str, Any], specs: dict[str, dict[str, Any]], source: str) -> None:
    """Apply a sampled value (and each choice value) for every key and validate the config."""
    from imat.config.loader import validate

    rng = random.Random(0)
    for key, spec in specs.items():
        values = spec["values"] if spec["type"] == "choice" else [sample(spec, rng), spec["high"]]
        for value in values:
            if spec["type"] == "randint" and value == spec["high"]:
                value -= 1
            validate(apply_values(raw, {key: value}), f"{source}: tune.space.{key}={value!r}")
