"""Precision conversions of an exported fp32 ONNX model: fp16 weights and int8 static quantisation.

fp16 uses onnxruntime's own converter (``onnxruntime.transformers.float16.convert_float_to_float16``,
shipped with onnxruntime-gpu; onnxconverter-common is not needed) with ``keep_io_types=True`` so callers
still feed and read fp32. That converter appends the input casts at the end of the node list, which
the ONNX checker rejects, so the graph is topologically re-sorted afterwards.

int8 is onnxruntime static quantisation in QDQ format with per-channel weights, calibrated (MinMax by
default) on real training images after ``quant_pre_process`` (shape inference + graph optimisation).
Softmax and TopK, and by default the final classifier (Gemm/MatMul), stay in float so the logits and
in-graph probabilities keep their precision.

The int8 *form* depends on where the model runs (:func:`int8_scheme`):

- ``cpu``: uint8 activations, int8 weights (U8S8). onnxruntime's x86 int8 kernels are built for U8S8
  (VNNI ``vpdpbusd`` multiplies unsigned by signed bytes); S8S8 QDQ falls back to slower paths and can
  end up slower than fp32. A CPU without VNNI multiplies through 16-bit sums that can saturate with full
  8-bit weights, so there the weights use 7 bits (``reduce_range``).
- ``gpu`` (TensorRT, CUDA): int8 activations and weights, both symmetric (zero point 0; S8S8), the
  only form TensorRT's explicit quantisation accepts."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from imat.errors import ImatError

log = logging.getLogger(__name__)

FLOAT_ONLY_OPS = ("Softmax", "TopK")
INT8_TARGETS = ("cpu", "gpu")
# x86 dot-product instructions for u8 x s8 (AVX512-VNNI, AVX-VNNI) or AMX tiles: no 16-bit saturation.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU feature flags of the first processor in ``cpuinfo`` (None when there is no such file or
    no x86 ``flags`` line, e.g. on ARM or macOS)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def has_vnni(flags: set[str] | None) -> bool | None:
    """Whether CPU ``flags`` include a u8 x s8 dot-product instruction (None when unknown)."""
    return None if flags is None else any(f in flags for f in VNNI_FLAGS)


def parse_cpu_flags(value: str) -> set[str]:
    """``--cpu-flags``: a copy of the deployment machine's /proc/cpuinfo, or its flags separated by
    commas or spaces (``avx2,avx512_vnni``; ``none`` for a CPU with none that matter)."""
    path = Path(value)
    if path.is_file():
        flags = cpu_flags(path)
        if flags is None:
            raise ImatError(f"--cpu-flags {value}: no 'flags' line in that file")
        return flags
    flags = {f for f in value.replace(",", " ").split() if f}
    if not flags:
        raise ImatError("--cpu-flags is empty: give the deployment CPU's flags (or 'none')")
    return flags - {"none"}


@dataclass(frozen=True)
class Int8Scheme:
    """How ``to_int8`` quantises for one target; recorded in the model description (``int8``)."""

    target: str
    name: str  # "U8S8" or "S8S8"
    activations: str  # "uint8" | "int8"
    weights: str
    symmetric_activations: bool
    reduce_range: bool
    cpu_vnni: bool | None  # what the deployment CPU has (None: unknown / not x86)
    # TensorRT's parser takes float biases (it fuses them itself); int32 bias DequantizeLinear nodes
    # make it reject the graph or split it around them
    quantize_bias: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def int8_scheme(target: str = "cpu", flags: set[str] | None = None, probe: bool = True) -> Int8Scheme:
    """The int8 form for ``target`` (``cpu`` | ``gpu``). ``flags``: the deployment CPU's feature flags
    (default: this machine's, from /proc/cpuinfo when ``probe``); reduce_range is used on an x86 CPU
    known to lack VNNI. Predict checks the running CPU against it (submit.runtime.reduce_range_mismatch)."""
    if target not in INT8_TARGETS:
        raise ImatError(f"unknown int8 target {target!r} (choose from {', '.join(INT8_TARGETS)})")
    if flags is None and probe:
        flags = cpu_flags()
    vnni = has_vnni(flags)
    if target == "gpu":
        return Int8Scheme("gpu", "S8S8", "int8", "int8", True, False, vnni, quantize_bias=False)
    return Int8Scheme("cpu", "U8S8", "uint8", "int8", False, vnni is False, vnni)


def toposort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (in place)."""
    produced = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(name in produced for name in node.input):
                ordered.append(node)
                produced.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({n for node in rest for n in node.input if n not in produced})[:3]
            raise ImatError(f"ONNX graph has unresolved inputs {missing}; cannot sort it")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def to_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute, fp32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    # TopK's indices and Softmax stay fp32: blocking them keeps the output dtypes the caller expects.
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FLOAT_ONLY_OPS))
    toposort(half.graph)
    from submit.export import save_onnx

    save_onnx(half, dst)


