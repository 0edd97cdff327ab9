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

# The traps are set before anything is started, so that no signal can kill the script and leave the
# agent running without it: a signal before the agent's start stops the script before it (or, when it
# comes during the start, is passed on as soon as the agent's pid is known).
TORCHRUN_PID=
PENDING_SIGNAL=
STOPPED_BY=
forward_signal() {  # $1: TERM, INT, HUP or QUIT
    if [ "$1" = TERM ]; then
        STOPPED_BY=SIGTERM
        # The workers are the agent's children (each in a session of its own). None yet (the
        # agent is still meeting the other nodes): the agent stops as on SIGINT.
        if ! pkill -TERM -P "$TORCHRUN_PID"; then kill -INT "$TORCHRUN_PID" 2>/dev/null || true; fi
    else
        kill -s "$1" "$TORCHRUN_PID" 2>/dev/null || true
    fi
}
on_signal() {  # $1: TERM, INT, HUP or QUIT
    if [ -z "$TORCHRUN_PID" ]; then PENDING_SIGNAL=${PENDING_SIGNAL:-$1}; else forward_signal "$1"; fi
}
for signal in TERM INT HUP QUIT; do
    # shellcheck disable=SC2064  # the signal's name now
    trap "on_signal $signal" "$signal"
done
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

# SIGTERM (preemption, `docker stop`, `kill`) goes to the workers, which finish their iteration,
# save it (--exit-signal-handler) and exit 0; torchrun's agent ignores it, so that it neither kills
# the workers 30 s later (cutting a long save off) nor re-raises the signal on its way down, which
# made the script exit 1 after a clean save. The agent still stops its workers on SIGINT, SIGHUP and
# SIGQUIT, which the script passes on. Exit status: torchrun's, 0 when every worker exited 0
# (training finished, an exit condition, or a stop on SIGTERM after its save; compare the latest
# checkpoint with --train-iters), non-zero when a worker failed (docs/training.md, "Launching").
DISTRIBUTED_ARGS+=(--signals-to-handle SIGINT,SIGHUP,SIGQUIT)
if [ -n "$PENDING_SIGNAL" ]; then
    echo "stopped by SIG$PENDING_SIGNAL before torchrun started: nothing ran; run the script" \
        "again to start (or resume from the latest checkpoint in $CHECKPOINT_PATH)" >&2
    exit $((128 + $(kill -l "$PENDING_SIGNAL")))
fi
# No `cd`: relative paths in the arguments stay relative to the caller's directory. The agent runs
# in a process group of its own (set -m), so a Ctrl-C reaches it once, from this script.
set -m
bash -c 'trap "" TERM; exec "$@"' torchrun torchrun "${DISTRIBUTED_ARGS[@]}" \
    "$REPO_ROOT/pretrain_lst.py" \
    "${MODEL_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    "${MODEL_PARALLEL_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${CHECKPOINT_ARGS[@]}" \
    "${EVAL_AND_LOGGING_ARGS[@]}" &
TORCHRUN_PID=$!
set +m
# A signal that came while the agent was being started is passed on now.
if [ -n "$PENDING_SIGNAL" ]; then forward_signal "$PENDING_SIGNAL"; fi

# `wait` returns early (status > 128) when a trapped signal arrives; the agent goes on.
while true; do
    STATUS=0
    wait "$TORCHRUN_PID" || STATUS=$?
    kill -0 "$TORCHRUN_PID" 2>/dev/null || break
done
trap - TERM INT HUP QUIT
if [ -n "$STOPPED_BY" ]; then
    SAVED=$(cat "$CHECKPOINT_PATH/latest_checkpointed_iteration.txt" 2>/dev/null || echo none)
    if [ "$STATUS" -eq 0 ]; then
        echo "stopped by $STOPPED_BY after saving: latest checkpoint in $CHECKPOINT_PATH is" \
            "iteration $SAVED; run the script again to resume" >&2
    else
        echo "stopped by $STOPPED_BY, but torchrun ended with status $STATUS (a worker failed," \
            "or none had started): latest checkpoint in $CHECKPOINT_PATH is iteration $SAVED;" \
            "see the errors above" >&2
    fi
fi
exit "$STATUS"
