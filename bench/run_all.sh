#!/usr/bin/env bash
# Runs the four benchmarks of issue #7 at full size, one after the other, and says which
# targets were missed. Run from anywhere; uses the repository's .venv. Takes 20 to 30
# minutes on 2 CPUs, plus the time vcsim needs to build a 20,000-VM inventory.
#
#   bench/run_all.sh [OUTDIR]
#   PATCHD_BENCH_QUICK=1 bench/run_all.sh   # small sizes, a few minutes: only checks they run
#
# Each script's figures (stdout) go to the terminal and to OUTDIR/NAME.txt (default: a new
# directory under /tmp). The test bed (/tmp/patchd-lab-bench, or $PATCHD_BENCH_LAB_DIR)
# is started once if it is not up, and stopped at the end if this script started it.
# Exit status: 0 if every target was met, 1 if any script missed one or failed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$REPO/.venv/bin/python
OUT=${1:-$(mktemp -d /tmp/patchd-bench-results-XXXXXX)}
mkdir -p "$OUT"
export PATCHD_BENCH_LAB_DIR=${PATCHD_BENCH_LAB_DIR:-/tmp/patchd-lab-bench}
LAB=(env "PATCHD_LAB_DIR=$PATCHD_BENCH_LAB_DIR" "PATCHD_LAB_PYTHON=$PY" bash "$REPO/tests/lab/lab.sh")

[[ -x $PY ]] || { echo "run_all: $PY missing; run 'make venv' first" >&2; exit 1; }

started=0
if ! "${LAB[@]}" status >/dev/null 2>&1; then
    "${LAB[@]}" up || { echo "run_all: lab.sh up failed" >&2; exit 1; }
    started=1
fi
# shellcheck disable=SC2317  # called by the EXIT trap
stop_lab() { if ((started)); then "${LAB[@]}" down >/dev/null 2>&1 || true; fi; }
trap stop_lab EXIT

runs=(
    "fleet_throughput bench/fleet_throughput.py --fleet 8:40,4:40,1:40"
    "orchestration bench/orchestration.py --targets 1000 --concurrency 50 --step-time 1 --repeat 3 --breakdown"
    "inventory bench/inventory.py --sizes 5000,20000 --repeat 3"
    "idle bench/idle.py --idle 60 --starts 3 --reloads 5"
)
if [[ ${PATCHD_BENCH_QUICK:-0} == 1 ]]; then  # small sizes: only checks that all run
    runs=(
        "fleet_throughput bench/fleet_throughput.py --fleet 8:8,1:4"
        "orchestration bench/orchestration.py --targets 200 --step-time 0.2 --repeat 2"
        "inventory bench/inventory.py --sizes 1000,4000 --repeat 3"
        "idle bench/idle.py --idle 15 --starts 2 --reloads 3 --strace-seconds 5"
    )
fi
status=0
summary=()
cd "$REPO" || exit 1
for run in "${runs[@]}"; do
    read -r name args <<<"$run"
    echo "=== $name: $PY $args" >&2
    # shellcheck disable=SC2086  # args is a list of words
    "$PY" $args | tee "$OUT/$name.txt"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) summary+=("$name: all targets met") ;;
        1) summary+=("$name: target MISSED (exit 1)"); status=1 ;;
        *) summary+=("$name: FAILED (exit $rc)"); status=1 ;;
    esac
done
echo "=== summary (figures in $OUT)" >&2
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
exit $status