class BatchReader:
    """An onnxruntime CalibrationDataReader over pre-processed image batches."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]) -> None:
        self.input_name = input_name
        self._batches = list(batches)
        self._iter: Iterator[np.ndarray] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def sensitive_nodes(model: onnx.ModelProto) -> list[str]:
    """The layers int8 hurts most, kept in float by export's fallback: the first convolution (it sees
    raw pixels, whose range a single scale covers badly) and the last Gemm/MatMul (the classifier)."""
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    heads = [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    return [*convs[:1], *heads[-1:]]


def preprocess(src: Path, dst: Path) -> onnx.ModelProto:
    """onnxruntime's ``quant_pre_process`` (shape inference + graph optimisation) of ``src`` into ``dst``;
    node names in ``--exclude-nodes`` refer to this graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not dst.is_file():
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Performing symbolic shape inference..."
            quant_pre_process(str(src), str(dst))
    return onnx.load(str(dst))


def to_int8(
    src: Path,
    dst: Path,
    calibration: Iterable[np.ndarray],
    work_dir: Path,
    method: str = "minmax",
    keep_head_float: bool = True,
    scheme: Int8Scheme | None = None,
    exclude: Iterable[str] = (),
) -> Int8Scheme:
    """Static QDQ int8 (per-channel weights) in ``scheme``'s form (default: this CPU's), calibrated on
    ``calibration`` batches, with the nodes named in ``exclude`` left in float; returns the scheme used.
    A name that is not a node of the pre-processed graph is an error."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise ImatError(f"unknown calibration method {method!r} (choose from {', '.join(methods)})")
    scheme = scheme or int8_scheme("cpu")
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    pre = work_dir / "preprocessed.onnx"
    model = preprocess(src, pre)
    input_name = model.graph.input[0].name
    names = {n.name for n in model.graph.node}
    unknown = [name for name in exclude if name not in names]
    if unknown:
        convs = [n.name for n in model.graph.node if n.op_type == "Conv"][:3]
        raise ImatError(
            f"--exclude-nodes: no node named {unknown[0]!r} in the graph (conv nodes are named like "
            f"{', '.join(convs)})"
        )
    excluded = [n.name for n in model.graph.node if n.op_type in FLOAT_ONLY_OPS] + list(exclude)
    heads = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    if keep_head_float and heads:
        # The classifier is a tiny share of the compute, but int8 logits blur near-ties between the
        # 3rd and 4th classes, which is exactly what a top-3 metric looks at.
        excluded.append(heads[-1].name)
    reader = BatchReader(input_name, calibration)
    if not reader._batches:
        raise ImatError("int8 calibration needs at least one readable image")
    quantize_static(
        str(pre),
        str(dst),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=scheme.reduce_range,
        activation_type=types[scheme.activations],
        weight_type=types[scheme.weights],
        nodes_to_exclude=excluded,
        calibrate_method=methods[method],
        extra_options={
            "ActivationSymmetric": scheme.symmetric_activations,
            "WeightSymmetric": True,
            "CalibTensorRangeSymmetric": False,
            "QuantizeBias": scheme.quantize_bias,
        },
    )
    return scheme
