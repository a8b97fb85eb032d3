"""onnxruntime sessions with explicitly chosen execution providers.

onnxruntime-gpu lists the CUDA and TensorRT providers as *available* whenever it is installed, even
on a machine without a GPU or without the CUDA/TensorRT libraries; creating a session then quietly
falls back to the CPU. So a provider counts only when ``session.get_providers()`` shows it active after
creation. ``auto`` takes the best that really initialises (TensorRT > CUDA > CPU) and logs a warning
when it had to fall back; an explicit ``cuda`` or ``tensorrt`` that cannot be honoured is an error.

On the GPU providers: ``onnxruntime.preload_dlls()`` runs first (the pip CUDA/cuDNN libraries, or
PyTorch's, are then found without LD_LIBRARY_PATH), and so do the TensorRT libraries of the
``tensorrt-cu13-libs`` wheel (``make install-gpu``), which ``preload_dlls`` does not cover. TensorRT gets
fp16 for an fp16 model and int8 *with* fp16 for an int8 (QDQ) one (the layers left in float then run in
fp16, not fp32), an engine cache beside the model (under the run directory), and one optimisation
profile from batch 1 to the largest batch, so an engine is built once per model and not per batch
shape. After a TensorRT session is created, one profiled run counts the nodes TensorRT left to another
provider (a split engine) and warns with the count. CUDA gets a fixed cuDNN algorithm search and a
grow-as-requested arena; the :class:`Runner` pads a short last batch to the full batch on a GPU so both
see one input shape. Runs use IO binding. Why a GPU provider did not start (a missing library, no
driver or device) is said in the same one-line warning (``auto``) or error (an explicit provider)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
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
# The shared libraries the pinned onnxruntime-gpu's providers are linked against (``readelf -d`` on
# onnxruntime/capi/libonnxruntime_providers_*.so); TensorRT's major version must match.
CUDA_LIBRARIES = ("libcudart.so.13", "libcublas.so.13", "libcudnn.so.9")
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvonnxparser.so.10")
INSTALL_GPU_HINT = "make install-gpu (pip install --extra-index-url https://pypi.nvidia.com -c constraints.txt '.[tensorrt]')"
# CUDA provider: the algorithm search runs once per input shape, and the Runner keeps one shape
CUDA_OPTIONS = {
    "cudnn_conv_algo_search": "EXHAUSTIVE",
    "cudnn_conv_use_max_workspace": "1",
    "arena_extend_strategy": "kSameAsRequested",
    "do_copy_in_default_stream": "1",
}


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
    preload_tensorrt_libraries()
    _preloaded.append(done)
    return done


def _tensorrt_lib_dirs() -> list[Path]:
    """Folders of the pip TensorRT libraries (``tensorrt_libs``, from tensorrt-cu13-libs), if installed."""
    import importlib.util

    spec = importlib.util.find_spec("tensorrt_libs")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def preload_tensorrt_libraries() -> list[str]:
    """Load the pip TensorRT libraries globally so the TensorRT provider's ``dlopen`` finds them without
    LD_LIBRARY_PATH; returns the paths loaded (none when the wheel is not installed)."""
    import ctypes

    loaded = []
    for folder in _tensorrt_lib_dirs():
        for name in (*TENSORRT_LIBRARIES, "libnvinfer_plugin.so.10"):
            path = folder / name
            if path.is_file():
                try:
                    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                    loaded.append(str(path))
                except OSError as exc:
                    log.debug("cannot load %s: %s", path, exc)
    return loaded


def _load_library(name: str) -> str | None:
    """None when the shared library ``name`` loads, else the loader's one-line reason."""
    import ctypes

    try:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return str(exc).splitlines()[0] if str(exc) else f"{name}: cannot be loaded"
    return None


def missing_libraries(provider: str) -> list[str]:
    """The reasons the libraries ``provider`` (``cuda`` | ``tensorrt``) needs do not load (after the
    preloads); empty when all load."""
    names = CUDA_LIBRARIES + (TENSORRT_LIBRARIES if provider == "tensorrt" else ())
    return [reason for reason in map(_load_library, names) if reason]


