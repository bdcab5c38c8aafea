#!/usr/bin/env bash
# The prepared device run of issue 22 on one CUDA GPU: the --quick subset first, then the full run, within one
# 10-minute command (quick: 100 s budget, full: 360 s; each run records the rows it had no time for as skipped,
# and `timeout` is the hard stop). Writes benchmarks/results/gpu_quick.{json,png,log}, gpu.{json,png,log} and
# gpu_device.txt (nvidia-smi, torch, CUDA, transformers).
#   bash benchmarks/run_gpu.sh          # quick, then full
#   bash benchmarks/run_gpu.sh quick    # or: full
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
RESULTS=benchmarks/results
STAGE="${1:-all}"
mkdir -p "$RESULTS"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} | tee "$RESULTS/gpu_device.txt"

status=0
if [ "$STAGE" = all ] || [ "$STAGE" = quick ]; then
    timeout 150 "$PYTHON" benchmarks/bench_gpu.py --device cuda --quick --time-budget-s 100 \
        --output "$RESULTS/gpu_quick.json" 2>&1 | tee "$RESULTS/gpu_quick.log"
    status=${PIPESTATUS[0]}
    echo "quick run exit status: $status"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = full ]; then
    timeout 420 "$PYTHON" benchmarks/bench_gpu.py --device cuda --time-budget-s 360 \
        --output "$RESULTS/gpu.json" 2>&1 | tee "$RESULTS/gpu.log"
    full=${PIPESTATUS[0]}
    echo "full run exit status: $full"
    [ "$full" -ne 0 ] && status=$full
fi
exit "$status"
