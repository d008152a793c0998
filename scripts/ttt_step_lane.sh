#!/usr/bin/env bash
# The TTT step's GPU lane: one stage per device call (each fits the device's 10-minute limit).
#   bash scripts/ttt_step_lane.sh OUTDIR STAGE
# Stages, in the order they are meant to run:
#   tests    the GPU tests of the step's ops and of the eval paths that use them (adam_rows, linear_act, the Gluon
#            kernels of linear_act_ws, linear_residual, head_norm_rope, fused MLP / q-k / residual evals), then every
#            tile candidate of linear_act.TILE_CONFIGS in each epilogue on the GPU
#   graphs   the kernel path's CUDA-graph replay against its bucketed steps run eagerly (bf16, rank 8 and 96), then
#            against the unbucketed eager eval (fp32: rank 8 and 96, int6, phased): what --cuda-graphs auto waits
#            for before it turns graphs on for the kernel path; alone in its call (compile-bound)
#   profile  bench.profile_ttt on the records' step (64 x 2048, rank 96): the kernel path with --fused-mlp (-mlp), at its
#            defaults (--fused-residual and --fused-qk on by auto, linear_act's split-epilogue tile), the same with the
#            previous 128 x 128 tile (-t128), and the torch-ops reference; --sites names the op behind each top kernel.
#            Writes OUTDIR/profile/profile_ttt.json
#   ops      the op benches of the step's pieces: linear_residual, linear_act, head_norm_rope, ttt_optim
#   evalc    case (c) on the kernel path: the records' recipe on share 0/8 of the official-size synthetic set at the
#            driver's defaults (CUDA graphs by auto), one cold process (bench.bench_warmup case
#            records-kernel-tail-w96-global; the reference's row is records-ref-tail-w96-global, one call each on the
#            same warm machine: PGOLF_WARMUP_CASES names the case)
#   warmup   the kernel path's warm-up at case (c): a cold child, then a warm one on its cache folders, each stopped at its
#            first score, with Dynamo's recompile log (TORCH_LOGS=recompiles, in OUTDIR/warmup/*.err) and the Triton
#            binaries each built (bench.bench_warmup's triton_builds); PGOLF_WARMUP_CASES names another case
#   dx       the merged q / k / v backward's dx in one kernel (lora_merged.sum_products, on by default since this
#            stage ran on an H100): its GPU tests and the merged path's, bench.bench_merged_dx against bmm + baddbmm_, then
#            bench.profile_ttt on the records' step (kernel-compile-tail, -dxk) in one process; the suffixes only turn
#            switches on, so with the default on the before needs PGOLF_MERGED_DX=cublas in the stage's environment
#   ws       the warp-specialized Gluon kernel (pgolf_kernels.linear_act_ws, experimental): its GPU tests under a short
#            timeout (a synchronisation bug would hang, not fail), then bench.bench_linear_act with its rows
#            (PGOLF_LINEAR_ACT_WS=1) against linear_act's default tile and cuBLAS
#   mlpws    mlp_residual's up-projection on the warp-specialized Gluon kernel (linear_residual.MLP_UP_WS, on by
#            default since this stage and signs ran): the Gluon kernel's GPU tests and mlp_residual's with it, then
#            bench.profile_ttt on the records' step (kernel-compile-tail, -ws; PGOLF_PROFILE_VARIANTS names others);
#            the before needs PGOLF_MLP_UP_WS=0 in the stage's environment
#   gws      linear_act_grad on the warp-specialized Gluon kernel (linear_act.GRAD_WS, off by default): the derivative
#            kernel's GPU tests and mlp_residual's backward with it, then bench.profile_ttt on the records' step without
#            and with it (kernel-compile-tail, -gws) in one process, then the eval with it, eager and under CUDA graphs
#   eff      the merged weights' tiles (lora_merged.EFFECTIVE_CONFIGS): their GPU tests, bench.bench_effective_weight, then
#            bench.profile_ttt on the records' step with the fastest tile (-effN, when it beats the default by > 5 %)
#            and with the Gluon up-projection
#            (-ws), each variant twice in alternating order (the same step under two names: -dxk is the default)
#   signs    mlp_residual keeping act(h) and h's packed signs instead of h (linear_residual.MLP_SIGNS, off by default):
#            the signs epilogues' GPU tests and mlp_residual's with them, then bench.profile_ttt on the records' step
#            without and with it, each twice in alternating order (-dxk: the default under another name)
#   skip     the U-Net skips through pgolf_kernels.skip_add (train.model.SKIP_KERNEL, PGOLF_SKIP_ADD): its GPU tests,
#            bench.bench_skip_add against torch.addcmul and torch.compile, then bench.profile_ttt on the records' step
#            without and with it (kernel-compile-tail, -skp) in one process
#   switches the kernel path's off-by-default switches together (linear_act.GRAD_WS, model.SKIP_KERNEL,
#            adapters.O_FOLD): their ops' GPU tests (the Gluon derivative under a short timeout, skip_add, sum_products
#            with four sources, multi_lora_linear's shrinks), bench.profile_ttt on the records' step at the defaults,
#            with -gws and with all three (-gws-skp-of) in one process, then the eval with each switch, eager and
#            under CUDA graphs
#   layout   the fused q / k pass's memory order (train.model.QK_LAYOUT): bench.profile_ttt on the records' step at the
#            default "bthd", with k in (B, H, T, D) order (-kbh) and with q and k (-qkbh), each twice in alternating
#            order (attention moved by ~1 ms between identical variants on an H200), then the eval with each
#   rws      the residual sites' GEMM on the warp-specialized Gluon kernel (linear_residual.RES_WS, on by default since
#            this stage ran on an H100: the before needs PGOLF_RES_WS=0 in the stage's environment) and mlp_residual
#            with act(h) formed in its A operand (linear_residual.MLP_DOWN_ACT, off): their GPU tests under a short
#            timeout, then bench.profile_ttt on the records' step without them, with -rws, with -rws-dact and with k
#            in (B, H, T, D) order (-kbh), twice in alternating order, then the eval with each
#   global   the phased recipe's global passes under the kernel path's fused ops (train.adapters.FusedBase,
#            PGOLF_GLOBAL_FUSED): the view's GPU tests, then bench.profile_global (reference, kernel, kernel-fused: ms per
#            SGD step, GPU busy, top kernels) in one process; writes OUTDIR/global/profile_global.json
#   sws      the merged backward's dx and the merged q / k / v forward on the warp-specialized Gluon kernel
#            (lora_merged.SUM_WS and QKV_WS, PGOLF_SUM_WS / PGOLF_QKV_WS, off by default): their GPU tests under a short
#            timeout, bench.profile_ttt on the records' step without them, with each and with both (kernel-compile-tail,
#            -sws, -qws, -sws-qws) in one process, then the eval with each, eager and under CUDA graphs
#   wtile    the Gluon kernels' ring tiles (linear_act_ws.TILES, PGOLF_WS_TILE): bench.bench_ws_tiles (every kernel at the
#            records' shapes per tile, checked, against the default tile and cuBLAS), the records' step with each
#            tile in one process (kernel-compile-tail, -wt1 .. -wt3), then the GPU tests of
#            tests/test_linear_act_ws.py under the tile with the least summed time over the ops the defaults run
#   plans    a new (rows, window) shape's first step (bench.profile_ttt --new-shapes 3, the kernel path) without and with
#            TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (torch's cuDNN attention plans keyed on power-of-two sequence lengths,
#            without the batch strides: fewer plans built per new shape; only for unmasked calls with (B, T, H, D)-
#            contiguous q / k / v, here the full blocks' causal attention, not the tail block's masked one), two processes
#   norm     the blocks' residual mix and RMS norms through pgolf_kernels.mix_norm (train.model.NORM_KERNEL,
#            PGOLF_NORM_KERNEL, off by default): its GPU tests and the eval with it (eager and under CUDA graphs),
#            bench.bench_mix_norm against the compiled composition (every tile of mix_norm.NORM_CONFIGS), then
#            bench.profile_ttt on the records' step without and with it (kernel-compile-tail, -nrm), each twice in
#            alternating order, in one process
#   fork     the U-Net skips' encoder outputs through pgolf_kernels.skip_add.skip_fork (train.model.SKIP_FORK, on by
#            default since this stage ran on an H100: the before needs PGOLF_SKIP_FORK=0 in the stage's environment): skip_add's GPU tests (the fork / join pair at the records' shape against fp64) and the eval with it (eager and
#            under CUDA graphs), then
#            bench.profile_ttt on the records' step without and with it (-fk), each twice in alternating order,
#            in one process
#   fold     each decoder's join inside its compiled block (train.model.JOIN_FOLD, skip_add.skip_join_inline; on by
#            default since this stage and case (c) ran on an H100: the before needs PGOLF_JOIN_FOLD=0 in the stage's
#            environment): bench.profile_ttt on the records' step without and with it (-jf), each twice in alternating
#            order, in one process; then skip_add's GPU tests and the eval with it (eager and under CUDA graphs)
# On the offline GPU host bring .whl/ (scripts/fetch_gpu_wheels.sh, run where there is internet), and for evalc the
# sp1024 tokenizer in runs/evaldata/ (cp ../shared/data/fineweb_1024_bpe.model runs/evaldata/) or PGOLF_SHARED_DATA.
# Everything a stage prints goes to OUTDIR/<stage>.log as well.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: scripts/ttt_step_lane.sh OUTDIR tests|graphs|profile|ops|evalc|warmup|dx|ws|mlpws|gws|eff|signs|skip|switches|layout|rws|global|sws|wtile|plans|norm|fork}
STAGE=${2:?usage: scripts/ttt_step_lane.sh OUTDIR tests|graphs|profile|ops|evalc|warmup|dx|ws|mlpws|gws|eff|signs|skip|switches|layout|rws|global|sws|wtile|plans|norm|fork}
case "$STAGE" in tests|graphs|profile|ops|evalc|warmup|dx|ws|mlpws|gws|eff|signs|skip|switches|layout|rws|global|sws|wtile|plans|norm|fork|fold) ;;
  *) echo "unknown stage $STAGE: expected tests, graphs, profile, ops, evalc, warmup, dx, ws, mlpws, gws, eff, signs, skip, switches, layout, rws, global, sws, wtile, plans, norm, fork or fold"; exit 2 ;; esac
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
if { [ "$STAGE" = evalc ] || [ "$STAGE" = warmup ]; } && ! python3 -c "import sys; from bench.bench_eval import _data_dir; sys.exit(_data_dir() is None)"; then
  echo "$STAGE: the sp1024 tokenizer (fineweb_1024_bpe.model) is in neither PGOLF_SHARED_DATA, runs/evaldata nor"\
       "../shared/data: copy it to runs/evaldata/ (and carry that folder to the GPU host)"; exit 2
