#!/usr/bin/env bash
# Multi-node EarlyBERT pre-training (or fine-tuning) without ssh: start this script on EVERY node, each with its own
# NODE_RANK (its line in the hostfile, from 0); the launchers meet at MASTER_ADDR:MASTER_PORT and may start in any
# order. A first argument `finetune` runs `earlybert-ds finetune`; all other arguments go to the command (see
# `earlybert-ds pretrain --help`) and must be the same on every node, except --data.cache_dir, which may differ.
# launch/slurm.sbatch does exactly this under SLURM.
#
#   # on node 0                                   # on node 1
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 \            NODE_RANK=1 MASTER_ADDR=10.0.0.1 \
#   HOSTFILE=hosts launch/multinode_nossh.sh \    HOSTFILE=hosts launch/multinode_nossh.sh \
#     --output-dir /shared/runs/x ...               --output-dir /shared/runs/x ...
#
# Environment, on every node:
#   NODE_RANK         required; 0 on the node that runs global rank 0
#   HOSTFILE          default launch/hostfile: one line `HOST slots=N` per node, the same file on every node (names
#                     are labels only, they need not resolve); checked before launching (launch/check_hostfile.py)
#   MASTER_ADDR       node 0's address as every node reaches it; default: the first host of HOSTFILE
#   MASTER_PORT       default 29500; free on node 0 and open between the nodes
#   EARLYBERT_DIST_TIMEOUT  seconds (default 600) a rank waits at the rendezvous and in any collective: a rank that
#                     cannot reach the master, or a master whose peers never come, fails after about 1-2 timeouts
#                     naming MASTER_ADDR:MASTER_PORT
#   GLOO_SOCKET_IFNAME (CPU) / NCCL_SOCKET_IFNAME (GPU)  the interface the nodes reach each other on, on machines
#                     with several (e.g. eth0 or ib0); gloo otherwise uses the address the hostname resolves to,
#                     which is often 127.0.1.1
#   DS_ACCELERATOR=cpu and OMP_NUM_THREADS (default: cores / slots) are set here on a node without a GPU.
# Storage: --output-dir must be the same shared directory on every node (rank 0 writes the ticket, summary, final
# model and metrics, every rank writes its own ZeRO shards there, and every rank reads them back on --resume).
# --data.cache_dir may be node-local: each node's local rank 0 prepares the tokenizer and packed corpus once.
# The repository, its .venv and the corpus must exist on every node.
set -euo pipefail
source "$(dirname "$0")/common.sh"
subcommand=pretrain  # or the first argument: pretrain or finetune
case "${1:-}" in pretrain|finetune) subcommand="$1"; shift ;; esac
: "${NODE_RANK:?set NODE_RANK to the position of this node in the hostfile, from 0}"
HOSTFILE="${HOSTFILE:-$here/launch/hostfile}"
check_hostfile "$HOSTFILE" "$NODE_RANK"
cpu_defaults "$SLOTS"
exec deepspeed --no_ssh --node_rank "$NODE_RANK" --hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$FIRST_HOST}" \
  --master_port "${MASTER_PORT:-29500}" --module earlybert_ds "$subcommand" "$@"
