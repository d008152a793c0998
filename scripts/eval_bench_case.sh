#!/usr/bin/env bash
# One eval-benchmark case per GPU call (a whole case fits in one 10-minute call; several do not).
#   bash scripts/eval_bench_case.sh OUTDIR CASES [SECONDS]
#   CASES: comma list of fixture,a,b,c,chunked (bench/bench_eval.py); SECONDS: this call's budget (default 560)
# Env passed through: PGOLF_EVAL_NO_REF (cases without a --reference run), PGOLF_EVAL_SCHEDULE (batch|rolling),
# PGOLF_SHARED_DATA (tokenizer + FineWeb sample; default runs/evaldata, then ../shared/data).
# On an offline GPU host bring the zstandard wheel (.whl/, scripts/fetch_gpu_wheels.sh) and the data folder.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: scripts/eval_bench_case.sh OUTDIR CASES [SECONDS]}
CASES=${2:?usage: scripts/eval_bench_case.sh OUTDIR CASES [SECONDS]}
BUDGET=${3:-560}
mkdir -p "$OUTDIR/results"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
# GPU hosts without internet: install offline there (PGOLF_INSTALL_ARGS overrides)
INSTALL_ARGS=${PGOLF_INSTALL_ARGS-$(command -v nvidia-smi > /dev/null && echo --offline)}
bash scripts/install.sh $INSTALL_ARGS > "$OUTDIR/install.log" 2>&1 || { tail -20 "$OUTDIR/install.log"; exit 1; }
echo "install: $(( $(date +%s) - t0 )) s"
left=$(( BUDGET - ($(date +%s) - t0) ))
# the bench decides from this budget whether a --reference run still fits after the kernel run
PGOLF_EVAL_CASES="$CASES" PGOLF_EVAL_BENCH_BUDGET_S=$(( left - 15 )) PGOLF_BENCH_RESULTS="$OUTDIR/results" \
  PGOLF_SHARED_DATA="${PGOLF_SHARED_DATA:-$PWD/runs/evaldata}" \
  timeout "$left" python3 -m bench --only eval > "$OUTDIR/bench.log" 2>&1
rc=$?
grep -E '^\{|Error|estimate|\[eval\]' "$OUTDIR/bench.log" | cut -c1-600 | tail -20
echo "bench: rc=$rc, $(( $(date +%s) - t0 )) s"
exit $rc
