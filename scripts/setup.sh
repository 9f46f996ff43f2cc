#!/usr/bin/env bash
# Set up gkd in ./.venv (created if missing): pinned torch, the runtime dependencies, and gkd itself in editable
# mode with its C++/CUDA extension. Safe to rerun: pip skips what is already installed and the extension rebuilds
# only when its sources changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
# torch first and pinned: an unpinned torch can pull a multi-GB build (see README, "Installation").
$PIP install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
$PIP install -q --disable-pip-version-check -r requirements.txt
# The extension: with nvcc a CUDA build (no GPU needed to compile), without it a CPU-only build.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
$PIP install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
.venv/bin/python -c "import kd._ops as o; print('[setup] gkd installed; custom operator:', o.backend_summary())" \
    2>/dev/null || .venv/bin/python -c "import kd; print('[setup] gkd installed')"
