# Sourced by the launch scripts (not run by itself): the repository's venv on PATH, the single-node launch, the
# hostfile check, and the CPU defaults.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$here/.venv/bin/deepspeed" ] && export PATH="$here/.venv/bin:$PATH"

# check_hostfile FILE [NODE_RANK]: sets FIRST_HOST and SLOTS (of node NODE_RANK) and says what will run, or exits
# with status 2 and a message naming the file and line (launch/check_hostfile.py)
check_hostfile() {
  local info nodes ranks
  info="$(python3 "$here/launch/check_hostfile.py" "$1" ${2:+--node-rank "$2"})" || exit 2
  read -r nodes ranks FIRST_HOST SLOTS <<<"$info"
  echo "$1: $nodes node(s), $ranks rank(s) in all, rank 0 on $FIRST_HOST" >&2
}

# cpu_defaults SLOTS: without a GPU, DS_ACCELERATOR=cpu and OMP_NUM_THREADS = this node's cores / SLOTS ranks
cpu_defaults() {
  if [ "${DS_ACCELERATOR:-}" = cpu ] ||
     ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    export DS_ACCELERATOR=cpu
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / $1 > 0 ? $(nproc) / $1 : 1 ))}"
  fi
}

# single_node COMMAND ARG...: `earlybert-ds COMMAND ARG...` under the deepspeed launcher on this node: one rank per
# GPU, or NPROC CPU ranks (default 2) when no GPU is visible
single_node() {
  local command="$1"
  shift
  if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    NPROC="${NPROC:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}"
  else
    NPROC="${NPROC:-2}"
  fi
  cpu_defaults "$NPROC"
  exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --module earlybert_ds "$command" "$@"
}
