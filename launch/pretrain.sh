#!/usr/bin/env bash
# Single-node EarlyBERT pre-training with the deepspeed launcher: one rank per GPU, or NPROC CPU ranks
# (default 2) when no GPU is visible. All arguments go to `earlybert-ds pretrain` (see --help).
#
#   launch/pretrain.sh --output-dir runs/demo                     # built-in corpus, defaults
#   launch/pretrain.sh --config bert_base --corpus /data/text --data.tokenizer /models/bert-base-uncased \
#     --deepspeed ds_configs/zero2_bf16.json --output-dir runs/base  # BERT-base's recipe on all GPUs
#
# Environment: NPROC (ranks; default: all GPUs, or 2 on CPU), MASTER_PORT (default 29500),
# OMP_NUM_THREADS (CPU only; default: cores / ranks), DS_ACCELERATOR=cpu (train on the CPU even with GPUs).
# GPUs are counted by the repository venv's torch (else python3's); where nvidia-smi lists GPUs that this torch
# cannot use, the script stops rather than train on the CPU.
set -euo pipefail
source "$(dirname "$0")/common.sh"
single_node pretrain "$@"
