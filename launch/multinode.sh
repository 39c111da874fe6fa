#!/usr/bin/env bash
# Multi-node EarlyBERT pre-training (or fine-tuning) with DeepSpeed's standard launcher: run this ONCE, on node 0
# (the first host of HOSTFILE); DeepSpeed starts a launcher on every host over pdsh/ssh, and each starts `slots`
# ranks there. A first argument `finetune` runs `earlybert-ds finetune`; all other arguments go to the command (see
# `earlybert-ds pretrain --help`).
#
#   HOSTFILE=hosts launch/multinode.sh --output-dir /shared/runs/x --deepspeed ds_configs/zero2_bf16.json ...
#   HOSTFILE=hosts launch/multinode.sh finetune --config glue --task mnli --model /shared/runs/x/final ...
#
# Needs pdsh on this node (apt-get install pdsh) and passwordless ssh from it to every host, itself included.
# Every node needs the repository and its .venv at the same path (each runs `cd $PWD; .venv/bin/python -m
# deepspeed.launcher.launch ...`), and the corpus. Without ssh: launch/multinode_nossh.sh; SLURM: launch/slurm.sbatch.
#
# Environment, set on this node only:
#   HOSTFILE      default launch/hostfile: one line `HOST slots=N` per node, names that ssh reaches
#                 (see launch/hostfile.example); checked before launching
#   MASTER_ADDR   node 0's address as every node reaches it; default: the first host of HOSTFILE
#   MASTER_PORT   default 29500; free on node 0 and open between the nodes
#   SSH_TIMEOUT   seconds each host may take to answer ssh before the launch is refused (default 10)
#   EARLYBERT_DIST_TIMEOUT (default 600 s), GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, DS_ACCELERATOR and
#                 OMP_NUM_THREADS (default: cores / slots of the first host): see launch/multinode_nossh.sh.
# DeepSpeed forwards only NCCL_* and PYTHON* (and a few MPI) variables to the other nodes, plus the lines of
# ~/.deepspeed_env and ./.deepspeed_env. This script also forwards DS_ACCELERATOR and the OMP_*, GLOO_*, TORCH_*,
# EARLYBERT_*, WANDB_*, HF_* and TOKENIZERS_* variables, except secrets (*KEY*, *TOKEN*, *SECRET*, *PASSWORD*:
# pdsh would show them on a command line; log in to wandb/HF on each node instead).
# Storage: --output-dir must be the same shared directory on every node; --data.cache_dir may be node-local
# (see launch/multinode_nossh.sh).
set -euo pipefail
source "$(dirname "$0")/common.sh"
subcommand=pretrain  # or the first argument: pretrain or finetune
case "${1:-}" in pretrain|finetune) subcommand="$1"; shift ;; esac
HOSTFILE="${HOSTFILE:-$here/launch/hostfile}"
check_hostfile "$HOSTFILE"
command -v pdsh >/dev/null || { echo "error: pdsh is not installed on this node (apt-get install pdsh);" \
  "without ssh, start launch/multinode_nossh.sh on every node" >&2; exit 2; }
for host in $(sed 's/#.*//' "$HOSTFILE" | awk 'NF {print $1}'); do
  ssh -o BatchMode=yes -o ConnectTimeout="${SSH_TIMEOUT:-10}" "$host" true </dev/null || {
    echo "error: $HOSTFILE: cannot ssh to '$host' without a password within ${SSH_TIMEOUT:-10} s" >&2; exit 2; }
done
cpu_defaults "$SLOTS"
DS_ENV_FILE="$(mktemp)"
trap 'rm -f "$DS_ENV_FILE"' EXIT
cat ~/.deepspeed_env ./.deepspeed_env 2>/dev/null >"$DS_ENV_FILE" || true
env | grep -E '^(DS_ACCELERATOR|OMP_|GLOO_|TORCH_|EARLYBERT_|WANDB_|HF_|TOKENIZERS_)[A-Za-z0-9_]*=' \
  | grep -vE '^[^=]*(KEY|TOKEN|SECRET|PASSWORD)' >>"$DS_ENV_FILE" || true
export DS_ENV_FILE  # DeepSpeed reads ~/$DS_ENV_FILE and ./$DS_ENV_FILE: an absolute path is read as is
deepspeed --hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$FIRST_HOST}" --master_port "${MASTER_PORT:-29500}" \
  --module earlybert_ds "$subcommand" "$@"
