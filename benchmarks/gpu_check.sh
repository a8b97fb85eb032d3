#!/usr/bin/env bash
# GPU acceptance for one machine with one NVIDIA GPU (about 5-6 minutes on an H200; budget: 8). A hard
# stop at GPU_CHECK_DEADLINE_S (530 s) ends whatever still runs; every finished row is already in the
# table (rows are written as they are measured) and a "hard stop" row says what was cut. The inference
# part ends GPU_CHECK_TRAIN_RESERVE_S (120 s) before the deadline when gpu_check_train.py follows it.
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
# TensorRT needs the TensorRT 10 libraries the pinned onnxruntime-gpu links (libnvinfer.so.10,
# libnvonnxparser.so.10): from the machine, or the tensorrt-cu13-libs wheel in .whl/ (`gpu_wheels.sh
# PYVER --tensorrt`, ~2 GB); the provider report printed first says which providers start and why not.
# Each engine's note holds its top-1/top-3 accuracy on the labelled images beside fp32's, and for
# TensorRT whether it took the whole graph (a split engine fails the row).
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
# the TensorRT libraries when their wheel travelled (the TensorRT rows fail, with the reason, without)
if compgen -G "$root/.whl/tensorrt_cu13_libs-*.whl" >/dev/null && ! "$python" -c "import tensorrt_libs" 2>/dev/null; then
    echo "gpu_check: installing the TensorRT libraries from $root/.whl"
    "$python" -m pip install --quiet --no-index --find-links "$root/.whl" tensorrt-cu13-libs || true
fi
# albumentations & co. when their wheels travelled too (optional: imat predict end to end)
if compgen -G "$root/.whl/albumentations-*.whl" >/dev/null && ! "$python" -c "import albumentations" 2>/dev/null; then
    "$python" -m pip install --quiet --no-index --find-links "$root/.whl" albumentations pydantic pyarrow || true
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS
deadline="${GPU_CHECK_DEADLINE_S:-530}"  # hard stop, before 9 minutes
reserve=0
[[ -f "$here/gpu_check_train.py" ]] && reserve="${GPU_CHECK_TRAIN_RESERVE_S:-120}"  # the training checks' share
hard_stop() {  # $1: the part that was cut; the header too when it was cut before its first row
    "$python" -c 'import csv, os, sys
out, part = sys.argv[1], sys.argv[2]
header = not os.path.exists(out) or os.path.getsize(out) == 0
with open(out, "a", newline="") as f:
    w = csv.writer(f)
    if header:
        w.writerow(["check", "arch", "engine", "precision", "batch", "images_per_s", "top1_agreement",
                    "top3_agreement", "ok", "note"])
    w.writerow(["hard stop", "", part, "", "", "", "", "", False, "stopped at the deadline; rows above are complete"])' \
        "$out" "$1"
}
# which providers start here, and why not (one line each)
"$python" -c 'from submit.runtime import provider_report
for name, ok, why in provider_report():
    print("gpu_check: provider", name.ljust(8), "yes" if ok else "no ", why)' || true
infer_s=$((deadline - reserve - (SECONDS - start)))
if [[ $dry == 1 ]]; then
    timeout -k 5 "$infer_s" "$python" "$here/gpu_check.py" --out "$out" --device cpu --providers cpu \
        --arch resnet10t --size 32 --classes 5 --train-images 64 --train-epochs 1 --train-batch 16 \
        --val-images 24 --calibration-images 16 --batch 8 --batches 2 --e2e-repeats 1 --workers 0 \
        || { rc=$?; [[ $rc == 124 || $rc == 137 ]] && hard_stop inference; }
else
    timeout -k 5 "$infer_s" "$python" "$here/gpu_check.py" --out "$out" --budget-s $((infer_s - 90)) \
        || { rc=$?; [[ $rc == 124 || $rc == 137 ]] && hard_stop inference; }
fi
if [[ -f "$here/gpu_check_train.py" ]]; then
    # GPU_CHECK_DRY_RUN=1 tells it to run on the CPU at toy sizes, as the inference part just did
    left=$((deadline - (SECONDS - start)))
    if (( left > 10 )); then
        GPU_CHECK_DRY_RUN=$dry timeout -k 5 "$left" "$python" "$here/gpu_check_train.py" --out "$out" \
            || { rc=$?; [[ $rc == 124 || $rc == 137 ]] && hard_stop training; }
    else
        hard_stop training
    fi
fi
echo "gpu_check: done in $((SECONDS - start)) s; table in $out"
"$python" -c "import pandas as pd, sys; print(pd.read_csv(sys.argv[1]).to_string(index=False))" "$out"
