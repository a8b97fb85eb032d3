"""onnxruntime sessions with explicitly chosen execution providers.

onnxruntime-gpu lists the CUDA and TensorRT providers as *available* whenever it is installed, even
on a machine without a GPU or without the CUDA/TensorRT libraries; creating a session then quietly
falls back to the CPU. So a provider counts only when ``session.get_providers()`` shows it active after
creation. ``auto`` takes the best that really initialises (TensorRT > CUDA > CPU) and logs a warning
when it had to fall back; an explicit ``cuda`` or ``tensorrt`` that cannot be honoured is an error.

On the GPU providers: ``onnxruntime.preload_dlls()`` runs first (the pip CUDA/cuDNN libraries, or
PyTorch's, are then found without LD_LIBRARY_PATH); TensorRT gets fp16 only for an fp16 model and int8
only for an int8 (QDQ) one, an engine cache beside the model (under the run directory), and one
optimisation profile from batch 1 to the largest batch, so an engine is built once per model and not
per batch shape; runs use IO binding."""

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
GPU_PROVIDERS = ("tensorrt", "cuda")
MAX_BATCH = 64  # the TensorRT profile's largest batch unless the caller asks for more
_preloaded: list[bool] = []


def preload_gpu_libraries() -> bool:
    """``onnxruntime.preload_dlls()`` once per process (onnxruntime-gpu >= 1.21): loads the CUDA and
    cuDNN libraries of the nvidia pip packages (or PyTorch's) before a CUDA/TensorRT session needs them.
    Returns whether it ran; a build without it, or libraries it cannot find, leaves the normal search."""
    import onnxruntime as ort

    if _preloaded:
        return _preloaded[0]
    done = False
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
            done = True
        except Exception as exc:  # a missing library is reported by the session that needs it
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
    _preloaded.append(done)
    return done


def tensorrt_options(
    description: dict[str, Any] | None, cache_dir: str | None, max_batch: int = MAX_BATCH
) -> dict[str, Any]:
    """TensorRT provider options for a model described by ``description`` (imat's model JSON).

    fp16 kernels only when the model is fp16 (an fp32 model stays fp32), int8 when it is an int8 QDQ
    model (TensorRT then follows its Q/DQ scales); one profile 1..``max_batch`` at the model's input
    size; engines and timing cache in ``cache_dir``."""
    desc = description or {}
    precision = desc.get("precision", "fp32")
    options: dict[str, Any] = {
        "trt_fp16_enable": precision == "fp16",
        "trt_int8_enable": precision == "int8",
    }
    if cache_dir:
        options.update(
            trt_engine_cache_enable=True,
            trt_engine_cache_path=str(cache_dir),
            trt_timing_cache_enable=True,
            trt_timing_cache_path=str(cache_dir),
        )
    size = desc.get("input_size")
    if size:
        name = desc.get("input_name", "input")
        shape = f"3x{int(size)}x{int(size)}"
        options.update(
            trt_profile_min_shapes=f"{name}:1x{shape}",
            trt_profile_opt_shapes=f"{name}:{max_batch}x{shape}",
            trt_profile_max_shapes=f"{name}:{max_batch}x{shape}",
        )
    return options


def engine_cache_dir(model: str | os.PathLike[str]) -> Path:
    """Where TensorRT engines of ``model`` are cached: ``trt_engines/`` beside it (RUN_DIR/export/)."""
    return Path(model).resolve().parent / "trt_engines"