def why_inactive(provider: str, fell_back_to: str | None = None) -> str:
    """One line saying why ``provider`` did not start: the libraries that do not load (and how to
    install them), else no usable GPU."""
    missing = missing_libraries(provider)
    if missing:
        hint = f"; install with {INSTALL_GPU_HINT}" if provider == "tensorrt" else ""
        return f"{missing[0]}{f' (+{len(missing) - 1} more)' if len(missing) > 1 else ''}{hint}"
    fallback = f" (the session fell back to {fell_back_to})" if fell_back_to else ""
    driver = _load_library("libcuda.so.1")
    if driver:
        return f"no NVIDIA driver ({driver}){fallback}"
    return f"its libraries and the driver load, but it did not start: no usable GPU?{fallback}"


def tensorrt_options(
    description: dict[str, Any] | None, cache_dir: str | None, max_batch: int = MAX_BATCH
) -> dict[str, Any]:
    """TensorRT provider options for a model described by ``description`` (imat's model JSON).

    fp16 kernels when the model is fp16 or int8 (an fp32 model stays fp32), int8 when it is an int8 QDQ
    model (TensorRT then follows its Q/DQ scales; the float layers it keeps run in fp16); one profile
    1..``max_batch`` at the model's input size; engines and timing cache in ``cache_dir``."""
    desc = description or {}
    precision = desc.get("precision", "fp32")
    options: dict[str, Any] = {
        "trt_fp16_enable": precision in ("fp16", "int8"),
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


def target_mismatch(
    description: dict[str, Any], provider: str, flags: set[str] | None | bool = True
) -> str | None:
    """A one-line warning when a model prepared for one kind of device runs on another, or on a CPU
    other than the one it was quantised for, else None. ``flags``: the running CPU's feature flags
    (True: read them from /proc/cpuinfo; None: unknown)."""
    precision = description.get("precision")
    target = description.get("target", "cpu")
    int8 = description.get("int8") or {}
    on_gpu = provider in GPU_PROVIDERS
    if precision == "int8" and target == "cpu" and on_gpu:
        return (
            f"this int8 model was quantised for the CPU ({int8.get('name', 'U8S8')}); on {provider} export "
            "it with --target gpu (symmetric S8S8 for TensorRT)"
        )
    if precision == "int8" and provider == "cuda":
        return (
            "int8 on the CUDA provider runs every layer as dequantize -> fp32 -> quantize, slower than "
            "fp32: the fast paths are --provider tensorrt (int8) or an fp16 model on CUDA"
        )
    if precision == "int8" and target == "cpu" and provider == "cpu" and "reduce_range" in int8:
        return reduce_range_mismatch(int8, flags)
    if precision == "int8" and target == "gpu" and not on_gpu:
        return (
            f"this int8 model was quantised for TensorRT/CUDA ({int8.get('name', 'S8S8')}); the CPU runs it "
            "slowly: export it with --target cpu (U8S8)"
        )
    if precision == "fp16" and not on_gpu:
        return "this fp16 model is for GPUs; the CPU provider computes it in fp32 with extra casts"
    return None


def reduce_range_mismatch(int8: dict[str, Any], flags: set[str] | None | bool = True) -> str | None:
    """One line when the U8S8 model's ``reduce_range`` (7-bit weights, decided at export for the
    deployment CPU) does not suit the CPU running it, else None (also when either CPU is unknown)."""
    from submit.quantize import cpu_flags, has_vnni

    running = cpu_flags() if flags is True else flags
    vnni = has_vnni(running) if isinstance(running, set) else None
    if vnni is None or "reduce_range" not in int8:
        return None
    if int8["reduce_range"] and vnni:
        return (
            "this int8 model uses 7-bit weights (reduce_range) for a CPU without VNNI, but this CPU has "
            "VNNI: re-export it here (or with --cpu-flags of this CPU) for full 8-bit accuracy"
        )
    if not int8["reduce_range"] and not vnni:
        return (
            "this int8 model was quantised for a CPU with VNNI; this CPU has none, and its 16-bit sums "
            "can saturate: re-export it here (or with --cpu-flags of this CPU), which uses reduce_range"
        )
    return None


def _probe_model(path: Path) -> None:
    """A one-node model (Relu) to try a provider on, without any user model."""
    import onnx
    from onnx import TensorProto, helper

    shape = ["batch", 3, 8, 8]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["out"])],
        "probe",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def provider_report() -> list[tuple[str, bool, str]]:
    """(provider, usable, why) for each provider, best first: whether this onnxruntime build lists it,
    whether its shared libraries load, and whether a session on it really starts (a one-node model)."""
    import onnxruntime as ort

    listed = available_providers()
    rows: list[tuple[str, bool, str]] = []
    with tempfile.TemporaryDirectory(prefix="imat-doctor-") as tmp:
        probe = Path(tmp) / "probe.onnx"
        _probe_model(probe)
        for name in AUTO_ORDER:
            if name not in listed:
                build = "onnxruntime-gpu" if name in GPU_PROVIDERS else "onnxruntime"
                rows.append(
                    (name, False, f"not in this onnxruntime build ({ort.__version__}; needs {build})")
                )
                continue
            if name in GPU_PROVIDERS:
                preload_gpu_libraries()
                missing = missing_libraries(name)
                if missing:
                    rows.append((name, False, why_inactive(name)))
                    continue
            session, active, reason = _try_session(str(probe), name, None, None)
            if session is not None and active == name:
                libs = (
                    " (TensorRT from the tensorrt-cu13-libs wheel)"
                    if name == "tensorrt" and _tensorrt_lib_dirs()
                    else ""
                )
                rows.append((name, True, f"a session starts on it{libs}"))
            else:
                rows.append((name, False, reason or why_inactive(name)))
    return rows


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
        return [
            (PROVIDERS["tensorrt"], trt_options),
            (PROVIDERS["cuda"], dict(CUDA_OPTIONS)),
            PROVIDERS["cpu"],
        ]
    if name == "cuda":
        return [(PROVIDERS["cuda"], dict(CUDA_OPTIONS)), PROVIDERS["cpu"]]
    return [PROVIDERS["cpu"]]


