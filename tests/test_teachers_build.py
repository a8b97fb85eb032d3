"""teachers.build and teachers.pool: building timm models, strict weight loading, pool.json round trip."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from imat.config.models import ModelSpec
from imat.errors import ImatError
from imat.weights import save_weights
from teachers.build import count_params, create_model, load_pretrained, read_state_dict, resolve_data_config
from teachers.pool import (
    TeacherEntry,
    load_pool,
    load_teacher,
    read_pool_json,
    update_pool_entry,
    write_pool_json,
)

ARCH = "resnet10t"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_unknown_arch_is_one_line_with_suggestion():
    with pytest.raises(ImatError) as exc:
        create_model(ModelSpec(arch="resnet_18"), 10)
    msg = _one_line(exc)
    assert "resnet_18" in msg and "resnet18" in msg


def test_bad_model_kwargs_is_imat_error():
    with pytest.raises(ImatError, match="model_kwargs"):
        create_model(ModelSpec(arch=ARCH, model_kwargs={"no_such_option": 3}), 10)


def test_create_model_head_and_data_config():
    model = create_model(ModelSpec(arch=ARCH, input_size=32), 7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    cfg = resolve_data_config(ModelSpec(arch=ARCH, input_size=32))
    assert cfg["input_size"] == 32
    assert cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])  # timm's pretrained_cfg of the arch
    cfg = resolve_data_config(ModelSpec(arch=ARCH, input_size=28, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)))
    assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == pytest.approx([0.2, 0.2, 0.2])


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    a = create_model(ModelSpec(arch=ARCH), 5)
    path = tmp_path / "w.safetensors"
    save_weights(path, a.state_dict(), {"arch": ARCH, "num_classes": 5})
    b = create_model(ModelSpec(arch=ARCH), 5)
    load_pretrained(b, path)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # and through the spec: create_model loads spec.pretrained itself
    c = create_model(ModelSpec(arch=ARCH, pretrained=str(path)), 5)
    x = torch.randn(1, 3, 32, 32)
    a.eval(), c.eval()
    assert torch.allclose(a(x), c(x))


def test_torch_state_dict_wrapped_and_prefixed(tmp_path):
    a = create_model(ModelSpec(arch=ARCH), 5)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in a.state_dict().items()}, "epoch": 3}, path)
    state = read_state_dict(path)
    assert set(state) == set(a.state_dict())
    b = create_model(ModelSpec(arch=ARCH), 5)
    load_pretrained(b, path)
    assert torch.equal(b.state_dict()["fc.weight"], a.state_dict()["fc.weight"])


def test_wrong_shape_fails_naming_the_key(tmp_path):
    a = create_model(ModelSpec(arch=ARCH), 5)
    state = a.state_dict()
    state["conv1.0.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_weights(path, state, {})
    with pytest.raises(ImatError) as exc:
        load_pretrained(create_model(ModelSpec(arch=ARCH), 5), path)
    msg = _one_line(exc)
    assert "conv1.0.weight" in msg and "bad.safetensors" in msg


def test_other_arch_fails_naming_keys(tmp_path):
    other = create_model(ModelSpec(arch="mobilenetv3_small_050"), 5)
    path = tmp_path / "other.safetensors"
    save_weights(path, other.state_dict(), {})
    with pytest.raises(ImatError) as exc:
        load_pretrained(create_model(ModelSpec(arch=ARCH), 5), path)
    msg = _one_line(exc)
    assert "other.safetensors" in msg and ("missing keys" in msg or "shape mismatch" in msg)


def test_head_with_other_class_count_is_reinitialised(tmp_path, caplog):
    torch.manual_seed(0)
    a = create_model(ModelSpec(arch=ARCH), 1000)
    path = tmp_path / "imagenet.pth"
    torch.save(a.state_dict(), path)
    b = create_model(ModelSpec(arch=ARCH), 5)
    head_before = b.state_dict()["fc.weight"].clone()
    with caplog.at_level(logging.WARNING):
        load_pretrained(b, path)
    assert "head re-initialised" in caplog.text
    assert torch.equal(b.state_dict()["fc.weight"], head_before)
    assert torch.equal(b.state_dict()["conv1.0.weight"], a.state_dict()["conv1.0.weight"])
    with pytest.raises(ImatError, match="fc.weight"):
        load_pretrained(create_model(ModelSpec(arch=ARCH), 5), path, allow_head_mismatch=False)


def test_pickle_and_garbage_files_are_one_line(tmp_path):
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ImatError) as exc:
        load_pretrained(create_model(ModelSpec(arch=ARCH), 5), bad)
    assert "junk.pth" in _one_line(exc)
    with pytest.raises(ImatError, match="not found"):
        load_pretrained(create_model(ModelSpec(arch=ARCH), 5), tmp_path / "nope.safetensors")


def _entry(pool, name, arch=ARCH, classes=4, **kw):
    torch.manual_seed(len(name))
    model = create_model(ModelSpec(arch=arch), classes)
    (pool / name).mkdir(parents=True, exist_ok=True)
    save_weights(pool / name / "best.safetensors", model.state_dict(), {"arch": arch, "num_classes": classes})
    entry = TeacherEntry(
        name=name,
        arch=arch,
        num_classes=classes,
        input_size=32,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
        crop_pct=1.0,
        weights=f"{name}/best.safetensors",
        val_top1=0.5,
        val_top3=0.9,
        params=count_params(model),
        epochs=1,
        pool_dir=pool,
        **kw,
    )
    return entry, model


def test_pool_json_round_trip_and_load_teacher(tmp_path):
    pool = tmp_path / "pool"
    e1, m1 = _entry(pool, "t1")
    e2, _ = _entry(pool, "t2", arch="mobilenetv3_small_050")
    update_pool_entry(pool, e1, extra={"manifest": "x.parquet"})
    update_pool_entry(pool, e2)
    update_pool_entry(pool, e1)  # replacing keeps one entry per name
    data = read_pool_json(pool)
    assert [t["name"] for t in data["teachers"]] == ["t2", "t1"] and data["manifest"] == "x.parquet"
    entries = load_pool(pool)
    assert {e.name for e in entries} == {"t1", "t2"}
    got = load_pool(pool, ["t1"])[0]
    assert got == e1 and got.weights_path == pool / "t1" / "best.safetensors"
    teacher = load_teacher(got)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    m1.eval()
    assert torch.allclose(teacher(x), m1(x))
    with pytest.raises(ImatError, match="no teacher named t9"):
        load_pool(pool, ["t9"])
    # an evaluation's selection survives an unchanged entry, not a retrained teacher
    data["selected"] = {"teachers": ["t1"]}
    write_pool_json(pool, data)
    update_pool_entry(pool, e1)
    assert read_pool_json(pool)["selected"] == {"teachers": ["t1"]}
    e1.val_top1 = 0.75
    update_pool_entry(pool, e1)
    assert "selected" not in read_pool_json(pool)


def test_load_teacher_rejects_weights_of_another_model(tmp_path):
    pool = tmp_path / "pool"
    e1, _ = _entry(pool, "t1")
    e1.arch = "mobilenetv3_small_050"  # pool.json lies about the arch
    with pytest.raises(ImatError, match="arch"):
        load_teacher(e1)
    e2, _ = _entry(pool, "t2")
    save_weights(pool / "t2" / "best.safetensors", create_model(ModelSpec(arch=ARCH), 9).state_dict(), {})
    with pytest.raises(ImatError) as exc:
        load_teacher(e2)
    assert "fc.weight" in _one_line(exc)


def test_missing_or_bad_pool_json_is_one_line(tmp_path):
    with pytest.raises(ImatError, match="not found"):
        load_pool(tmp_path / "nowhere")
    (tmp_path / "pool.json").write_text("{broken")
    with pytest.raises(ImatError) as exc:
        load_pool(tmp_path)
    assert "pool.json" in _one_line(exc)
    (tmp_path / "pool.json").write_text(json.dumps({"teachers": [{"name": "a"}]}))
    with pytest.raises(ImatError, match="lacks arch"):
        load_pool(tmp_path)
    (tmp_path / "pool.json").write_text(json.dumps({"teachers": []}))
    with pytest.raises(ImatError, match="no teachers"):
        load_pool(tmp_path)
