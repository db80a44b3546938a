#!/usr/bin/env bash
# GPU check of zeroflow, for a machine with a CUDA GPU (written for one H200; < 6 minutes):
#   1. builds the extensions (CPU + CUDA, sm_90) in place;
#   2. runs the CUDA / Triton parity tests natively (no TRITON_INTERPRET);
#   3. runs the GPU benchmark subset (kernels at 64M and 256M, optimizer step on the ViT-B-sized
#      list, one ViT-B/16 training iteration per method) and writes the JSON and the report
#      (performance.md + plots) into one folder: $OUT if set, else results/gpu/.
# Usage: bash benchmarks/gpu_check.sh            (from anywhere; logs in the output folder)
# Env: SKIP_BUILD=1 (extension already built), SKIP_TESTS=1, BENCH_ONLY="kernels optim e2e".
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEST="${OUT:-$ROOT/results/gpu}"
mkdir -p "$DEST"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
START=$(date +%s)
DEADLINE=$(( START + ${GPU_CHECK_BUDGET_S:-340} ))   # whole script < 6 min: later steps get what is left
STATUS=0
left() { local l=$(( DEADLINE - $(date +%s) )); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
say() { echo "== [$(( $(date +%s) - START ))s] $*" | tee -a "$DEST/gpu_check.log"; }

say "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi missing')"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$DEST/gpu_check.log" || { say "no usable CUDA device: stop"; exit 2; }

if [ "${SKIP_BUILD:-0}" != "1" ]; then
  say "build: pip install --no-build-isolation -e . (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  if ! ZEROFLOW_BUILD_CUDA=1 "$PY" -m pip install -q --no-build-isolation -e . > "$DEST/build.log" 2>&1; then
    say "build FAILED (tail of $DEST/build.log):"; tail -30 "$DEST/build.log"; STATUS=1
  fi
fi
"$PY" -c "import zfkernels as zk; print('backends on cuda:', zk.available_backends('cuda'))" 2>&1 | tee -a "$DEST/gpu_check.log"

if [ "${SKIP_TESTS:-0}" != "1" ]; then
  # TRITON_INTERPRET=0: tests/conftest.py only *defaults* it to 1, so Triton compiles for the GPU.
  TESTS=""
  for t in tests/test_cuda_ops.py tests/test_triton.py tests/test_compiled_ops.py; do [ -f "$t" ] && TESTS="$TESTS $t"; done
  if [ -n "$TESTS" ]; then
    say "parity tests on the GPU:$TESTS"
    TRITON_INTERPRET=0 ZEROFLOW_TEST_DEVICE=cuda timeout -s INT -k 10 "$(left 100)" "$PY" -m pytest $TESTS -q -x -rs -p no:cacheprovider \
      --junitxml="$DEST/gpu_tests.xml" 2>&1 | tail -25 | tee -a "$DEST/gpu_check.log"
    [ "${PIPESTATUS[0]}" = "0" ] || { say "GPU tests FAILED"; STATUS=1; }
  else
    say "no GPU parity test files found (tests/test_cuda_ops.py, tests/test_triton.py)"
  fi
fi

# GPU benchmark subset. Round counts are picked per case from a 1.5-3 s budget.
export BENCH_DEVICE=cuda TRITON_INTERPRET=0
unset BENCH_FAST
JSONS=()
for suite in ${BENCH_ONLY:-kernels optim e2e}; do
  case $suite in
    kernels) file=benchmarks/test_bench_kernels.py; sel=""; lim=$(left 120) ;;
    optim)   file=benchmarks/test_bench_optim_step.py; sel="-k vit_b_86m"; lim=$(left 60) ;;
    e2e)     file=benchmarks/test_bench_end_to_end.py; sel=""; lim=$(left 60) ;;
  esac
  if [ "$lim" -lt 15 ]; then say "bench $suite skipped: the 6-minute budget is spent"; STATUS=1; continue; fi
  say "bench $suite (limit ${lim}s)"
  # SIGINT (not KILL) at the limit: pytest still finishes the session and writes the JSON so far
  timeout -s INT -k 15 "$lim" "$PY" -m pytest "$file" $sel -q -rs -p no:cacheprovider --benchmark-json="$DEST/gpu_$suite.json" \
    --benchmark-columns=min,median,rounds --benchmark-sort=name > "$DEST/gpu_$suite.log" 2>&1
  rc=$?
  grep '^SKIPPED' "$DEST/gpu_$suite.log" > "$DEST/gpu_$suite.json.skips.txt" || true
  tail -3 "$DEST/gpu_$suite.log" | tee -a "$DEST/gpu_check.log"
  [ "$rc" = "0" ] || { say "bench $suite exit $rc (124 = hit its time limit)"; STATUS=1; }
  [ -f "$DEST/gpu_$suite.json" ] && JSONS+=("$DEST/gpu_$suite.json")
done

if [ ${#JSONS[@]} -gt 0 ]; then
  say "report -> $DEST/performance.md"
  "$PY" -m benchmarks.report "${JSONS[@]}" --out "$DEST/performance.md" --plots "$DEST/perf" \
    --title "zeroflow performance on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')" \
    2>&1 | tee -a "$DEST/gpu_check.log"
fi
say "done, status $STATUS; files in $DEST"
exit $STATUS