def node_placement(events: list[dict[str, Any]]) -> dict[str, int]:
    """Nodes per provider in an onnxruntime profile (its JSON events), each node counted once; the
    Memcpy nodes onnxruntime inserts between devices are not model nodes and are left out."""
    seen: dict[str, str] = {}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") != "Node" or "provider" not in args:
            continue
        if str(args.get("op_name", "")).startswith("Memcpy"):
            continue
        seen[str(event.get("name", "")).removesuffix("_kernel_time")] = str(args["provider"])
    counts: dict[str, int] = {}
    for provider in seen.values():
        counts[provider] = counts.get(provider, 0) + 1
    return counts


def _profiled_placement(session: Any, size: int | None) -> dict[str, int] | None:
    """Run one zero batch through a session created with profiling on, stop profiling, and return
    :func:`node_placement` of that run (None when the input size is unknown)."""
    import json

    path = None
    try:
        if size:
            name = session.get_inputs()[0].name
            session.run(None, {name: np.zeros((1, 3, int(size), int(size)), np.float32)})
        path = session.end_profiling()
        if not size or not path:
            return None
        return node_placement(json.loads(Path(path).read_text(encoding="utf-8")))
    finally:
        if path:
            Path(path).unlink(missing_ok=True)


def check_placement(placement: dict[str, int] | None, provider: str) -> int | None:
    """The number of model nodes ``provider`` left to other providers (warned in one line), or None."""
    if placement is None:
        return None
    full = PROVIDERS[provider]
    others = {k: v for k, v in placement.items() if k != full}
    count = sum(others.values())
    if count:
        where = ", ".join(f"{v} on {k.removesuffix('ExecutionProvider')}" for k, v in sorted(others.items()))
        log.warning(
            "%s did not take the whole graph: %d node(s) fell back (%s); the engine is split and slower",
            provider,
            count,
            where,
        )
    return count


