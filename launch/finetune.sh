#!/usr/bin/env bash
# Single-node EarlyBERT fine-tuning with the deepspeed launcher: one rank per GPU, or NPROC CPU ranks (default 2)
# when no GPU is visible. All arguments go to `earlybert-ds finetune` (see --help). The batch of 32 is over all
# ranks (train.global_batch_size): on 8 GPUs each takes 4 sequences a step.
#
#   launch/finetune.sh --config glue --task sst2 --model runs/base/final --data /data/glue --output-dir runs/sst2
#   launch/finetune.sh --config squad --task squad --model /models/bert-base-uncased --data /data/squad \
#     --deepspeed ds_configs/zero2_bf16.json --output-dir runs/squad
#
# Environment: NPROC (ranks; default: all GPUs, or 2 on CPU), MASTER_PORT (default 29500),
# OMP_NUM_THREADS (CPU only; default: cores / ranks).
set -euo pipefail
source "$(dirname "$0")/common.sh"
single_node finetune "$@"
