#!/bin/bash
# LST pretraining with torchrun, on one node or several: the paper's 1B LST (curriculum patching)
# by default.
#
#   bash examples/pretrain_lst_torchrun.sh CHECKPOINT_DIR TOKENIZER_MODEL TEXT_PREFIX SPEECH_PREFIX
#
# TEXT_PREFIX / SPEECH_PREFIX are indexed datasets written by tools/preprocess_data.py (text-only
# and aligned speech-text documents), blended 67% / 33% as in the paper. CHECKPOINT_DIR is both
# --save and --load: re-running the script resumes from its latest checkpoint. Flags are grouped as
# in Megatron-LM's examples; the YAML in CONFIG holds the rest (see examples/configs/). Environment:
#   GPUS_PER_NODE (8), CONFIG (examples/configs/paper_1b_lst.yaml), TP and PP (when set, they
#   override the parallel sizes in CONFIG; unset, CONFIG's hold, 1 where it has none),
#   TENSORBOARD_DIR (CHECKPOINT_DIR/tensorboard when the tensorboard package is installed; empty:
#   none), DISTRIBUTED_OPTIMIZER (1, the default: shard the optimizer state over data-parallel
#   ranks; 0: the plain optimizer, whatever CONFIG says).
#
# Several nodes: run the same command on every node with
#   NNODES=2 RDZV_ENDPOINT=node0.example.com:29400 [RDZV_ID=myrun] [MAX_RESTARTS=3]
# The agents meet at a c10d rendezvous on RDZV_ENDPOINT (a host:port every node reaches; the node
# whose address it is hosts it) and number the nodes themselves. With MAX_RESTARTS > 0 a failed
# worker or node makes torchrun restart every worker (a lost node must come back, or be replaced,
# for the NNODES nodes to meet again), and every rank resumes from the latest complete checkpoint
# in CHECKPOINT_DIR, which must be on storage all nodes share.
set -euo pipefail

if [ "$#" -ne 4 ]; then
    sed -n '5p' "$0" >&2
    exit 2
fi
CHECKPOINT_PATH=$1
TOKENIZER_MODEL=$2
TEXT_PREFIX=$3
SPEECH_PREFIX=$4

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CONFIG=${CONFIG:-$REPO_ROOT/examples/configs/paper_1b_lst.yaml}
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
have_module() { python -c "import importlib.util, sys; sys.exit(not any(importlib.util.find_spec(m) for m in sys.argv[1:]))" "$@"; }
# TensorBoard logs only where the package is installed (pip install -e '.[logging]'): the flag
# would stop the run at start otherwise.
if have_module tensorboard; then DEFAULT_TENSORBOARD_DIR=$CHECKPOINT_PATH/tensorboard; else DEFAULT_TENSORBOARD_DIR=; fi
TENSORBOARD_DIR=${TENSORBOARD_DIR-$DEFAULT_TENSORBOARD_DIR}
# The distributed optimizer's checkpoints resume with or without Apex / Transformer Engine, also
# under another parallel layout.
DISTRIBUTED_OPTIMIZER=${DISTRIBUTED_OPTIMIZER:-1}

# Megatron overlaps tensor-parallel communication with compute only with one connection.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

if [ "$NNODES" -eq 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
    DISTRIBUTED_ARGS=(--standalone --nnodes 1)
elif [ -z "${RDZV_ENDPOINT:-}" ]; then
    echo "NNODES=$NNODES needs RDZV_ENDPOINT=host:port, reachable from every node" >&2
    exit 2
else
    DISTRIBUTED_ARGS=(
        --nnodes "$NNODES"
        --rdzv-backend c10d
        --rdzv-endpoint "$RDZV_ENDPOINT"
        --rdzv-id "${RDZV_ID:-lst-pretrain}"
    )
fi
DISTRIBUTED_ARGS+=(--nproc-per-node "$GPUS_PER_NODE" --max-restarts "$MAX_RESTARTS")
# torch shares its rendezvous TCPStore with the workers and keeps it across restarts, so the
# workers of a restarted round would read the previous round's addresses (pytorch#135712):
# a store per round instead. pretrain_lst.py refuses --max-restarts > 0 without this.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

MODEL_ARGS=(
    --config "$CONFIG"            # preset, patching mode, curriculum, optimiser, batch sizes
)

TRAINING_ARGS=(
    --bf16
    --exit-signal-handler         # SIGTERM (torchrun passes on its own): save this iteration, exit
)
if [ "$DISTRIBUTED_OPTIMIZER" = 1 ]; then TRAINING_ARGS+=(--use-distributed-optimizer)
else TRAINING_ARGS+=(--no-use-distributed-optimizer); fi

# TP and PP, when set, override the parallel sizes in CONFIG (1 where CONFIG has none).
MODEL_PARALLEL_ARGS=()
if [ -n "${TP:-}" ]; then MODEL_PARALLEL_ARGS+=(--tensor-model-parallel-size "$TP"); fi
if [ -n "${PP:-}" ]; then MODEL_PARALLEL_ARGS+=(--pipeline-model-parallel-size "$PP"); fi

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
)
if [ -n "$TENSORBOARD_DIR" ]; then EVAL_AND_LOGGING_ARGS+=(--tensorboard-dir "$TENSORBOARD_DIR"); fi

# No `cd`: relative paths in the arguments stay relative to the caller's directory.
exec torchrun "${DISTRIBUTED_ARGS[@]}" "$REPO_ROOT/pretrain_lst.py" \
    "${MODEL_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    "${MODEL_PARALLEL_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${CHECKPOINT_ARGS[@]}" \
    "${EVAL_AND_LOGGING_ARGS[@]}"