def _options(threads: int | None, quiet: bool, optimize: bool = True, profile_dir: str | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if profile_dir:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / "imat-placement")
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
) -> tuple[Any, str, str | None]:
    """A session asking for ``name`` first, the provider that actually became active, and why
    ``name`` did not (None when it did)."""
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
    # TensorRT: profile the first run to see which nodes it took (see check_placement)
    profile_dir = tempfile.mkdtemp(prefix="imat-ort-profile-") if name == "tensorrt" else None
    try:
        # onnxruntime prints its provider fallback notice to stdout; keep it out of the user's output.
        with contextlib.redirect_stdout(sink):
            session = ort.InferenceSession(
                model,
                sess_options=_options(threads, quiet=True, optimize=optimize, profile_dir=profile_dir),
                providers=_provider_list(name, cache_dir, description, max_batch),
            )
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        if name == "cpu":
            raise ImatError(
                f"{model}: onnxruntime cannot load this model ({str(exc).splitlines()[0]})"
            ) from None
        if profile_dir:
            shutil.rmtree(profile_dir, ignore_errors=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, "none", first[:300]
    finally:
        ort.set_default_logger_severity(previous)
    if sink.getvalue().strip():
        log.debug("onnxruntime: %s", sink.getvalue().strip())
    active_full = session.get_providers()[0]
    active = next((k for k, v in PROVIDERS.items() if v == active_full), active_full)
    reason = why_inactive(name, active) if active != name else None
    if profile_dir:
        try:
            placement = _profiled_placement(session, (description or {}).get("input_size"))
            if active == name:
                session.imat_fallback_nodes = check_placement(placement, name)
        except Exception as exc:  # the check is advice: a failing probe run must not stop inference
            log.warning("could not check which provider runs each node: %s", str(exc).splitlines()[0][:200])
        finally:
            shutil.rmtree(profile_dir, ignore_errors=True)
    return session, active, reason


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
        session, active, reason = _try_session(
            path, provider, threads, cache, description, max_batch, optimize
        )
        if session is None or active != provider:
            raise ImatError(
                f"provider {provider!r} is listed but did not initialise ({reason}); use --provider cpu or auto"
            )
        log.info("onnxruntime provider: %s", active)
        if warn_target:
            _warn_mismatch(description, active)
        return session, active
    tried: list[str] = []
    reasons: list[str] = []
    for name in AUTO_ORDER:
        if name not in listed:
            continue
        session, active, reason = _try_session(path, name, threads, cache, description, max_batch, optimize)
        if session is not None and active == name:
            if tried:  # one line, with why each better provider did not start
                log.warning(
                    "provider %s did not initialise; using %s (%s)",
                    " and ".join(tried),
                    active,
                    "; ".join(reasons),
                )
            log.info("onnxruntime provider: %s", active)
            if warn_target:
                _warn_mismatch(description, active)
            return session, active
        tried.append(name)
        reasons.append(f"{name}: {reason}")
    raise ImatError(f"{path}: no onnxruntime provider could run this model")  # CPU always exists


def _warn_mismatch(description: dict[str, Any] | None, active: str) -> None:
    message = target_mismatch(description or {}, active)
    if message:
        log.warning("%s", message)


class Runner:
    """Runs batches through a session; on a GPU provider, with IO binding so the outputs are not copied
    through an extra host buffer per call and the input is bound from one contiguous host array.

    ``fixed_batch``: on a GPU provider a shorter batch (the last one) is padded with zeros to this size
    and its outputs cut back, so cuDNN's algorithm search and TensorRT's kernels see one shape."""

    def __init__(self, session: Any, provider: str, fixed_batch: int | None = None) -> None:
        self.session = session
        self.provider = provider
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]
        self.use_binding = provider in GPU_PROVIDERS
        self.fixed_batch = int(fixed_batch) if fixed_batch and self.use_binding else None

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if not self.use_binding:
            return self.session.run(self.output_names, {self.input_name: batch})
        n = len(batch)
        if self.fixed_batch and 0 < n < self.fixed_batch:
            padded = np.zeros((self.fixed_batch, *batch.shape[1:]), np.float32)
            padded[:n] = batch
            batch = padded
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return [out[:n] for out in binding.copy_outputs_to_cpu()]
