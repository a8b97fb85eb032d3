#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels benchmarks/gpu_check.sh installs on a GPU machine without
# network: `onnx` (+ ml_dtypes) for the given Python version, Linux x86-64. With --imat-predict also
# albumentations 2.0.8 and what it needs beyond torch/pandas (OpenCV headless, scipy, pydantic,
# pyarrow, ...), so the end-to-end rows run `imat predict` itself; that adds about 150 MB. With
# --tensorrt the TensorRT libraries the TensorRT rows need on a machine without them.
#
#   bash benchmarks/gpu_wheels.sh 3.12                  # python version of the GPU machine
#   bash benchmarks/gpu_wheels.sh 3.12 --imat-predict
#   bash benchmarks/gpu_wheels.sh 3.12 --tensorrt    # also the TensorRT 10 libraries (~2 GB), the
#                                                    # version constraints.txt pins, from pypi.nvidia.com
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pyver="${1:?usage: gpu_wheels.sh PYTHON_VERSION [--imat-predict]}"
python="${PYTHON:-python3}"
common=(--only-binary=:all: --python-version "$pyver" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        -d "$root/.whl")
onnx_version="$("$python" -c 'import onnx; print(onnx.__version__)' 2>/dev/null || echo 1.23.2)"
"$python" -m pip download --no-deps "${common[@]}" "onnx==$onnx_version" ml_dtypes
for flag in "${@:2}"; do
    case "$flag" in
        --imat-predict)
            "$python" -m pip download "${common[@]}" albumentations==2.0.8 pydantic pyarrow opencv-python-headless ;;
        --tensorrt)
            trt="$(grep '^tensorrt-cu13-libs==' "$root/constraints.txt")"
            "$python" -m pip download --no-deps "${common[@]}" --extra-index-url https://pypi.nvidia.com "$trt" ;;
        *) echo "gpu_wheels.sh: unknown option $flag" >&2; exit 2 ;;
    esac
done
du -sh "$root/.whl"
