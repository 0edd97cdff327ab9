#!/bin/bash
# LST (curriculum patching) against its token baseline under one training budget, as in the
# paper's compute-controlled comparison: plan the steps, train both, evaluate both, compare.
#
#   bash examples/compute_controlled/run.sh OUT_DIR TOKENIZER_MODEL TEXT_PREFIX SPEECH_PREFIX EVAL_JSONL...
#
# Environment: LST_CONFIG / BASELINE_CONFIG (examples/configs/paper_1b_{lst,baseline}.yaml),
# BUDGET_FLOPS (1e20) or BUDGET_STEPS, CONTROL (compute: equal steps of equal global positions;
# flops: equal total FLOPs; data: equal raw tokens), TOKENS_PER_PATCH (3.1), NPROC (GPUs, 8).
# Results: OUT_DIR/{lst,baseline}/ (checkpoints, metrics.jsonl, eval.json), OUT_DIR/plan.json,
# OUT_DIR/comparison.json and OUT_DIR/loss_vs_flops.png. Re-running resumes unfinished runs.
set -euo pipefail

if [ "$#" -lt 5 ]; then
    sed -n '5p' "$0" >&2
    exit 2
fi
OUT_DIR=$1
TOKENIZER_MODEL=$2
TEXT_PREFIX=$3
SPEECH_PREFIX=$4
shift 4
EVAL_ITEMS=("$@")

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LST_CONFIG=${LST_CONFIG:-$REPO_ROOT/examples/configs/paper_1b_lst.yaml}
BASELINE_CONFIG=${BASELINE_CONFIG:-$REPO_ROOT/examples/configs/paper_1b_baseline.yaml}
CONTROL=${CONTROL:-compute}
NPROC=${NPROC:-8}
COMPARE=("python" "$REPO_ROOT/examples/compute_controlled/compare.py")
mkdir -p "$OUT_DIR"

if [ -n "${BUDGET_STEPS:-}" ]; then
    BUDGET_ARGS=(--budget-steps "$BUDGET_STEPS")
else
    BUDGET_ARGS=(--budget-flops "${BUDGET_FLOPS:-1e20}")
fi
"${COMPARE[@]}" plan --lst-config "$LST_CONFIG" --baseline-config "$BASELINE_CONFIG" \
    --tokenizer-model "$TOKENIZER_MODEL" "${BUDGET_ARGS[@]}" --control "$CONTROL" \
    --tokens-per-patch "${TOKENS_PER_PATCH:-3.1}" --world-size "$NPROC" --out "$OUT_DIR/plan.json"

DISTRIBUTED_ARGS=(--standalone --nnodes 1 --nproc-per-node "$NPROC")
DATA_ARGS=(
    --data-path 0.67 "$TEXT_PREFIX" 0.33 "$SPEECH_PREFIX"
    --tokenizer-model "$TOKENIZER_MODEL"
    --split 989,10,1
)

for MODEL in lst baseline; do
    if [ "$MODEL" = lst ]; then CONFIG=$LST_CONFIG; else CONFIG=$BASELINE_CONFIG; fi
    STEPS=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['steps'][sys.argv[2]])" \
        "$OUT_DIR/plan.json" "$MODEL")
    RUN_DIR=$OUT_DIR/$MODEL
    # The run's own schedule spans the planned steps (the LR decays to its end).
    torchrun "${DISTRIBUTED_ARGS[@]}" "$REPO_ROOT/pretrain_lst.py" \
        --config "$CONFIG" --train-iters "$STEPS" "${DATA_ARGS[@]}" \
        --save "$RUN_DIR" --load "$RUN_DIR"
    "${COMPARE[@]}" evaluate --checkpoint "$RUN_DIR" --items "${EVAL_ITEMS[@]}" \
        --tokenizer-model "$TOKENIZER_MODEL" --out "$RUN_DIR/eval.json"
done

"${COMPARE[@]}" report --runs "lst=$OUT_DIR/lst" "baseline=$OUT_DIR/baseline" --out-dir "$OUT_DIR"
