#!/usr/bin/env bash
# The GPU suite: what a session with a lent GPU runs, in one call (see benchmarks/README.md).
#
#   bash tools/gpu_suite.sh OUT_DIR
#
# 1. installs megatron-lst into the machine's Python without touching its torch/triton, taking
#    megatron-core from wheels/ (carried: the device machine has no internet);
# 2. runs the kernel tests on CUDA (compiled Triton vs the PyTorch references);
# 3. runs the kernel microbenchmarks at the shapes;
# 4. times training steps of the paper's 1B LST and baseline (layers reduced to fit one GPU).
# Each stage writes its log and JSON under OUT_DIR; a failing stage does not stop the later ones,
# and the script exits non-zero if any failed.
set -uo pipefail
OUT=${1:?usage: bash tools/gpu_suite.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0

stage() {  # stage NAME COMMAND...: run, log to OUT/NAME.log, remember a failure
    local name=$1; shift
    echo "=== $name: $*"
    if ! "$@" >"$OUT/$name.log" 2>&1; then
        echo "=== $name FAILED (see $OUT/$name.log)"; tail -20 "$OUT/$name.log"; status=1
    fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/card.csv" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee "$OUT/versions.txt"
stage install "$PY" -m pip install --no-deps --no-index --find-links wheels megatron-core -e .
stage kernel_tests "$PY" -m pytest -q -p no:cacheprovider tests/kernels
stage bench_kernels "$PY" tools/bench_kernels.py --device cuda --out "$OUT/bench_kernels.json"
for model in lst baseline; do
    stage "bench_step_$model" "$PY" tools/bench_step.py --steps 10 --warmup 3 \
        --json "$OUT/bench_step_$model.json" -- \
        --config "examples/configs/paper_1b_$model.yaml" --bf16 \
        --num-layers 8 --micro-batch-size 1 --global-batch-size 1
done
exit $status
