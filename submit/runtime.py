"""onnxruntime sessions with explicitly chosen execution providers.

onnxruntime-gpu lists the CUDA and TensorRT providers as *available* whenever it is installed, even
on a machine without a GPU or without the CUDA/TensorRT libraries; creating a session then quietly
falls back to the CPU. So a provider counts only when ``session.get_providers()`` shows it active after
creation. ``auto`` takes the best that really initialises (TensorRT > CUDA > CPU) and logs a warning
when it had to fall back; an explicit ``cuda`` or ``tensorrt`` that cannot be honoured is an error."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from imat.errors import ImatError

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build lists (not proof that they work)."""
    import onnxruntime as ort

    listed = set(ort.get_available_providers())
    return [name for name, full in PROVIDERS.items() if full in listed]


def _provider_list(name: str, cache_dir: str | None) -> list[Any]:
    if name == "tensorrt":
        trt_options: dict[str, Any] = {"trt_fp16_enable": True}
        if cache_dir:
            trt_options.update(trt_engine_cache_enable=True, trt_engine_cache_path=cache_dir)
        return [(PROVIDERS["tensorrt"], trt_options), PROVIDERS["cuda"], PROVIDERS["cpu"]]
    if name == "cuda":
        return [PROVIDERS["cuda"], PROVIDERS["cpu"]]
    return [PROVIDERS["cpu"]]


def _options(threads: int | None, quiet: bool) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    if quiet:
        opts.log_severity_level = 4  # probing a provider that is not there logs errors we handle ourselves
    return opts


def _try_session(model: str, name: str, threads: int | None, cache_dir: str | None) -> tuple[Any, str]:
    """A session asking for ``name`` first, and the provider that actually became active."""
    import onnxruntime as ort

    previous = ort.get_default_logger_severity() if hasattr(ort, "get_default_logger_severity") else 2
    ort.set_default_logger_severity(4)
    sink = io.StringIO()
    try:
        # onnxruntime prints its provider fallback notice to stdout; keep it out of the user's output.
        with contextlib.redirect_stdout(sink):
            session = ort.InferenceSession(
                model, sess_options=_options(threads, quiet=True), providers=_provider_list(name, cache_dir)
            )
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        if name == "cpu":
            raise ImatError(
                f"{model}: onnxruntime cannot load this model ({str(exc).splitlines()[0]})"
            ) from None
        log.debug("provider %s failed: %s", name, exc)
        return None, "none"
    finally:
        ort.set_default_logger_severity(previous)
    if sink.getvalue().strip():
        log.debug("onnxruntime: %s", sink.getvalue().strip())
    active_full = session.get_providers()[0]
    active = next((k for k, v in PROVIDERS.items() if v == active_full), active_full)
    return session, active


def create_session(
    model: str | os.PathLike[str],
    provider: str = "auto",
    threads: int | None = None,
    cache_dir: str | None = None,
) -> tuple[Any, str]:
    """(onnxruntime.InferenceSession, active provider short name) for ``model``.

    ``provider``: ``auto`` | ``cpu`` | ``cuda`` | ``tensorrt``. ``auto`` tries TensorRT, then CUDA,
    then CPU, keeping the first that is active after creation; an explicit GPU provider that ends up
    inactive raises ImatError (one line) rather than silently running on the CPU."""
    path = str(model)
    if not Path(path).is_file():
        raise ImatError(f"model not found: {path}")
    if provider != "auto" and provider not in PROVIDERS:
        raise ImatError(f"unknown provider {provider!r} (choose from auto, {', '.join(PROVIDERS)})")
    listed = available_providers()
    if provider != "auto":
        if provider not in listed:
            raise ImatError(
                f"provider {provider!r} is not in this onnxruntime build (it has {', '.join(listed)})"
            )
        session, active = _try_session(path, provider, threads, cache_dir)
        if session is None or active != provider:
            raise ImatError(
                f"provider {provider!r} is listed but did not initialise (no GPU or missing CUDA/TensorRT "
                f"libraries?); use --provider cpu or auto"
            )
        log.info("onnxruntime provider: %s", active)
        return session, active
    tried = []
    for name in AUTO_ORDER:
        if name not in listed:
            continue
        session, active = _try_session(path, name, threads, cache_dir)
        if session is not None and active == name:
            if tried:
                log.warning("provider %s did not initialise; using %s", " and ".join(tried), active)
            log.info("onnxruntime provider: %s", active)
            return session, active
        tried.append(name)
    raise ImatError(f"{path}: no onnxruntime provider could run this model")  # CPU always exists


class Runner:
    """Runs batches through a session; on a GPU provider, with IO binding so the outputs are not copied
    through an extra host buffer per call and the input is bound from one contiguous host array."""

    def __init__(self, session: Any, provider: str) -> None:
        self.session = session
        self.provider = provider
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]
        self.use_binding = provider in ("cuda", "tensorrt")

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if not self.use_binding:
            return self.session.run(self.output_names, {self.input_name: batch})
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
