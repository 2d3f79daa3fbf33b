#!/usr/bin/env bash
# The device check (issue 22): parity, decoding, training and throughput of both twins on one GPU, in the
# device image as it is (python3 with torch, jax[cuda], flax, optax, hypothesis, ...; PYTHONPATH=., no install).
# Writes report.json, summary.md and device_check.log into $OUT (default device_report/). See
# scripts/device_check.py for the sections, the sizes and the exit status (0: every asserted check passed).
#
#   make device-check                                   # DEVICE=cuda, size full, budget 440 s (< 8 min in all)
#   DEVICE=cpu scripts/device_check.sh                  # the same code here on the CPU, size small (< 5 min)
#   DEVICE=cpu DEVICE_CHECK_SIZE=tiny DEVICE_CHECK_BUDGET=60 OUT=/tmp/dc scripts/device_check.sh   # CI
#
# Environment: DEVICE (cuda | cpu), OUT, PYTHON (default python3), DEVICE_CHECK_BUDGET (seconds),
# DEVICE_CHECK_SIZE (full | small | tiny), DEVICE_CHECK_SECTIONS (a comma-separated subset),
# DEVICE_CHECK_WHEELS (a directory of wheels, installed with --no-index only if an essential import fails).
set -u
cd "$(dirname "$0")/.." || exit 1

DEVICE=${DEVICE:-cuda}
[ "$DEVICE" = gpu ] && DEVICE=cuda
case "$DEVICE" in cuda|cpu) ;; *) echo "DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 1 ;; esac
export DEVICE
export OUT=${OUT:-device_report}
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DEVICE" = cuda ]; then default_budget=440; else default_budget=270; fi
export DEVICE_CHECK_BUDGET=${DEVICE_CHECK_BUDGET:-$default_budget}
# Hard stop: the budget, then time for the section that was running to notice it (one compilation), then kill.
GRACE=${DEVICE_CHECK_GRACE:-25}
LIMIT=$(( ${DEVICE_CHECK_BUDGET%.*} + GRACE ))

mkdir -p "$OUT" || exit 1
LOG="$OUT/device_check.log"
: > "$LOG"
say() { echo "[device_check.sh] $*" | tee -a "$LOG"; }
say "$(date -u +%Y-%m-%dT%H:%M:%SZ) DEVICE=$DEVICE OUT=$OUT budget ${DEVICE_CHECK_BUDGET}s (hard limit ${LIMIT}s) python: $(command -v "$PY")"

# The image has everything; only if an essential import fails, install the carried wheels (no index).
ESSENTIAL="torch jax flax optax numpy hypothesis safetensors ml_dtypes"
missing=$("$PY" - "$ESSENTIAL" <<'PYEOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1].split() if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
    WHEELS=${DEVICE_CHECK_WHEELS:-wheels}
    if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        say "missing: $missing; installing them from $WHEELS (pip --no-index)"
        # shellcheck disable=SC2086
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" ${missing//ml_dtypes/ml-dtypes} 2>&1 | tee -a "$LOG"
    else
        say "missing: $missing, and no wheels in ${WHEELS} (DEVICE_CHECK_WHEELS): the report will say what failed"
    fi
fi

if command -v timeout >/dev/null 2>&1; then
    timeout --signal=TERM --kill-after=10 "$LIMIT" "$PY" -u scripts/device_check.py 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
else
    "$PY" -u scripts/device_check.py 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
fi
case "$rc" in
    0|1|2) ;;
    *) say "the driver ended with status $rc (124/137: hard timeout; else a crash): marking the report"
       "$PY" scripts/device_check.py --finalize "$rc" 2>&1 | tee -a "$LOG"
       [ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
       rc=3 ;;
esac
say "exit status $rc; report: $OUT/report.json, summary: $OUT/summary.md, log: $LOG"
exit "$rc"
