#!/usr/bin/env bash
# Check kd::prototype_project on a CUDA machine: build the extension in place for this GPU, run the operator tests
# (the needs_cuda variants light up) and the CUDA benchmark at full size. Run from the repository root:
#
#   OUT=/some/dir bash scripts/gpu_check_op.sh
#
# Logs and JSON go to $OUT (default ./gpu_check_op_out): env.txt, build.log, pytest.log, pytest.xml,
# bench_cuda_float32.{txt,json}, bench_cuda_float16.{txt,json}, bench_cpu_2threads.{txt,json}, summary.txt.
# Needs python with torch (CUDA build), nvcc, click, pytest, setuptools; no network. Budget: < 8 minutes
# (each step has its own timeout; a failing step does not stop the later ones).
set -u -o pipefail

OUT="${OUT:-$PWD/gpu_check_op_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-8}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
DEADLINE=$((SECONDS + 450))  # the whole script stays under 8 minutes

step() {  # step NAME TIMEOUT_S LOG CMD...: run, record rc and duration in summary.txt
  local name="$1" limit="$2" log="$3"
  shift 3
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -le 5 ]; then
    echo "$name: skipped, the 8-minute budget is spent" | tee -a "$SUMMARY"
    return 124
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc (${limit}s limit) $((SECONDS - t0))s -> $(basename "$log")" | tee -a "$SUMMARY"
  return $rc
}

{
  date -u
  nvidia-smi || true
  "$CUDA_HOME/bin/nvcc" --version || true
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
} > "$OUT/env.txt" 2>&1

# 1. Build gkd.kd._C in place (no install, no network): CPU + CUDA kernels for this GPU's arch.
rm -f kd/_C*.so
step build 240 "$OUT/build.log" "$PY" setup.py build_ext --inplace
step backend 30 "$OUT/backend.txt" "$PY" -c "
import torch, gkd.kd.prototype
from gkd.kd import _ops
print(_ops.backend_summary())
assert _ops.has_kernel('cuda'), 'no CUDA kernel registered'
f = torch.randn(2, 8, 16, 20, device='cuda'); b = torch.tensor([[0, 1., 2., 30., 40.], [1, -5., -5., 90., 70.]], device='cuda')
p = torch.randn(5, 8, device='cuda')
got = torch.ops.kd.prototype_project(f, b, 4.0, p)
want = gkd.kd.prototype.prototype_project_reference(f.cpu().double(), b.cpu().double(), 4.0, p.cpu().double())
for g, w in zip(got, want): print('max abs diff vs reference', (g.cpu().double() - w).abs().max().item())
"
cat "$OUT/backend.txt" >> "$SUMMARY"

# 2. The operator tests (CPU and CUDA variants).
step pytest 150 "$OUT/pytest.log" "$PY" -m pytest tests/test_kd/test_prototype_op.py -q -rs -p no:cacheprovider \
  --junitxml="$OUT/pytest.xml"
tail -n 3 "$OUT/pytest.log" >> "$SUMMARY"

# 3. Benchmarks at full size (B=2, C=256, 800x1333, strides 4..64, N=256, M=800).
step bench_float32 90 "$OUT/bench_cuda_float32.txt" "$PY" -m gkd.bench.op --device cuda --repeats 20 \
  --reference-repeats 2 --json "$OUT/bench_cuda_float32.json"
step bench_float16 45 "$OUT/bench_cuda_float16.txt" "$PY" -m gkd.bench.op --device cuda --dtype float16 --repeats 20 \
  --reference-repeats 0 --json "$OUT/bench_cuda_float16.json"
# The CPU target measured on this host's quiet CPU with 2 threads, like the project's dev machines.
step bench_cpu_2threads 100 "$OUT/bench_cpu_2threads.txt" "$PY" -m gkd.bench.op --device cpu --threads 2 --repeats 3 \
  --reference-repeats 1 --json "$OUT/bench_cpu_2threads.json"
for f in bench_cuda_float32 bench_cuda_float16 bench_cpu_2threads; do
  echo "== $f" >> "$SUMMARY"
  [ -f "$OUT/$f.txt" ] && cat "$OUT/$f.txt" >> "$SUMMARY"
done
echo "wrote $OUT"
cat "$SUMMARY"
