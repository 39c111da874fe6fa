#!/usr/bin/env bash
# Single-node EarlyBERT pre-training with the deepspeed launcher: one rank per GPU, or NPROC CPU ranks
# (default 2) when no GPU is visible. All arguments go to `earlybert-ds pretrain` (see --help).
#
#   launch/pretrain.sh --output-dir runs/demo                     # built-in corpus, defaults
#   NPROC=8 launch/pretrain.sh --corpus /data/text --deepspeed ds_configs/zero2_bf16.json --output-dir runs/x
#
# Environment: NPROC (ranks; default: all GPUs, or 2 on CPU), MASTER_PORT (default 29500),
# OMP_NUM_THREADS (CPU only; default: cores / ranks).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
[ -x "$here/.venv/bin/deepspeed" ] && export PATH="$here/.venv/bin:$PATH"
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
else
  export DS_ACCELERATOR=cpu
  NPROC="${NPROC:-2}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
fi
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --module earlybert_ds pretrain "$@"