fi
t0=$(date +%s)
INSTALL_ARGS=${PGOLF_INSTALL_ARGS-$(command -v nvidia-smi > /dev/null && echo --offline)}
bash scripts/install.sh $INSTALL_ARGS > "$OUTDIR/install-$STAGE.log" 2>&1 \
  || { tail -20 "$OUTDIR/install-$STAGE.log"; echo "INSTALL FAILED"; exit 1; }
echo "install: $(( $(date +%s) - t0 )) s"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
# bench.profile_ttt on the records' step with variants $2 (PGOLF_PROFILE_VARIANTS names others) for at most $1 s
# (PGOLF_PROFILE_TIMEOUT overrides it), one process; rc=1 when it fails
step_profile() {
  timeout "${PGOLF_PROFILE_TIMEOUT:-$1}" python3 -m bench.profile_ttt --recipe records --variants "${PGOLF_PROFILE_VARIANTS:-$2}" \
    --steps 10 --top 30 --sites --out "$OUTDIR/profile" 2>&1 | tee "$OUTDIR/profile.log" | grep "first call" | cut -c1-200
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
}
case "$STAGE" in
  tests)
    # -v: a run stopped by the timeout still names each test that passed or failed; faulthandler dumps the
    # stacks of a test that overruns (a compile-bound test must say where it is)
    timeout "${PGOLF_TEST_TIMEOUT:-560}" python3 -m pytest -v -rfE -m gpu -p no:cacheprovider \
      -o faulthandler_timeout=300 \
      tests/test_adam_rows.py tests/test_linear_act.py tests/test_linear_act_ws.py tests/test_linear_residual.py \
      tests/test_head_norm_rope.py tests/test_fused_mlp.py tests/test_fused_qk.py tests/test_fused_residual.py \
      2>&1 | tee "$OUTDIR/tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed|Timeout" | tail -60
    rc=${PIPESTATUS[0]}
    # every tile candidate of linear_act.TILE_CONFIGS in each epilogue, at its real tile size (unmarked tests: on a
    # GPU host they run on the GPU), before a candidate may become a default
    timeout 120 python3 -m pytest -v -rfE -p no:cacheprovider -k "tile_config" tests/test_linear_act.py \
      tests/test_linear_residual.py 2>&1 | tee "$OUTDIR/tests-tiles.log" | grep -E "PASSED|FAILED|ERROR|passed|failed"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    ;;
  graphs)
    timeout "${PGOLF_TEST_TIMEOUT:-560}" python3 -m pytest -v -rfE -m gpu -p no:cacheprovider \
      -o faulthandler_timeout=400 \
      "tests/test_graphs.py::test_gpu_kernel_path_replay_equals_its_bucketed_steps_run_eagerly_in_bf16" \
      "tests/test_graphs.py::test_gpu_kernel_path_eval_with_graphs_equals_eager" \
      2>&1 | tee "$OUTDIR/graphs.log" | grep -E "PASSED|FAILED|ERROR|passed|failed|Timeout" | tail -20
    rc=${PIPESTATUS[0]}
    ;;
  profile)
    timeout "${PGOLF_PROFILE_TIMEOUT:-570}" python3 -m bench.profile_ttt --recipe records \
      --variants "${PGOLF_PROFILE_VARIANTS:-kernel-compile-tail-mlp,kernel-compile-tail,kernel-compile-tail-t128,reference-compile-tail}" \
      --steps 10 --top 30 --sites --out "$OUTDIR/profile" 2>&1 | tee "$OUTDIR/profile.log" | tail -80
    rc=${PIPESTATUS[0]}
    ;;
  ops)
    timeout "${PGOLF_OPS_TIMEOUT:-570}" python3 -m bench --results-dir "$OUTDIR/results" \
      --only linear_residual linear_act head_norm_rope ttt_optim 2>&1 | tee "$OUTDIR/ops.log" | tail -60
    rc=${PIPESTATUS[0]}
    ;;
  evalc)
    PGOLF_WARMUP_CASES=${PGOLF_WARMUP_CASES:-records-kernel-tail-w96-global} PGOLF_WARMUP_DOCS=50000 \
      PGOLF_WARMUP_RUNS=${PGOLF_WARMUP_RUNS:-cold} PGOLF_WARMUP_BUDGET_S=520 PGOLF_WARMUP_LOG_DIR="$OUTDIR/evalc" \
      timeout 560 python3 -m bench --results-dir "$OUTDIR/results" --only warmup 2>&1 | tee "$OUTDIR/evalc.log" | tail -40
    rc=${PIPESTATUS[0]}
    ;;
  warmup)
    caches=$(mktemp -d)
    TORCH_LOGS=recompiles PGOLF_WARMUP_CASES=${PGOLF_WARMUP_CASES:-records-kernel-tail-w96-global} PGOLF_WARMUP_DOCS=50000 \
      PGOLF_WARMUP_RUNS=cold,warm PGOLF_WARMUP_STOP_AT_FIRST_SCORE=1 PGOLF_WARMUP_CACHES="$caches" \
      PGOLF_WARMUP_BUDGET_S=400 PGOLF_WARMUP_LOG_DIR="$OUTDIR/warmup" \
      timeout 450 python3 -m bench --results-dir "$OUTDIR/results" --only warmup 2>&1 | tee "$OUTDIR/warmup.log" | tail -20
    rc=${PIPESTATUS[0]}
    grep -h "Recompiling" "$OUTDIR"/warmup/*.err 2>/dev/null | cut -c1-200
    rm -rf "$caches"
    ;;
  dx)
    timeout 120 python3 -m pytest -v -rfE -p no:cacheprovider -o faulthandler_timeout=100 tests/test_lora.py \
      -k "sum_products or every_dense_slice or gpu_merged_shapes or merged_dx" 2>&1 | tee "$OUTDIR/dx-tests.log" \
      | grep -E "FAILED|ERROR|passed|failed|Timeout"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
      timeout 90 python3 -m bench --results-dir "$OUTDIR/results" --only merged_dx 2>&1 | tee "$OUTDIR/dx-bench.log" \
        | grep -E "^\| merged|Error|failed"
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      step_profile 300 kernel-compile-tail,kernel-compile-tail-dxk
    fi
    ;;
  mlpws)
    timeout 200 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=150 tests/test_linear_act_ws.py \
      tests/test_linear_residual.py -k "ws or gpu_mlp" 2>&1 | tee "$OUTDIR/mlpws-tests.log" \
      | grep -E "FAILED|ERROR|passed|failed|Timeout"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
      step_profile 300 kernel-compile-tail,kernel-compile-tail-ws
    fi
    ;;
  gws)
    # a synchronisation bug in the Gluon kernel would hang, not fail: short timeouts; the step before the eval test
    timeout 90 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=80 tests/test_linear_act_ws.py \
      tests/test_linear_residual.py -k "grad or ws_kernel" 2>&1 | tee "$OUTDIR/gws-tests.log" | grep -E "FAILED|ERROR|passed|failed|Timeout"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
      step_profile 200 kernel-compile-tail,kernel-compile-tail-gws
      timeout 200 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=180 \
        tests/test_fused_residual.py -k "switches and GRAD_WS" 2>&1 | tee "$OUTDIR/gws-eval.log" \
        | grep -E "FAILED|ERROR|passed|failed|Timeout"
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    fi
    ;;
  skip)
    timeout 90 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider tests/test_skip_add.py 2>&1 \
      | tee "$OUTDIR/skip-tests.log" | grep -E "FAILED|ERROR|passed|failed|Timeout"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
      timeout 90 python3 -m bench --results-dir "$OUTDIR/results" --only skip_add 2>&1 | tee "$OUTDIR/skip-bench.log" \
        | grep -E "^\| B|Error|failed" | cut -c1-200
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      step_profile 200 kernel-compile-tail,kernel-compile-tail-skp
    fi
    ;;
  norm)
    timeout 150 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=120 tests/test_mix_norm.py \
      "tests/test_fused_residual.py::test_gpu_eval_with_mlp_residual_switches_scores_like_without[NORM_KERNEL]" 2>&1 \
      | tee "$OUTDIR/norm-tests.log" | grep -E "FAILED|ERROR|passed|failed|Timeout"
    rc=${PIPESTATUS[0]}
    timeout 90 python3 -m bench --results-dir "$OUTDIR/results" --only mix_norm 2>&1 | tee "$OUTDIR/norm-bench.log" \
      | grep -E "^\| mix|Error|failed" | cut -c1-260
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    step_profile 300 kernel-compile-tail,kernel-compile-tail-nrm,kernel-compile-tail,kernel-compile-tail-nrm
    ;;
  fork)
    # the eval test builds the kernel path's binaries on a fresh machine: mix_norm's hit a 120 s limit doing so
    timeout 300 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=280 tests/test_skip_add.py \
      "tests/test_fused_residual.py::test_gpu_eval_with_mlp_residual_switches_scores_like_without[SKIP_FORK]" 2>&1 \
      | tee "$OUTDIR/fork-tests.log" | grep -E "FAILED|ERROR|passed|failed|Timeout"
    rc=${PIPESTATUS[0]}
    step_profile 240 kernel-compile-tail,kernel-compile-tail-fk,kernel-compile-tail,kernel-compile-tail-fk
    ;;
  fold)
    # the step first (what decides the switch), then the op's GPU tests and the eval with it, as time allows
    rc=0
    step_profile 200 kernel-compile-tail,kernel-compile-tail-jf,kernel-compile-tail,kernel-compile-tail-jf
    timeout "${PGOLF_TEST_TIMEOUT:-300}" python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=280 \
      tests/test_skip_add.py "tests/test_fused_residual.py::test_gpu_eval_with_mlp_residual_switches_scores_like_without[JOIN_FOLD]" \
      2>&1 | tee "$OUTDIR/fold-tests.log" | grep -E "FAILED|ERROR|passed|failed|Timeout"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    ;;
  switches)
    rc=0
    for sel in "tests/test_linear_act_ws.py -k grad" "tests/test_linear_residual.py -k ws_kernel" "tests/test_skip_add.py" \
               "tests/test_lora.py -k sum_products or shrinks"; do
      set -- $sel
      f=$1; shift; shift 2>/dev/null
      timeout 120 python3 -m pytest -v -rfE -p no:cacheprovider -o faulthandler_timeout=80 "$f" ${1:+-k "$*"} 2>&1 \
        | tee -a "$OUTDIR/switches-tests.log" | grep -E "FAILED|ERROR|passed|failed|Timeout"
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    done
    if [ "$rc" -eq 0 ]; then
      step_profile 200 kernel-compile-tail,kernel-compile-tail-gws,kernel-compile-tail-gws-skp-of
      timeout 240 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=200 \
        tests/test_fused_residual.py -k "switches and (GRAD_WS or O_FOLD or SKIP_KERNEL)" 2>&1 \
        | tee "$OUTDIR/switches-eval.log" | grep -E "FAILED|ERROR|passed|failed|Timeout"
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    fi
    ;;
  layout)
    rc=0
    # the second round under other names (-skp: on by default, the same step), as a variant name is a key
    step_profile 300 kernel-compile-tail,kernel-compile-tail-kbh,kernel-compile-tail-qkbh,kernel-compile-tail-skp,kernel-compile-tail-skp-kbh,kernel-compile-tail-skp-qkbh
    timeout 200 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=180 \
      tests/test_fused_residual.py -k "switches and QK_LAYOUT" 2>&1 | tee "$OUTDIR/layout-eval.log" \
      | grep -E "FAILED|ERROR|passed|failed|Timeout"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    ;;
  sws)
    rc=0
    timeout 120 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=100 \
      tests/test_linear_act_ws.py -k "sum or rows or merged_forward" 2>&1 | tee "$OUTDIR/sws-tests.log" \
      | grep -E "FAILED|ERROR|passed|failed|Timeout"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    [ "$rc" -eq 0 ] && step_profile 250 kernel-compile-tail,kernel-compile-tail-sws,kernel-compile-tail-qws,kernel-compile-tail-sws-qws
    [ "$rc" -eq 0 ] && { timeout 150 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=130 \
      tests/test_fused_residual.py -k "switches and (SUM_WS or QKV_WS)" 2>&1 | tee "$OUTDIR/sws-eval.log" \
      | grep -E "FAILED|ERROR|passed|failed|Timeout"; [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1; }
    ;;
  wtile)
    rc=0
    timeout 240 python3 -m bench --only ws_tiles --results-dir "$OUTDIR/results" 2>&1 | tee "$OUTDIR/wtile-bench.log" \
      | grep -E "^\||->|Error|error" | cut -c1-260
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    best=$(python3 -m bench.bench_ws_tiles "$OUTDIR/results")
    echo "tile with the least summed time over the default ops: $best"
    step_profile 220 kernel-compile-tail,kernel-compile-tail-wt1,kernel-compile-tail-wt2,kernel-compile-tail-wt3
    # the GPU tests last: they matter only where a tile is to become the default
    [ -n "$best" ] && { PGOLF_WS_TILE=$best timeout "${PGOLF_TEST_TIMEOUT:-150}" python3 -m pytest -v -rfE -m gpu \
      -p no:cacheprovider -o faulthandler_timeout=130 tests/test_linear_act_ws.py 2>&1 | tee "$OUTDIR/wtile-tests.log" \
      | grep -E "FAILED|ERROR|passed|failed|Timeout"; [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1; }
    ;;
  plans)
    rc=0
    for avoid in 0 1; do
      echo "== TORCH_CUDNN_SDPA_AVOID_RECOMPILE=$avoid"
      TORCH_CUDNN_SDPA_AVOID_RECOMPILE=$avoid timeout 170 python3 -m bench.profile_ttt --recipe records \
        --variants kernel-compile-tail --steps 5 --top 20 --new-shapes 3 --out "$OUTDIR/plans-$avoid" 2>&1 \
        | tee "$OUTDIR/plans-$avoid.log" | grep -E "first call|new shape|Error|error" | cut -c1-300
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    done
    ;;
  global)
    rc=0
    timeout 150 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=120 \
      tests/test_global_fused.py 2>&1 | tee "$OUTDIR/global-tests.log" | grep -E "FAILED|ERROR|passed|failed|Timeout"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    timeout "${PGOLF_PROFILE_TIMEOUT:-300}" python3 -m bench.profile_global --out "$OUTDIR/global" 2>&1 \
      | tee "$OUTDIR/global.log" | grep -E "^\[|fused vs|Error|error" | cut -c1-400
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    ;;
  rws)
    rc=0
    timeout 150 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=120 \
      tests/test_linear_act_ws.py -k "residual" 2>&1 | tee "$OUTDIR/rws-tests.log" | grep -E "FAILED|ERROR|passed|failed|Timeout"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    timeout 120 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=100 \
      tests/test_linear_residual.py -k "ws_kernel or res_ws or down_act" 2>&1 | tee -a "$OUTDIR/rws-tests.log" \
      | grep -E "FAILED|ERROR|passed|failed|Timeout"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    # the second round under other names (-skp: on by default, the same step), as a variant name is a key
    [ "$rc" -eq 0 ] && step_profile 300 kernel-compile-tail,kernel-compile-tail-rws,kernel-compile-tail-rws-dact,kernel-compile-tail-kbh,kernel-compile-tail-skp-kbh,kernel-compile-tail-skp-rws-dact,kernel-compile-tail-skp-rws,kernel-compile-tail-skp
    [ "$rc" -eq 0 ] && { timeout 150 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=130 \
      tests/test_fused_residual.py -k "switches and (RES_WS or MLP_DOWN_ACT)" 2>&1 | tee "$OUTDIR/rws-eval.log" \
      | grep -E "FAILED|ERROR|passed|failed|Timeout"; [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1; }
    ;;
  eff)
    timeout 120 python3 -m pytest -v -rfE -p no:cacheprovider -o faulthandler_timeout=100 tests/test_lora.py \
      -k "effective or gpu_merged_shapes" 2>&1 | tee "$OUTDIR/eff-tests.log" | grep -E "FAILED|ERROR|passed|failed|Timeout"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
      timeout 90 python3 -m bench --results-dir "$OUTDIR/results" --only effective_weight 2>&1 \
        | tee "$OUTDIR/eff-bench.log" | grep -E "^\| eff|Error|failed" | cut -c1-160
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      # the tile with the least summed time over the bench's slices, when it beats the default by more than 5 %
      best=$(python3 -c "
import json, sys
rows = json.load(open('$OUTDIR/results/effective-weight-' + sys.argv[1] + '.json'))['rows']
from pgolf_kernels.lora_merged import EFFECTIVE_CONFIG as D, EFFECTIVE_CONFIGS as C
t = [sum(r['ours_ms'] for r in rows if r['case'].endswith(f'tile {c}')) for c in C]
i, d = min(range(len(C)), key=t.__getitem__), C.index(D)
print(i if i != d and t[i] < 0.95 * t[d] else '')" "$(python3 -c 'from bench.harness import gpu_slug; print(gpu_slug())')")
      echo "fastest tile: ${best:-the default}"
      V="kernel-compile-tail-ws,kernel-compile-tail,kernel-compile-tail-dxk-ws,kernel-compile-tail-dxk"
      [ -n "$best" ] && V="$V,kernel-compile-tail-eff$best"
      step_profile 300 "$V"
    fi
    ;;
  signs)
    # the eval tests compile and capture graphs: 280 s for the tests, 240 s for the step's 4 variants, within 600
    timeout 280 python3 -m pytest -v -rfE -p no:cacheprovider -o faulthandler_timeout=250 tests/test_linear_act.py \
      tests/test_linear_residual.py tests/test_fused_residual.py -k "signs or switches" 2>&1 | tee "$OUTDIR/signs-tests.log" | grep -E "FAILED|ERROR|passed|failed|Timeout"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
      step_profile 240 kernel-compile-tail,kernel-compile-tail-sgn,kernel-compile-tail-dxk,kernel-compile-tail-dxk-sgn
    fi
    ;;
  ws)
    timeout 240 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=200 \
      tests/test_linear_act_ws.py 2>&1 | tee "$OUTDIR/ws-tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed|Timeout"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
      PGOLF_LINEAR_ACT_WS=1 timeout 300 python3 -m bench --results-dir "$OUTDIR/results" --only linear_act 2>&1 \
        | tee "$OUTDIR/ws-bench.log" | tail -20
      rc=${PIPESTATUS[0]}
    fi
    ;;
esac
echo "$STAGE: rc=$rc, $(( $(date +%s) - t0 )) s"
exit $rc
