# Sourced by the launch scripts (not run by itself): the repository's venv on PATH, the GPU probe, the
# single-node launch, the hostfile check, and the CPU defaults.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$here/.venv/bin/deepspeed" ] && export PATH="$here/.venv/bin:$PATH"
# the Python the job runs with: the repository's venv, else python3 (there may be no `python` command)
PYTHON="$here/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3 || echo python3)"

# cuda_gpus: how many CUDA GPUs the job's torch can use (0 without). Exits with status 2, saying why, where torch
# cannot be imported, or where nvidia-smi lists GPUs that torch cannot use (a CPU-only torch, or a driver older than
# torch's CUDA): a GPU node would otherwise quietly train on its CPU.
cuda_gpus() {
  local n
  n="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')" || {
    echo "error: $PYTHON cannot import torch: run launch/setup.sh (or see docs/gpu.md, offline install)" >&2; exit 2; }
  if [ "$n" = 0 ] && command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "error: nvidia-smi lists $(nvidia-smi -L | grep -c '^GPU ') GPU(s), but torch" \
      "$("$PYTHON" -c 'import torch; print(torch.__version__, "(CUDA", torch.version.cuda, end=")")') in $PYTHON" \
      "cannot use them: a CPU-only torch, or a driver older than torch's CUDA (python3 launch/preflight.py says" \
      "more). Set DS_ACCELERATOR=cpu to train on the CPU anyway." >&2
    exit 2
  fi
  echo "$n"
}

# check_hostfile FILE [NODE_RANK]: sets FIRST_HOST and SLOTS (of node NODE_RANK) and says what will run, or exits
# with status 2 and a message naming the file and line (launch/check_hostfile.py)
check_hostfile() {
  local info nodes ranks
  info="$(python3 "$here/launch/check_hostfile.py" "$1" ${2:+--node-rank "$2"})" || exit 2
  read -r nodes ranks FIRST_HOST SLOTS <<<"$info"
  echo "$1: $nodes node(s), $ranks rank(s) in all, rank 0 on $FIRST_HOST" >&2
}

# cpu_defaults SLOTS: without a GPU (or with DS_ACCELERATOR=cpu), train on the CPU: cpu_ranks SLOTS
cpu_defaults() {
  local gpus=0
  [ "${DS_ACCELERATOR:-}" = cpu ] || gpus="$(cuda_gpus)"
  [ "$gpus" != 0 ] || cpu_ranks "$1"
}

# cpu_ranks SLOTS: DS_ACCELERATOR=cpu and OMP_NUM_THREADS = this node's cores / SLOTS ranks (unless set)
cpu_ranks() {
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / $1 > 0 ? $(nproc) / $1 : 1 ))}"
}

# single_node COMMAND ARG...: `earlybert-ds COMMAND ARG...` under the deepspeed launcher on this node: one rank per
# GPU, or NPROC CPU ranks (default 2) when no GPU is visible
single_node() {
  local command="$1" gpus=0
  shift
  [ "${DS_ACCELERATOR:-}" = cpu ] || gpus="$(cuda_gpus)"
  if [ "$gpus" = 0 ]; then
    NPROC="${NPROC:-2}"
    cpu_ranks "$NPROC"
  else
    NPROC="${NPROC:-$gpus}"
  fi
  exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --module earlybert_ds "$command" "$@"
}
