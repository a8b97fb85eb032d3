"""imat export on a trained student run: the README's command form, int8 forms per target (U8S8 for the
CPU, reduce_range without VNNI, symmetric S8S8 for TensorRT), accuracy change on the labelled val
split, and the predict-time warning when a model prepared for one target runs on another."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import yaml
from onnx import numpy_helper
from scale_kit import make_run

from imat.app.cli import main
from imat.errors import ImatError
from submit.predict import predict
from submit.quantize import cpu_flags, int8_scheme
from submit.runtime import target_mismatch


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN_DIR of a resnet10t student trained 5 epochs (plain CE) on 80 MNIST kit digits: real,
    separated logits from training, not random weights."""
    root = tmp_path_factory.mktemp("exportrun")
    cfg = make_run(root, n_train=80, n_val=40, data="kit")
    assert main(["distill", str(cfg), "distill.method=ce", "distill.train.epochs=5", "--quiet"]) == 0
    run_dir = root / "run"
    assert (run_dir / "student" / "best.safetensors").is_file() and (
        run_dir / "student" / "config.yaml"
    ).is_file()
    return run_dir


def _val_count(run: Path) -> int:
    df = pd.read_parquet(run / "data" / "manifest.parquet")
    return int(((df["split"] == "val") & (df["label"] >= 0)).sum())


def _zero_points(model: Path) -> dict[str, list[np.ndarray]]:
    """Zero points of activation QuantizeLinear nodes and of weight DequantizeLinear nodes."""
    proto = onnx.load(str(model))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    acts = [
        inits[n.input[2]]
        for n in proto.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits
    ]
    weights = [
        inits[n.input[2]]
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4
    ]
    return {"activations": acts, "weights": weights}


