"""What a GPU box needs and reports, without a GPU: the TensorRT placement check (a profiled run),
why a provider did not start (warning level, one line), CUDA options, padding to one batch shape,
`imat doctor`, and the warnings for int8 on CUDA and a reduce_range made for another CPU."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_runtime_gpu import CPU, CUDA, TRT, FakeSession

from imat.app.cli import main
from imat.errors import ImatError
from submit import runtime
from submit.runtime import Runner, create_session, node_placement, target_mismatch


def _profile(placement: list[tuple[str, str]]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [{"cat": "Session", "name": "model_run", "args": {}}]
    for i, (op, provider) in enumerate(placement):
        args = {"op_name": op, "provider": provider}
        events.append({"cat": "Node", "name": f"{op}_{i}_kernel_time", "args": args})
        events.append({"cat": "Node", "name": f"{op}_{i}_fence_before", "args": {"op_name": op}})
    return events


class ProfilingSession(FakeSession):
    """A fake GPU session that writes an onnxruntime-style profile of the nodes in ``placement``."""

    placement: list[tuple[str, str]] = []

    def __init__(self, model: str, sess_options: Any = None, providers: list | None = None) -> None:
        super().__init__(model, sess_options, providers)
        self.options = sess_options
        self.profile_runs = 0

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.profile_runs += 1
        return super().run(names, feeds)

    def end_profiling(self) -> str:
        assert self.options.enable_profiling  # the TensorRT session was created with profiling on
        path = Path(self.options.profile_file_prefix + "_1.json")
        path.write_text(json.dumps(_profile(ProfilingSession.placement)))
        return str(path)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    FakeSession.calls = []
    FakeSession.works = True
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", ProfilingSession)
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(runtime, "_preloaded", [])
    model = tmp_path / "student.onnx"
    model.write_bytes(b"not read by the fake session")
    return model


DESC = {"precision": "int8", "target": "gpu", "input_size": 32, "input_name": "input"}


def test_tensorrt_whole_graph_is_quiet(fake_gpu: Path, caplog: pytest.LogCaptureFixture) -> None:
    ProfilingSession.placement = [
        ("TRTKernel_graph_main", TRT),
        ("MemcpyFromHost", CUDA),
        ("MemcpyToHost", CUDA),
    ]
    session, active = create_session(fake_gpu, "tensorrt", description=DESC)
    assert active == "tensorrt" and session.profile_runs == 1
    assert session.imat_fallback_nodes == 0  # the copies onnxruntime inserts are not model nodes
    assert "did not take the whole graph" not in caplog.text
    assert not list(Path(tempfile.gettempdir()).glob("imat-ort-profile-*/*.json"))  # cleaned up


def test_tensorrt_split_graph_warns_with_the_count(fake_gpu: Path, caplog: pytest.LogCaptureFixture) -> None:
    ProfilingSession.placement = [
        ("TRTKernel_graph_a", TRT),
        ("DequantizeLinear", CUDA),
        ("Add", CUDA),
        ("TopK", CPU),
        ("TRTKernel_graph_b", TRT),
    ]
    with caplog.at_level(logging.WARNING):
        session, _ = create_session(fake_gpu, "tensorrt", description=DESC)
    assert session.imat_fallback_nodes == 3
    lines = [r.getMessage() for r in caplog.records if "whole graph" in r.getMessage()]
    assert lines == [
        "tensorrt did not take the whole graph: 3 node(s) fell back (1 on CPU, 2 on CUDA); "
        "the engine is split and slower"
    ]


def test_node_placement_of_a_real_cpu_profile(tmp_path: Path) -> None:
    from submit.runtime import _probe_model

    _probe_model(tmp_path / "m.onnx")
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "p")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), opts, providers=[CPU])
    placement = runtime._profiled_placement(session, 8)
    assert placement == {CPU: 1}
    assert runtime.check_placement(placement, "cpu") == 0
    assert node_placement(_profile([("Conv", CUDA), ("Conv", TRT)])) == {CUDA: 1, TRT: 1}


def test_why_a_gpu_provider_did_not_start_is_a_warning(
    fake_gpu: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    FakeSession.works = False
    monkeypatch.setattr(
        runtime,
        "_load_library",
        lambda name: f"{name}: cannot open shared object file" if "nvinfer" in name else None,
    )
    with caplog.at_level(logging.WARNING):
        _, active = create_session(fake_gpu, "auto", description=DESC)
    assert active == "cpu"
    lines = [r for r in caplog.records if "did not initialise" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING  # one line for both providers
    line = lines[0].getMessage()
    assert line.startswith("provider tensorrt and cuda did not initialise; using cpu (tensorrt: ")
    assert "libnvinfer.so.10: cannot open shared object file" in line and "make install-gpu" in line
    assert "cuda: " in line and "\n" not in line
    with pytest.raises(ImatError, match=r"'tensorrt' is listed but did not initialise \(libnvinfer.so.10"):
        create_session(fake_gpu, "tensorrt", description=DESC)


def test_cuda_options_and_one_batch_shape(fake_gpu: Path) -> None:
    session, active = create_session(fake_gpu, "cuda")
    name, options = FakeSession.calls[-1]["providers"][0]
    assert name == CUDA and options["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    runner = Runner(session, active, fixed_batch=8)
    out = runner(np.ones((3, 3, 4, 4), np.float32))
    assert out[0].shape == (3, 5)  # cut back to the 3 real images
    assert session.binding_log[0] == ("input", "input", (8, 3, 4, 4), True)  # padded to the fixed 8
    cpu_session, cpu = create_session(fake_gpu, "cpu")
    Runner(cpu_session, cpu, fixed_batch=8)(np.ones((3, 3, 4, 4), np.float32))
    assert cpu_session.ran[0]["input"].shape == (3, 3, 4, 4)  # the CPU takes any batch: no padding


def test_int8_on_cuda_warns_that_it_is_the_slow_path(
    fake_gpu: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        create_session(fake_gpu, "cuda", description=DESC)
    assert "int8 on the CUDA provider runs every layer as dequantize -> fp32 -> quantize" in caplog.text
    assert "--provider tensorrt" in caplog.text and "fp16" in caplog.text
    assert target_mismatch(DESC, "tensorrt") is None


def test_reduce_range_is_checked_against_the_running_cpu() -> None:
    def model(reduce_range: bool) -> dict[str, Any]:
        return {"precision": "int8", "target": "cpu", "int8": {"name": "U8S8", "reduce_range": reduce_range}}

    vnni, old = {"avx2", "avx512_vnni"}, {"avx2"}
    assert "re-export it here" in target_mismatch(model(True), "cpu", vnni)
    assert "saturate" in target_mismatch(model(False), "cpu", old)
    assert target_mismatch(model(True), "cpu", old) is None
    assert target_mismatch(model(False), "cpu", vnni) is None
    assert target_mismatch(model(False), "cpu", None) is None  # not x86: nothing to say


def test_doctor_says_which_providers_work_and_why_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(runtime, "_preloaded", [True])
    missing = {"libnvonnxparser.so.10"}
    monkeypatch.setattr(
        runtime,
        "_load_library",
        lambda name: f"{name}: cannot open shared object file" if name in missing else None,
    )
    FakeSession.works = True
    monkeypatch.setattr(ort, "InferenceSession", ProfilingSession)
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["tensorrt", "no"] and "libnvonnxparser.so.10" in lines[0]
    assert "make install-gpu" in lines[0]
    assert lines[1].split()[:2] == ["cuda", "yes"] and lines[2].split()[:2] == ["cpu", "yes"]
    assert lines[3] == "--provider auto would use: cuda"
    # the same machine without the GPU build: one line each, no traceback
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    monkeypatch.setattr(ort, "InferenceSession", onnx_session)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "tensorrt  no   not in this onnxruntime build" in out and "--provider auto would use: cpu" in out


_REAL_SESSION = ort.InferenceSession


def onnx_session(*args: Any, **kwargs: Any) -> Any:
    return _REAL_SESSION(*args, **kwargs)


def test_probe_model_is_valid(tmp_path: Path) -> None:
    from submit.runtime import _probe_model

    _probe_model(tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))


def test_tensorrt_libraries_of_the_pip_wheel_are_preloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tensorrt-cu13-libs wheel's folder (``tensorrt_libs``) is found and its libraries loaded
    globally (stand-ins: copies of the C math library under TensorRT's sonames)."""
    import ctypes.util
    import shutil

    libm = ctypes.util.find_library("m")
    found = next(
        (p for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64")
         if libm and (p := Path(d) / libm).is_file()),
        None,
    )  # fmt: skip
    if found is None:
        pytest.skip("no libm to stand in for the TensorRT libraries")
    package = tmp_path / "tensorrt_libs"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in runtime.TENSORRT_LIBRARIES:
        shutil.copy(found, package / name)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = runtime.preload_tensorrt_libraries()
    assert [Path(p).name for p in loaded] == list(runtime.TENSORRT_LIBRARIES)
