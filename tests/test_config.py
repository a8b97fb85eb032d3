"""Configs: typed loading, dotted overrides, one-line errors naming the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imat.config import load_config, save_resolved
from imat.errors import ImatError


def write(tmp_path: Path, data: object, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


POOL = {
    "defaults": {"lr": 0.1, "epochs": 3},
    "pool": [{"name": "a", "arch": "resnet10t"}, {"name": "b", "arch": "regnetx_002", "train": {"lr": 0.05}}],
}


def test_defaults_merge_into_each_teacher(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"run_dir": str(tmp_path / "r"), "teachers": POOL}))
    a, b = cfg.teachers.pool
    assert (a.train.lr, a.train.epochs) == (0.1, 3)
    assert (b.train.lr, b.train.epochs) == (0.05, 3)


def test_overrides_by_dotted_path(tmp_path: Path) -> None:
    path = write(tmp_path, {"teachers": POOL})
    cfg = load_config(
        path,
        [
            "distill.train.lr=0.05",
            "teachers.pool.1.train.epochs=7",
            "distill.blocks=[]",
            "data.label_noise.fraction=0.4",
            "distill.adversarial.mode=grl",
        ],
    )
    assert cfg.distill.train.lr == 0.05
    assert cfg.teachers.pool[1].train.epochs == 7
    assert cfg.distill.blocks == []
    assert cfg.data.label_noise.fraction == 0.4
    assert cfg.distill.adversarial.mode == "grl"


@pytest.mark.parametrize(
    ("data", "overrides", "needle"),
    [
        ({"distill": {"lrr": 0.1}}, [], "distill.lrr: unknown key"),
        ({"distill": {"train": {"lr": "fast"}}}, [], "distill.train.lr"),
        ({"teachers": {"pool": [{"name": "a"}]}}, [], "teachers.pool.0.arch: Field required"),
        ({}, ["distill.method="], "distill.method"),
        ({}, ["pipeline.submit_model=latest"], "pipeline.submit_model"),
        ({}, ["submit.select_by=top5"], "submit.select_by"),
        ({}, ["nosuch.key=1"], "nosuch: unknown key"),
        ({"teachers": POOL}, ["teachers.pool.3.lr=1"], "teachers.pool.3: no list entry"),
        ({}, ["novalue"], "expected dotted.key=value"),
        ({"teachers": {"pool": [{"name": "a", "arch": "x"}, {"name": "a", "arch": "y"}]}}, [], "repeated: a"),
    ],
)
def test_bad_configs_fail_with_one_line_naming_key_and_file(tmp_path, data, overrides, needle) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ImatError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message
    if not message.startswith("override"):
        assert str(path) in message


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  train: [a, b\n")
    with pytest.raises(ImatError, match=r"run\.yaml: invalid YAML at line"):
        load_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ImatError, match="config not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"teachers": POOL}), ["distill.temperature=2"])
    out = save_resolved(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(out)
    assert again == cfg
    assert again.distill.temperature == 2.0


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_validate_and_their_sweeps_parse(path: Path) -> None:
    from distill.tune_space import check_keys, parse_space
    from imat.config import to_dict

    cfg = load_config(path)
    assert cfg.teachers.pool and cfg.distill.blocks
    if cfg.tune.space:  # every key of the search space applies to this very config
        raw = to_dict(cfg)
        check_keys(raw, parse_space(cfg.tune.space), str(path))


def test_demo_config_ships_inside_the_package() -> None:
    from imat.app.api import demo_config_path

    shipped = demo_config_path()
    assert shipped.is_file()
    assert load_config(shipped) == load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


@pytest.mark.parametrize(
    "overrides,weight",
    [
        ([], 0.1),
        (["distill.adversarial.mode=grl"], 0.1),
        (["distill.adversarial.mode=joint"], 1.0),  # the official code adds D's loss as it is
        (["distill.adversarial.weight=0.3"], 0.3),
    ],
)
def test_adversarial_weight_depends_on_the_mode_unless_set(tmp_path: Path, overrides, weight) -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", overrides)
    assert cfg.distill.adversarial.student_weight() == pytest.approx(weight)