def target_mismatch(description: dict[str, Any], provider: str) -> str | None:
    """A one-line warning when a model prepared for one kind of device runs on another, else None."""
    precision = description.get("precision")
    target = description.get("target", "cpu")
    int8 = description.get("int8") or {}
    on_gpu = provider in GPU_PROVIDERS
    if precision == "int8" and target == "cpu" and on_gpu:
        return (
            f"this int8 model was quantised for the CPU ({int8.get('name', 'U8S8')}); on {provider} export "
            "it with --target gpu (symmetric S8S8 for TensorRT)"
        )
    if precision == "int8" and target == "gpu" and not on_gpu:
        return (
            f"this int8 model was quantised for TensorRT/CUDA ({int8.get('name', 'S8S8')}); the CPU runs it "
            "slowly: export it with --target cpu (U8S8)"
        )
    if precision == "fp16" and not on_gpu:
        return "this fp16 model is for GPUs; the CPU provider computes it in fp32 with extra casts"
    return None


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build lists (not proof that they work)."""
    import onnxruntime as ort

    listed = set(ort.get_available_providers())
    return [name for name, full in PROVIDERS.items() if full in listed]


def _provider_list(
    name: str, cache_dir: str | None, description: dict[str, Any] | None = None, max_batch: int = MAX_BATCH
) -> list[Any]:
    if name == "tensorrt":
        trt_options = tensorrt_options(description, cache_dir, max_batch)
        return [(PROVIDERS["tensorrt"], trt_options), PROVIDERS["cuda"], PROVIDERS["cpu"]]
    if name == "cuda":
        return [PROVIDERS["cuda"], PROVIDERS["cpu"]]
    return [PROVIDERS["cpu"]]


def _options(threads: int | None, quiet: bool, optimize: bool = True) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    if quiet:
        opts.log_severity_level = 4  # probing a provider that is not there logs errors we handle ourselves
    return opts


def _try_session(
    model: str,
    name: str,
    threads: int | None,
    cache_dir: str | None,
    description: dict[str, Any] | None = None,
    max_batch: int = MAX_BATCH,
    optimize: bool = True,
) -> tuple[Any, str]:
    """A session asking for ``name`` first, and the provider that actually became active."""
    import onnxruntime as ort

    if name in GPU_PROVIDERS:
        preload_gpu_libraries()
    if name == "tensorrt" and cache_dir:
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only model folder: TensorRT then builds its engine every time
            log.warning("cannot create the TensorRT engine cache %s; engines will not be cached", cache_dir)
            cache_dir = None
    previous = ort.get_default_logger_severity() if hasattr(ort, "get_default_logger_severity") else 2
    ort.set_default_logger_severity(4)
    sink = io.StringIO()
    try:
        # onnxruntime prints its provider fallback notice to stdout; keep it out of the user's output.
        with contextlib.redirect_stdout(sink):
            session = ort.InferenceSession(
                model,
                sess_options=_options(threads, quiet=True, optimize=optimize),
                providers=_provider_list(name, cache_dir, description, max_batch),
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
    cache_dir: str | os.PathLike[str] | None = None,
    description: dict[str, Any] | None = None,
    max_batch: int = MAX_BATCH,
    warn_target: bool = True,
    optimize: bool = True,
) -> tuple[Any, str]:
    """(onnxruntime.InferenceSession, active provider short name) for ``model``.

    ``provider``: ``auto`` | ``cpu`` | ``cuda`` | ``tensorrt``. ``auto`` tries TensorRT, then CUDA,
    then CPU, keeping the first that is active after creation; an explicit GPU provider that ends up
    inactive raises ImatError (one line) rather than silently running on the CPU. ``description``
    (imat's model JSON) sets TensorRT's precision and profile; ``max_batch`` is the largest batch the
    TensorRT profile covers; ``cache_dir`` defaults to :func:`engine_cache_dir`. A model prepared for
    another device (int8 for the CPU on TensorRT, ...) gets a one-line warning unless ``warn_target``
    is False (export verifying a GPU model on the CPU). ``optimize=False`` turns onnxruntime's graph
    optimisations off: a QDQ int8 graph then runs unfused (dequantize, float op, quantize)."""
    path = str(model)
    if not Path(path).is_file():
        raise ImatError(f"model not found: {path}")
    cache = str(cache_dir) if cache_dir else str(engine_cache_dir(path))
    max_batch = max(int(max_batch), 1)
    if provider != "auto" and provider not in PROVIDERS:
        raise ImatError(f"unknown provider {provider!r} (choose from auto, {', '.join(PROVIDERS)})")
    listed = available_providers()
    if provider != "auto":
        if provider not in listed:
            raise ImatError(
                f"provider {provider!r} is not in this onnxruntime build (it has {', '.join(listed)})"
            )
        session, active = _try_session(path, provider, threads, cache, description, max_batch, optimize)
        if session is None or active != provider:
            raise ImatError(
                f"provider {provider!r} is listed but did not initialise (no GPU or missing CUDA/TensorRT "
                f"libraries?); use --provider cpu or auto"
            )
        log.info("onnxruntime provider: %s", active)
        if warn_target:
            _warn_mismatch(description, active)
        return session, active
    tried = []
    for name in AUTO_ORDER:
        if name not in listed:
            continue
        session, active = _try_session(path, name, threads, cache, description, max_batch, optimize)
        if session is not None and active == name:
            if tried:
                log.warning("provider %s did not initialise; using %s", " and ".join(tried), active)
            log.info("onnxruntime provider: %s", active)
            if warn_target:
                _warn_mismatch(description, active)
            return session, active
        tried.append(name)
    raise ImatError(f"{path}: no onnxruntime provider could run this model")  # CPU always exists


def _warn_mismatch(description: dict[str, Any] | None, active: str) -> None:
    message = target_mismatch(description or {}, active)
    if message:
        log.warning("%s", message)


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
