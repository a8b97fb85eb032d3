#!/usr/bin/env bash
# GPU acceptance for one machine with one NVIDIA GPU (about 5-6 minutes on an H200; budget: 8).
#
#   bash benchmarks/gpu_check.sh [OUT_CSV]          # default benchmarks/results/gpu_check.csv
#   bash benchmarks/gpu_check.sh --dry-run [OUT_CSV]  # the same steps on the CPU at toy sizes
#
# Runs from a copy of the checkout alone, with no network. Needs python with torch,
# torchvision, timm, onnxruntime-gpu and pandas. It also needs `onnx` (export, fp16 and int8
# conversion): when it is missing, it is installed from the wheels in .whl/ (git-ignored), which
# `bash benchmarks/gpu_wheels.sh PYTHON_VERSION` fills beforehand on a machine with network.
# albumentations/OpenCV are NOT needed: without them the end-to-end rows decode with PIL+torchvision
# (said in `note`); with them (wheels in .whl/ too) the end-to-end rows run `imat predict` itself.
#
# The table: one CSV, one row per check, appended by every part of the acceptance. Columns:
#   check           reference | model-only | end-to-end | (training checks: their own names)
#   arch            timm architecture (resnet50)
#   engine          "onnxruntime cuda", "onnxruntime tensorrt", "PyTorch eager cuda", ...
#   precision       fp32 | fp16 | int8 | bf16 ...
#   batch           batch size
#   images_per_s    throughput (empty when the check failed or measures none)
#   top1_agreement  same best class as the reference (onnxruntime CPU fp32 on the same images), 0..1
#   top3_agreement  same top-3 set as the reference, 0..1
#   ok              True when the check ran and met its bar (top-3 agreement >= 0.99 for inference)
#   note            what was measured or why it failed (engine build time, decoder, ...)
# Training checks come from benchmarks/gpu_check_train.py --out CSV, run after the inference checks
# when that file exists (with GPU_CHECK_DRY_RUN=1 in a dry run); they append rows with these columns.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python3}"
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry=1
    shift
fi
out="${1:-$root/benchmarks/results/gpu_check.csv}"
mkdir -p "$(dirname "$out")"
rm -f "$out"

if ! "$python" -c "import onnx" 2>/dev/null; then
    if compgen -G "$root/.whl/*.whl" >/dev/null; then
        echo "gpu_check: installing onnx from $root/.whl"
        "$python" -m pip install --quiet --no-index --find-links "$root/.whl" onnx
    else
        echo "gpu_check: the 'onnx' package is missing and $root/.whl has no wheels (run benchmarks/gpu_wheels.sh)" >&2
        exit 2
    fi
fi
# albumentations & co. when their wheels travelled too (optional: imat predict end to end)
if compgen -G "$root/.whl/albumentations-*.whl" >/dev/null && ! "$python" -c "import albumentations" 2>/dev/null; then
    "$python" -m pip install --quiet --no-index --find-links "$root/.whl" albumentations pydantic pyarrow || true
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS
if [[ $dry == 1 ]]; then
    "$python" "$here/gpu_check.py" --out "$out" --device cpu --providers cpu --arch resnet10t --size 32 \
        --classes 5 --train-images 64 --train-epochs 1 --train-batch 16 --val-images 24 \
        --calibration-images 16 --batch 8 --batches 2 --e2e-repeats 1 --workers 0
else
    "$python" "$here/gpu_check.py" --out "$out"
fi
if [[ -f "$here/gpu_check_train.py" ]]; then
    # GPU_CHECK_DRY_RUN=1 tells it to run on the CPU at toy sizes, as the inference part just did
    GPU_CHECK_DRY_RUN=$dry "$python" "$here/gpu_check_train.py" --out "$out"
fi
echo "gpu_check: done in $((SECONDS - start)) s; table in $out"
"$python" -c "import pandas as pd, sys; print(pd.read_csv(sys.argv[1]).to_string(index=False))" "$out"
