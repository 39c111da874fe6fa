#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch installed *first* (pinned), so that pip never
# resolves a newer (CUDA, multi-GB) torch while installing deepspeed & co. Re-running it only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${EARLYBERT_TORCH:-2.13.0}"
[ -x .venv/bin/python ] || python3 -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null \
  || "${PIP[@]}" "torch==$TORCH_VERSION"
stamp=.venv/.earlybert-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "${PIP[@]}" -e ".[test]" "torch==$TORCH_VERSION"
  touch "$stamp"
fi
# DeepSpeed compiles its CPU communication op on first use (about a minute): on a machine without a GPU, once, here
if .venv/bin/python -c "import torch, sys; sys.exit(torch.cuda.is_available())" 2>/dev/null; then
  DS_ACCELERATOR=cpu .venv/bin/python -c "from earlybert_ds.distributed import build_cpu_ops; build_cpu_ops()"
fi
