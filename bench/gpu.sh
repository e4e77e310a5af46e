#!/usr/bin/env bash
# One command for a GPU: the TTFT, decode, train-throughput (MFU) and server-load benchmarks on llama8b_comb shapes
# with random weights, the serving memory plan, then a section of bench/RESULTS.md (bench/gpu_report.py).
#
#     make bench-gpu        # or: bash bench/gpu.sh   (after `pip install -e ".[cuda]"`)
#
# Writes bench/results/gpu-{memory_plan,ttft,decode,attention,train_throughput,server_load}.json and a log per step
# in bench/results/gpu-logs/. A step that fails (e.g. out of memory) is recorded and the others still run.
# CONFIG=... and PYTHON=... override the defaults.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-llama8b_comb}
RESULTS=bench/results
LOGS=$RESULTS/gpu-logs
mkdir -p "$LOGS"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
failed=()

step() {  # step NAME COMMAND...: run it, log it, remember a failure
    local name=$1; shift
    echo "== $name: $*" | tee "$LOGS/$name.log"
    if ! "$@" 2>&1 | tee -a "$LOGS/$name.log"; then
        failed+=("$name")
        echo "== $name FAILED (see $LOGS/$name.log)"
    fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOGS/nvidia-smi.log"

step memory_plan sh -c "$PYTHON serve.py --dry-run --config $CONFIG > $RESULTS/gpu-memory_plan.json"
# bfloat16 weights: float32 copies of an 8B backbone would take 32 GB of the 80
step ttft $PYTHON bench/ttft.py --config "$CONFIG" --contexts 1024 4096 --batches 1 8 32 --repeats 3 \
    --out $RESULTS/gpu-ttft.json param_dtype=bfloat16
step decode $PYTHON bench/decode.py --config "$CONFIG" --contexts 1024 4096 --batches 1 8 32 --steps 64 \
    --out $RESULTS/gpu-decode.json
step attention $PYTHON bench/attention.py --config "$CONFIG" --tokens 4096 --impls einsum cudnn --repeats 5 \
    --out $RESULTS/gpu-attention.json
# the trainable encoder + cross blocks of llama8b_comb are ~3.5B parameters: bfloat16 params and Adam state, batch 1
step train_throughput $PYTHON bench/train_throughput.py --configs "$CONFIG" --steps 5 --batch 1 \
    --out $RESULTS/gpu-train_throughput.json param_dtype=bfloat16 train.grad_accum_steps=1
if [ -f bench/server_load.py ]; then
    # its own JSON goes to the log (--no-write keeps the CPU results); gpu_report.py extracts it
    step server_load $PYTHON bench/server_load.py --config "$CONFIG" --requests 64 --clients 8 --documents 32 \
        --no-write weights.source=random param_dtype=bfloat16 serve.pool_tokens=262144 serve.max_batch=8
else
    echo "== server_load: bench/server_load.py not found, skipped"
fi

$PYTHON bench/gpu_report.py --failed "${failed[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