def test_readme_command_takes_images_from_the_checkpoints_run(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(run.parent)
    # exactly the README's form: imat export RUN/student/best.safetensors --out RUN/export/student.onnx
    code = main(["export", "run/student/best.safetensors", "--out", "run/export/student.onnx"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((run / "export" / "student.onnx.json").read_text())
    v = report["verification"]
    n_val = _val_count(run)
    assert v["images"] == n_val >= 20  # the run's whole val split (verify_images 256 is more)
    assert v["top1_agreement"] == 1.0 and v["top3_agreement"] == 1.0
    acc = v["accuracy"]
    assert acc["labelled_images"] == n_val and acc["top1_accuracy_change"] == 0.0
    assert acc["reference_top1_accuracy"] > 0.2  # trained: better than chance (0.1) on 10 digits
    assert "labelled images" in capsys.readouterr().out

    # a run moved after training: its config's run_dir points nowhere, the checkpoint's folder is used
    moved = yaml.safe_load((run / "student" / "config.yaml").read_text())
    moved["run_dir"] = "runs/somewhere-else"
    (run / "student" / "config.yaml").write_text(yaml.safe_dump(moved))
    try:
        ckpt = str(run / "student" / "best.safetensors")
        assert main(["export", ckpt, "--out", str(tmp_path / "m.onnx"), "--exporter", "legacy"]) == 0
    finally:
        moved["run_dir"] = str(run)
        (run / "student" / "config.yaml").write_text(yaml.safe_dump(moved))
    # --images still overrides the run: a folder of unlabelled files gives no accuracy
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((run.parent / "kit").rglob("*.jpg"))[:6]:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "f.onnx"
    ckpt = str(run / "student" / "best.safetensors")
    assert main(["export", ckpt, "--out", str(out), "--images", str(folder), "--exporter", "legacy"]) == 0
    v = json.loads((tmp_path / "f.onnx.json").read_text())["verification"]
    assert v["images"] == 6 and v["accuracy"] is None


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_int8_for_its_target_on_a_trained_student(run: Path, tmp_path: Path, target: str) -> None:
    out = tmp_path / f"int8_{target}.onnx"
    ckpt = run / "student" / "best.safetensors"
    args = [
        "export",
        str(ckpt),
        "--out",
        str(out),
        "--precision",
        "int8",
        "--target",
        target,
        "--exporter",
        "legacy",
    ]
    # a 5-epoch student on 20 val images: one image is 5 points, the guard is set to allow one
    assert main([*args, "--max-accuracy-drop", "5"]) == 0
    report = json.loads((tmp_path / f"int8_{target}.onnx.json").read_text())
    assert report["target"] == target and report["int8"]["target"] == target
    v = report["verification"]
    # the GPU form is checked unfused on a CPU: what TensorRT computes, free of the CPU kernels' saturation
    assert v["int8_graph"] == ("unfused QDQ" if target == "gpu" else "fused")
    assert v["top1_agreement"] >= 0.9 and v["top3_agreement"] >= 0.8
    acc = v["accuracy"]
    assert acc["labelled_images"] == _val_count(run)
    # accuracy can change only on images whose top-1 changed (same images; 1e-9: float rounding)
    assert abs(acc["top1_accuracy_change"]) <= 1 - v["top1_agreement"] + 1e-9
    zp = _zero_points(out)
    assert zp["activations"] and zp["weights"]
    if target == "cpu":
        assert report["int8"]["name"] == "U8S8"
        assert all(z.dtype == np.uint8 for z in zp["activations"])
    else:
        assert report["int8"]["name"] == "S8S8" and report["int8"]["symmetric_activations"]
        assert all(z.dtype == np.int8 and not z.any() for z in zp["activations"])  # symmetric: zero point 0
    assert all(z.dtype == np.int8 and not z.any() for z in zp["weights"])
    # TensorRT's parser wants float biases: no int32 bias DequantizeLinear in the GPU form
    assert bool(_int32_dequantized(out)) is (target == "cpu")
    assert report["int8"]["quantize_bias"] is (target == "cpu")


def _int32_dequantized(model: Path) -> list[str]:
    """Initializers of int32 (quantised biases) that a DequantizeLinear node reads."""
    proto = onnx.load(str(model))
    int32 = {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT32}
    return [n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int32]


def test_reduce_range_without_vnni(run: Path, tmp_path: Path) -> None:
    from imat.config.stages import ExportConfig
    from submit.export import export_model
    from submit.inputs import read_images

    rows = read_images(run / "data" / "manifest.parquet", run.parent / "kit" / "images", "val")
    cfg = ExportConfig(precision="int8", max_accuracy_drop=100, calibration_images=32, exporter="legacy")
    report = export_model(
        run / "student" / "best.safetensors", tmp_path / "r.onnx", rows, cfg=cfg, cpu_flags={"avx2"}
    )
    assert report["int8"] == {
        "target": "cpu",
        "name": "U8S8",
        "activations": "uint8",
        "weights": "int8",
        "symmetric_activations": False,
        "reduce_range": True,
        "cpu_vnni": False,
        "quantize_bias": True,
        "calibration_method": "minmax",
        "calibration_images": report["int8"]["calibration_images"],
        "calibration_source": "half of the verification rows",
        "excluded_nodes": [],
        "float_fallback": False,
    }
    proto = onnx.load(str(tmp_path / "r.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    weights = [
        inits[n.input[0]]
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4
    ]
    assert weights and max(int(np.abs(w.astype(int)).max()) for w in weights) <= 64  # 7-bit weights


def test_int8_scheme_choice_and_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx2", "avx512f", "avx512_vnni"}
    assert cpu_flags(tmp_path / "absent") is None
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert cpu_flags(tmp_path / "arm") is None
    vnni = int8_scheme("cpu", {"avx2", "avx512_vnni"})
    assert (vnni.name, vnni.activations, vnni.reduce_range, vnni.cpu_vnni) == ("U8S8", "uint8", False, True)
    old = int8_scheme("cpu", {"avx2"})
    assert old.reduce_range and old.cpu_vnni is False
    assert int8_scheme("cpu", {"avx_vnni"}).reduce_range is False  # client CPUs' AVX-VNNI counts
    unknown = int8_scheme("cpu", None, probe=False)
    assert unknown.reduce_range is False and unknown.cpu_vnni is None  # not x86: no 16-bit saturation path
    gpu = int8_scheme("gpu", {"avx2"})
    assert (gpu.name, gpu.activations, gpu.symmetric_activations, gpu.reduce_range) == (
        "S8S8",
        "int8",
        True,
        False,
    )
    with pytest.raises(ImatError, match="unknown int8 target 'tpu'"):
        int8_scheme("tpu")


def test_mismatch_warnings() -> None:
    cpu8 = {"precision": "int8", "target": "cpu", "int8": {"name": "U8S8"}}
    gpu8 = {"precision": "int8", "target": "gpu", "int8": {"name": "S8S8"}}
    assert "--target gpu" in target_mismatch(cpu8, "tensorrt")
    assert "--target gpu" in target_mismatch(cpu8, "cuda")
    assert target_mismatch(cpu8, "cpu") is None
    assert "--target cpu" in target_mismatch(gpu8, "cpu")
    assert target_mismatch(gpu8, "tensorrt") is None
    assert "fp16" in target_mismatch({"precision": "fp16"}, "cpu")
    assert target_mismatch({"precision": "fp32"}, "cpu") is None
    assert target_mismatch({"precision": "fp32"}, "tensorrt") is None


def test_predict_warns_once_when_the_target_differs(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "g.onnx"
    ckpt = run / "student" / "best.safetensors"
    assert main(["export", str(ckpt), "--out", str(out), "--precision", "int8", "--target", "gpu",
                 "--max-accuracy-drop", "100", "--exporter", "legacy"]) == 0  # fmt: skip
    images = sorted((run.parent / "kit").rglob("*.jpg"))[:4]
    folder = tmp_path / "in"
    folder.mkdir()
    for p in images:
        os.link(p, folder / p.name)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        predict(out, folder, None, provider="cpu", workers=0, progress=False)
    lines = [r.getMessage() for r in caplog.records if "quantised for" in r.getMessage()]
    assert len(lines) == 1 and "--target cpu" in lines[0] and "\n" not in lines[0]
