#!/usr/bin/env bash
# Run the whole test suite once per floating-point path this CPU can take: each ATen kernel set it supports
# (ATEN_CPU_CAPABILITY=default, avx2, and avx512 where the CPU has it) with 1 and with 2 torch threads
# (GKD_TEST_THREADS). No test may depend on which path training took; this is the check.
#
#   bash scripts/test_matrix.sh                 # every cell, one after the other (~6 x the suite's time)
#   bash scripts/test_matrix.sh -x -k export    # extra arguments go to pytest
#
# Prints one line per cell (pytest's summary) and exits non-zero if any cell failed. Logs: $MATRIX_LOGS
# (default: a new folder under /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${MATRIX_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/gkd-matrix.XXXXXX")}
mkdir -p "$LOGS"
caps=(default avx2)
grep -qw avx512f /proc/cpuinfo 2>/dev/null && caps+=(avx512)
echo "[matrix] CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); cells: ${caps[*]} x threads 1 2"
echo "[matrix] logs in $LOGS"
failed=0
for cap in "${caps[@]}"; do
    for threads in 1 2; do
        log="$LOGS/$cap-threads$threads.log"
        start=$(date +%s)
        ATEN_CPU_CAPABILITY=$cap GKD_TEST_THREADS=$threads \
            .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@" > "$log" 2>&1
        rc=$?
        [ $rc -eq 0 ] || [ $rc -eq 5 ] || failed=1
        used=$(ATEN_CPU_CAPABILITY=$cap .venv/bin/python -c \
            "import torch; print(torch.backends.cpu.get_cpu_capability())" 2>/dev/null)
        printf '[matrix] %-8s threads %s (torch reports %s): %s  [%d s, exit %d]\n' "$cap" "$threads" "$used" \
            "$(tail -n 1 "$log" | tr -d '=' | xargs)" \
            $(( $(date +%s) - start )) $rc
    done
done
exit $failed
