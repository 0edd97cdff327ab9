#!/bin/bash
# Single-node LST pretraining with torchrun: the paper's 1B LST (curriculum patching) by default.
#
#   bash examples/pretrain_lst_torchrun.sh CHECKPOINT_DIR TOKENIZER_MODEL TEXT_PREFIX SPEECH_PREFIX
#
# TEXT_PREFIX / SPEECH_PREFIX are indexed datasets written by tools/preprocess_data.py (text-only
# and aligned speech-text documents), blended 67% / 33% as in the paper. CHECKPOINT_DIR is both
# --save and --load: re-running the script resumes from its latest checkpoint. Flags are grouped as
# in Megatron-LM's examples; the YAML in CONFIG holds the rest (see examples/configs/). Environment:
#   GPUS_PER_NODE (8), CONFIG (examples/configs/paper_1b_lst.yaml), TP (1), PP (1),
#   TENSORBOARD_DIR (CHECKPOINT_DIR/tensorboard).
set -euo pipefail

if [ "$#" -ne 4 ]; then
    sed -n '4,5p' "$0" >&2
    exit 2
fi
CHECKPOINT_PATH=$1
TOKENIZER_MODEL=$2
TEXT_PREFIX=$3
SPEECH_PREFIX=$4

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CONFIG=${CONFIG:-$REPO_ROOT/examples/configs/paper_1b_lst.yaml}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$CHECKPOINT_PATH/tensorboard}

# Megatron overlaps tensor-parallel communication with compute only with one connection.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

DISTRIBUTED_ARGS=(
    --standalone
    --nnodes 1
    --nproc-per-node "$GPUS_PER_NODE"
)

MODEL_ARGS=(
    --config "$CONFIG"            # preset, patching mode, curriculum, optimiser, batch sizes
)

TRAINING_ARGS=(
    --bf16
    --use-distributed-optimizer
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size "${TP:-1}"
    --pipeline-model-parallel-size "${PP:-1}"
)

DATA_ARGS=(
    --data-path 0.67 "$TEXT_PREFIX" 0.33 "$SPEECH_PREFIX"
    --tokenizer-model "$TOKENIZER_MODEL"
    --split 989,10,1
    --num-workers 2
)

CHECKPOINT_ARGS=(
    --save "$CHECKPOINT_PATH"
    --load "$CHECKPOINT_PATH"     # the same directory: resume automatically
)

EVAL_AND_LOGGING_ARGS=(
    --log-interval 10
    --eval-interval 1000
    --eval-iters 50
    --tensorboard-dir "$TENSORBOARD_DIR"
)

cd "$REPO_ROOT"
exec torchrun "${DISTRIBUTED_ARGS[@]}" pretrain_lst.py \
    "${MODEL_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    "${MODEL_PARALLEL_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${CHECKPOINT_ARGS[@]}" \
    "${EVAL_AND_LOGGING_ARGS[@]}"
