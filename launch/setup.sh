#!/usr/bin/env bash
# Idempotent set-up of the virtual environment in .venv. Re-running it only checks.
#
#   bash launch/setup.sh                  # online: torch installed *first* (pinned, EARLYBERT_TORCH, default
#                                         # 2.13.0), so that pip never resolves a newer (CUDA, multi-GB) torch while
#                                         # installing deepspeed & co; then this checkout with its test extras
#   bash launch/setup.sh --offline DIR    # no network: from the wheels in DIR alone (launch/offline_bundle.py),
#                                         # into a venv that keeps this machine's own (CUDA) torch: made with
#                                         # --system-site-packages by PYTHON (default python3), which must import
#                                         # torch; nothing pins or replaces it. Ends with launch/preflight.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --offline ]; then
  wheels="${2:?usage: launch/setup.sh --offline WHEEL_DIR (made by launch/offline_bundle.py)}"
  [ -d "$wheels" ] || { echo "error: $wheels: no such folder of wheels (launch/offline_bundle.py makes one)" >&2; exit 2; }
  python="${PYTHON:-python3}"
  "$python" -c "import torch" 2>/dev/null || {
    echo "error: $python cannot import torch: the offline set-up keeps this machine's own torch and installs none;" \
      "set PYTHON to the Python that has it (e.g. a cluster module's), or install torch into it first" >&2; exit 2; }
  [ -x .venv/bin/python ] || "$python" -m venv --system-site-packages .venv
  .venv/bin/python -c "import torch" 2>/dev/null || {
    echo "error: .venv does not see $python's torch (made without --system-site-packages?): remove .venv and" \
      "rerun" >&2; exit 2; }
  # --isolated: no pip configuration or PIP_* variable adds an index; --no-index: DIR is the only source
  .venv/bin/python -m pip install --isolated --quiet --disable-pip-version-check --no-index --find-links "$wheels" \
    -e .
else
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
fi
# DeepSpeed compiles its CPU communication op on first use (about a minute): on a machine without a GPU, once, here
if .venv/bin/python -c "import torch, sys; sys.exit(torch.cuda.is_available())" 2>/dev/null; then
  DS_ACCELERATOR=cpu .venv/bin/python -c "from earlybert_ds.distributed import build_cpu_ops; build_cpu_ops()"
fi
if [ "${1:-}" = --offline ]; then
  .venv/bin/python launch/preflight.py
fi
