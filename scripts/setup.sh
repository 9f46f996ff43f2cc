#!/usr/bin/env bash
# Set up gkd in ./.venv (created if missing): pinned torch, the runtime dependencies, and gkd itself in editable
# mode with its C++/CUDA extension.
#
# Cheap to rerun: each step records a stamp (a hash of everything it depends on) in .venv/ and is skipped while the
# stamp matches. The dependency step depends on requirements.txt and the torch pins; the build step on the
# extension's sources, the packaging files, the compilers (gcc, nvcc), torch and the build variables (CUDA_HOME,
# TORCH_CUDA_ARCH_LIST, GKD_NO_EXT, GKD_CPU_ONLY). Change any of them and that step runs again. GKD_REBUILD=1
# forces both.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"

stamp_of() {  # stamp_of FILE... : one hash of the named files' contents and of stdin
    { cat; for f in "$@"; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done; } | sha256sum | cut -d' ' -f1
}
fresh() {  # fresh NAME HASH : the step NAME already ran with these inputs
    [ "${GKD_REBUILD:-0}" != 1 ] && [ -f ".venv/.gkd-stamp-$1" ] && [ "$(cat ".venv/.gkd-stamp-$1")" = "$2" ]
}

# 1. torch first and pinned (an unpinned torch can pull a multi-GB build; see README, "Installation"), then the rest.
deps_hash=$(echo "$TORCH_PINS $(.venv/bin/python --version)" | stamp_of requirements.txt)
if fresh deps "$deps_hash"; then
    echo "[setup] dependencies unchanged since the last setup: skipped"
else
    $PIP install -q --disable-pip-version-check $TORCH_PINS
    $PIP install -q --disable-pip-version-check -r requirements.txt
    echo "$deps_hash" > .venv/.gkd-stamp-deps
fi

# 2. gkd itself with its extension: with nvcc a CUDA build (no GPU needed to compile), without it a CPU-only build.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
build_hash=$(
    {
        echo "CUDA_HOME=${CUDA_HOME:-} ARCH=$TORCH_CUDA_ARCH_LIST NO_EXT=${GKD_NO_EXT:-} CPU_ONLY=${GKD_CPU_ONLY:-}"
        .venv/bin/python -c "import torch; print(torch.__version__, torch.version.cuda)"
        "${CXX:-c++}" --version 2>/dev/null | head -n 1 || true
        [ -n "${CUDA_HOME:-}" ] && "$CUDA_HOME/bin/nvcc" --version 2>/dev/null | tail -n 2 || true
    } | stamp_of setup.py setup.cfg pyproject.toml $(find kd/csrc -type f | sort)
)
if fresh build "$build_hash" && .venv/bin/python -c "import gkd.kd._ops" 2>/dev/null; then
    echo "[setup] gkd and its extension unchanged since the last setup: skipped (GKD_REBUILD=1 forces a rebuild)"
else
    echo "[setup] installing gkd (editable) and building its extension"
    $PIP install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
    echo "$build_hash" > .venv/.gkd-stamp-build
fi
.venv/bin/python -c "import gkd.kd._ops as o; print('[setup] gkd installed; custom operator:', o.backend_summary())"
