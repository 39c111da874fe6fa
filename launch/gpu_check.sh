#!/usr/bin/env bash
# The GPU check (launch/gpu_check.py): on one CUDA GPU, in a few minutes, the preflight, the 1-GPU pipeline under
# ZeRO-2 in bf16 and fp16 (loss falls, ticket drawn, shrunk engine trains) and the throughput suite at BERT-base with
# MFU against the GPU's measured bf16 peak. Each step has a time limit; OUT/gpu_check.json is rewritten after every
# step and one line per step says its verdict. Stops at once, with a message, where there is no CUDA.
#
#   bash launch/gpu_check.sh [--out runs/gpu_check] [--work DIR] [--timeout [STEP=]S] [--resume] [--corpus FILE]
#
# Uses .venv/bin/python when launch/setup.sh made it, else the python3 on PATH (which must have torch with CUDA and
# what launch/preflight.py lists). See docs/gpu.md.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="$here/.venv/bin/python"; [ -x "$py" ] || py="$(command -v python3)"
exec "$py" "$here/launch/gpu_check.py" "$@"
