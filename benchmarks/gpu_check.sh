#!/usr/bin/env bash
# The GPU checks of lit_ptq, as one prepared script for a machine with a CUDA device:
#
#   1. fake-quantized evaluation and calibration against the float model, eager and through
#      torch.compile (benchmarks/bench_ptq.py --compile), on itpn_base and deit_base_patch16_224;
#   2. the low-bit recipe steps per block, ridge + GPTQ and block reconstruction
#      (benchmarks/bench_recipes.py blocks), first block of each model;
#   3. onnxruntime's CUDAExecutionProvider on the exported int8 files against onnxruntime float
#      and PyTorch float (benchmarks/bench_onnx.py speed --device cuda; needs onnxruntime-gpu,
#      otherwise the step says so and the others still run).
#
# Usage (from anywhere; each step has its own time limit, about 13 minutes in all):
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]      # default: $OUT if set, else benchmarks/gpu
#
# Every table is printed and each step's JSON (the GPU's name in it) is written to RESULTS_DIR.
# Without a CUDA device the script says so in one line and exits 0: nothing here may fail on a
# CPU-only machine.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
results="${1:-${OUT:-benchmarks/gpu}}"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device (or no torch) for $python here; nothing to measure"
    exit 0
fi
mkdir -p "$results"
"$python" -c 'import torch; print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")'

status=0
step() {  # step SECONDS NAME COMMAND...: run one measurement under a time limit, keep going on failure
    local limit="$1" name="$2"
    shift 2
    echo
    echo "## $name"
    timeout "$limit" "$@" 2>&1 | tee "$results/$name.log"
    local rc="${PIPESTATUS[0]}"
    if [ "$rc" -ne 0 ]; then
        echo "gpu_check: $name stopped with status $rc (124: over its ${limit} s)"
        status=1
    fi
}

for model in itpn_base deit_base_patch16_224; do
    step 200 "ptq_$model" "$python" benchmarks/bench_ptq.py --device cuda --model "$model" --methods minmax omse \
        --placement seed matmul --batch-size 64 --calib-batch-size 32 --batches 4 --repeats 10 --compile \
        --json "$results/ptq_$model.json"
    step 120 "recipes_$model" "$python" benchmarks/bench_recipes.py blocks --device cuda --model "$model" \
        --images 32 --batch-size 32 --blocks 2 --recon-iters 20 --json "$results/recipes_$model.json"
done

if "$python" -c 'import sys, onnxruntime as o; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; then
    step 200 onnx_cuda "$python" benchmarks/bench_onnx.py speed --device cuda --models itpn_base deit_base_patch16_224 \
        --placements full matmul --weights normal --batch-sizes 64 8 --repeats 10 --json "$results/onnx_cuda.json"
else
    echo
    echo "## onnx_cuda"
    echo "gpu_check: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu); onnxruntime on the GPU not measured"
fi
exit "$status"
