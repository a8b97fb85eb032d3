"""The CUDA/TensorRT paths of submit.runtime without a GPU: onnxruntime's provider list, session and
``preload_dlls`` are replaced by fakes that record what imat asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from imat.errors import ImatError
from submit import runtime
from submit.runtime import Runner, create_session, tensorrt_options

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


class FakeBinding:
    def __init__(self, log: list) -> None:
        self.log = log

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        self.log.append(("input", name, array.shape, array.flags["C_CONTIGUOUS"]))

    def bind_output(self, name: str, device: str) -> None:
        self.log.append(("output", name, device))

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        self.log.append(("copy",))
        return [np.ones((self.log[0][2][0], 5), np.float32)]


class FakeSession:
    """Becomes whichever GPU provider comes first in ``providers`` (as on a machine with a GPU), or
    the CPU when ``works`` is False (onnxruntime's silent fallback)."""

    calls: list[dict[str, Any]] = []
    works = True

    def __init__(self, model: str, sess_options: Any = None, providers: list | None = None) -> None:
        FakeSession.calls.append({"model": model, "providers": providers, "events": list(EVENTS)})
        first = providers[0]
        name = first[0] if isinstance(first, tuple) else first
        self.active = name if FakeSession.works else CPU
        self.binding_log: list = []
        self.ran: list = []

    def get_providers(self) -> list[str]:
        return [self.active, CPU]

    def get_inputs(self) -> list[Any]:
        return [type("I", (), {"name": "input"})()]

    def get_outputs(self) -> list[Any]:
        return [type("O", (), {"name": "logits"})()]

    def end_profiling(self) -> str:  # the TensorRT placement check's profile: nothing fell back
        return ""

    def io_binding(self) -> FakeBinding:
        return FakeBinding(self.binding_log)

    def run_with_iobinding(self, binding: FakeBinding) -> None:
        self.binding_log.append(("run",))

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.ran.append(feeds)
        return [np.zeros((len(feeds["input"]), 5), np.float32)]


EVENTS: list[str] = []


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    EVENTS.clear()
    FakeSession.calls = []
    FakeSession.works = True
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: EVENTS.append("preload"), raising=False)
    monkeypatch.setattr(runtime, "_preloaded", [])
    model = tmp_path / "run" / "export" / "student.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"not read by the fake session")
    return model


def _trt_options(call: dict[str, Any]) -> dict[str, Any]:
    name, options = call["providers"][0]
    assert name == TRT and call["providers"][1][0] == CUDA and call["providers"][2:] == [CPU]
    return options


@pytest.mark.parametrize(
    ("precision", "fp16", "int8"), [("fp32", False, False), ("fp16", True, False), ("int8", True, True)]
)
def test_tensorrt_precision_cache_and_profile(fake_gpu: Path, precision: str, fp16: bool, int8: bool) -> None:
    desc = {"precision": precision, "input_size": 224, "input_name": "input", "target": "gpu"}
    session, active = create_session(fake_gpu, "tensorrt", description=desc, max_batch=32)
    assert active == "tensorrt"
    call = FakeSession.calls[-1]
    assert call["events"] == ["preload"]  # preload_dlls ran before the session was created
    options = _trt_options(call)
    assert options["trt_fp16_enable"] is fp16 and options["trt_int8_enable"] is int8
    cache = fake_gpu.parent / "trt_engines"  # RUN_DIR/export/trt_engines: under the run directory
    assert options["trt_engine_cache_enable"] is True and options["trt_engine_cache_path"] == str(cache)
    assert options["trt_timing_cache_enable"] is True and cache.is_dir()
    # one profile covering every batch 1..32: no engine rebuild when the last batch is smaller
    assert options["trt_profile_min_shapes"] == "input:1x3x224x224"
    assert options["trt_profile_opt_shapes"] == "input:32x3x224x224"
    assert options["trt_profile_max_shapes"] == "input:32x3x224x224"


def test_preload_once_and_not_for_the_cpu(fake_gpu: Path) -> None:
    create_session(fake_gpu, "cuda")
    create_session(fake_gpu, "cuda")
    assert EVENTS == ["preload"]
    assert FakeSession.calls[-1]["providers"][0][0] == CUDA and FakeSession.calls[-1]["providers"][1:] == [
        CPU
    ]
    runtime._preloaded.clear()
    EVENTS.clear()
    create_session(fake_gpu, "cpu")
    assert EVENTS == [] and FakeSession.calls[-1]["providers"] == [CPU]


def test_gpu_listed_but_inactive(fake_gpu: Path, caplog: pytest.LogCaptureFixture) -> None:
    FakeSession.works = False
    with pytest.raises(ImatError, match="'tensorrt' is listed but did not initialise"):
        create_session(fake_gpu, "tensorrt")
    _, active = create_session(fake_gpu, "auto")
    assert active == "cpu" and "tensorrt and cuda did not initialise; using cpu" in caplog.text


def test_tensorrt_int8_model_for_the_cpu_warns(fake_gpu: Path, caplog: pytest.LogCaptureFixture) -> None:
    desc = {"precision": "int8", "target": "cpu", "int8": {"name": "U8S8"}, "input_size": 32}
    create_session(fake_gpu, "auto", description=desc)
    assert "quantised for the CPU (U8S8)" in caplog.text and "--target gpu" in caplog.text


def test_runner_uses_io_binding_on_gpu(fake_gpu: Path) -> None:
    session, active = create_session(fake_gpu, "cuda")
    runner = Runner(session, active)
    batch = np.zeros((4, 3, 8, 8), np.float64)[..., ::-1]  # not contiguous, not float32
    out = runner(batch)
    assert out[0].shape == (4, 5) and not session.ran
    assert session.binding_log == [
        ("input", "input", (4, 3, 8, 8), True),
        ("output", "logits", "cuda"),
        ("run",),
        ("copy",),
    ]
    cpu_session, cpu = create_session(fake_gpu, "cpu")
    Runner(cpu_session, cpu)(batch)
    assert cpu_session.ran and not cpu_session.binding_log


def test_tensorrt_options_without_description() -> None:
    assert tensorrt_options(None, None) == {"trt_fp16_enable": False, "trt_int8_enable": False}
