#!/usr/bin/env bash
# GPU lane: on a GPU host (offline), install, run the GPU tests and all benchmarks.
#   bash scripts/gpu_lane.sh OUTDIR [bench names...]     (names: int6 lora ns train eval; default all)
# Env: PGOLF_TEST_TIMEOUT (s, default 1800), PGOLF_BENCH_QUICK=1 (fewer shapes), PGOLF_PYTEST_ARGS.
# Writes OUTDIR/install.log, OUTDIR/pytest.log, OUTDIR/bench.log, OUTDIR/results/*.json|md
# and ends with a short summary table (kernel, case, ours_ms, baseline, speedup).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: scripts/gpu_lane.sh OUTDIR [bench names...]}
shift || true
mkdir -p "$OUTDIR/results"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt"
bash scripts/install.sh --offline > "$OUTDIR/install.log" 2>&1 || { tail -30 "$OUTDIR/install.log"; echo "INSTALL FAILED"; exit 1; }
echo "install: $(( $(date +%s) - t0 )) s"
# GPU lane = tests marked gpu (the CPU lane runs in CI). PGOLF_TEST_TIMEOUT caps this stage. -v: a run stopped by
# the timeout still names each test that passed or failed (with -q it leaves a row of dots and no summary)
timeout "${PGOLF_TEST_TIMEOUT:-1800}" python3 -m pytest -v -rfE -m gpu -p no:cacheprovider ${PGOLF_PYTEST_ARGS:-} > "$OUTDIR/pytest.log" 2>&1
test_rc=$?
tail -3 "$OUTDIR/pytest.log"
echo "tests: rc=$test_rc, $(( $(date +%s) - t0 )) s"
ONLY=""
if [[ $# -gt 0 ]]; then ONLY="--only $*"; fi
QUICK=""
if [[ -n "${PGOLF_BENCH_QUICK:-}" ]]; then QUICK="--quick"; fi
python3 -m bench --results-dir "$OUTDIR/results" $ONLY $QUICK > "$OUTDIR/bench.log" 2>&1
bench_rc=$?
echo "bench: rc=$bench_rc, $(( $(date +%s) - t0 )) s"
python3 - "$OUTDIR/results" <<'PY'
import glob, json, sys
print(f"{'kernel':8s} {'case':44s} {'ours_ms':>9s} {'baseline':>18s} {'base_ms':>9s} {'speedup':>7s}")
for p in sorted(glob.glob(sys.argv[1] + "/*.json")):
    d = json.load(open(p))
    for r in d["rows"]:
        print(f"{r['kernel'][:8]:8s} {str(r['case'])[:44]:44s} {r['ours_ms']:9.4f} {str(r['baseline'])[:18]:>18s} {r['baseline_ms']:9.4f} {r['speedup']:7.2f}")
PY
[[ $test_rc -eq 0 && $bench_rc -eq 0 ]]
