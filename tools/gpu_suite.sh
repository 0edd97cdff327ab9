#!/usr/bin/env bash
# The GPU suite in one command (tools/gpu_suite.py says what it runs; benchmarks/README.md how to
# prepare and launch it on a lent GPU):
#
#   bash tools/gpu_suite.sh [--out DIR]     # GPU machine: DIR (default $OUT) gets 2 files
#   bash tools/gpu_suite.sh --cpu-dry-run   # the same stages on CPU at tiny shapes (CI)
#
# PYTHON names the machine's Python, whose torch and triton the suite uses (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" tools/gpu_suite.py "$@"
