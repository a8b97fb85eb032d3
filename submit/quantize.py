"""Precision conversions of an exported fp32 ONNX model: fp16 weights and int8 static quantisation.

fp16 uses onnxruntime's own converter (``onnxruntime.transformers.float16.convert_float_to_float16``,
shipped with onnxruntime-gpu; onnxconverter-common is not needed) with ``keep_io_types=True`` so callers
still feed and read fp32. That converter appends the input casts at the end of the node list, which
the ONNX checker rejects, so the graph is topologically re-sorted afterwards.

int8 is onnxruntime static quantisation in QDQ format with per-channel weights, calibrated (MinMax by
default) on real training images after ``quant_pre_process`` (shape inference + graph optimisation).
Softmax and TopK, and by default the final classifier (Gemm/MatMul), stay in float so the logits and
in-graph probabilities keep their precision."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from imat.errors import ImatError

log = logging.getLogger(__name__)

FLOAT_ONLY_OPS = ("Softmax", "TopK")


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
    onnx.save(half, str(dst))


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


def to_int8(
    src: Path,
    dst: Path,
    calibration: Iterable[np.ndarray],
    work_dir: Path,
    method: str = "minmax",
    keep_head_float: bool = True,
) -> None:
    """Static QDQ int8 (per-channel weights, int8 activations) calibrated on ``calibration`` batches."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise ImatError(f"unknown calibration method {method!r} (choose from {', '.join(methods)})")
    pre = work_dir / "preprocessed.onnx"
    quant_pre_process(str(src), str(pre))
    model = onnx.load(str(pre))
    input_name = model.graph.input[0].name
    excluded = [n.name for n in model.graph.node if n.op_type in FLOAT_ONLY_OPS]
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
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded,
        calibrate_method=methods[method],
        extra_options={"CalibTensorRangeSymmetric": False},
    )
