#!/usr/bin/env bash
# Does a bad argument crash the process instead of raising? A native-side probe of one build
# of the zfkernels extensions, for a machine where that happened (the GPU image, 2026-11-30:
# every op call that must raise ValueError ended in a segmentation fault).
#
#   bash benchmarks/crash_probe.sh [BUILD_ROOT] [LOG_DIR]
#
# BUILD_ROOT holds zfkernels/ with the built _C / _C_cuda (default: this checkout). For each
# probe a separate python3 process: a torch-internal error (no zfkernels involved), then a
# zfkernels CPU-op error with only _C loaded, with _C and _C_cuda loaded, and a CUDA-op
# error. A probe that dies is rerun under cuda-gdb for its native backtrace, and with
# LD_DEBUG=bindings to show which shared object each zfkernels symbol was bound to.
# PROBE_PYTEST="<pytest args>" adds one more probe: those tests run by pytest in BUILD_ROOT
# (the original crash was seen under pytest). Prints one line per probe; the full output
# goes to LOG_DIR (default results/crash_probe).
set -uo pipefail
# Unbuffered on its own (gpu_check.sh exports it too): a probe's stdout goes to a log file, where
# Python buffers it in blocks, and a segfault (what the probes look for) lost what a test printed
# before it, run directly or under PROBE_PYTEST
export PYTHONUNBUFFERED=1
HERE=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$(cd "${1:-$HERE}" && pwd)
LOG=${2:-$HERE/results/crash_probe}
mkdir -p "$LOG"
: > "$LOG/summary.txt"
note() { echo "$*" | tee -a "$LOG/summary.txt"; }
PY=${PYTHON:-python3}

# A package holding copies of the built objects, so that _C can be imported without
# zfkernels/__init__.py (which loads _C_cuda as well).
ONLY=$(mktemp -d)
mkdir -p "$ONLY/zfk_probe"
: > "$ONLY/zfk_probe/__init__.py"
cp "$ROOT"/zfkernels/_C.*.so "$ONLY/zfk_probe/" 2>/dev/null || { echo "crash_probe: no $ROOT/zfkernels/_C*.so (build first)"; exit 2; }
cp "$ROOT"/zfkernels/_C_cuda.*.so "$ONLY/zfk_probe/" 2>/dev/null || true

{
  echo "== toolchain and ABI"
  (gcc --version | head -1; g++ --version | head -1; nvcc --version | tail -2) 2>&1
  CXXDRV=$("$PY" -c "import os, sysconfig; print(os.environ.get('CXX') or 'c++')")
  echo "C++ driver torch.utils.cpp_extension uses: $CXXDRV -> $(command -v "$CXXDRV") ($(readlink -f "$(command -v "$CXXDRV")" 2>/dev/null))"
  file "$(readlink -f "$(command -v "$CXXDRV")")" 2>/dev/null
  head -c 600 "$(command -v "$CXXDRV")" 2>/dev/null | grep -a -v $'\x00' | head -12
  echo "-- does it link libstdc++ statically? ($CXXDRV -### -shared)"
  "$CXXDRV" -### -shared -o /dev/null -x c++ /dev/null 2>&1 | tr ' ' '\n' | grep -E "stdc\+\+|Bstatic|static-lib" | sort | uniq -c
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CXX11_ABI', torch._C._GLIBCXX_USE_CXX11_ABI); print(torch.__config__.show())" 2>&1 | head -12
  for so in "$ONLY"/zfk_probe/*.so; do
    echo "-- $(basename "$so"): NEEDED"; readelf -d "$so" 2>/dev/null | grep NEEDED
    echo "-- exported zfkernels symbols (zf_*):"; nm -D --defined-only -C "$so" 2>/dev/null | grep -c "zf_" || true
    nm -D --defined-only -C "$so" 2>/dev/null | grep "zf_" | head -8
  done
} > "$LOG/toolchain.txt" 2>&1

# An error message that formats integers through an ostream ("tensor_ids has 2 entries but
# params has 1"): the path that crashed with a private static libstdc++ in the extension.
BAD_CPU='torch.ops.zfkernels.perturb_([torch.zeros(4)], [0, 1], 1, 1.0, 0, 0, 0)'
BAD_CUDA='torch.ops.zfkernels.perturb_([torch.zeros(4, device="cuda")], [0, 1], 1, 1.0, 0, 0, 0)'
declare -A CODE=(
  [torch_internal]='import torch
try:
    torch.ones(2).view(3)
except RuntimeError as e:
    print("raised", type(e).__name__)'
  [cpu_op_C_only]="import torch, zfk_probe._C
try:
    $BAD_CPU
except ValueError as e:
    print('raised', type(e).__name__, str(e).splitlines()[0])"
  [cpu_op_both]="import torch, zfk_probe._C, zfk_probe._C_cuda
try:
    $BAD_CPU
except ValueError as e:
    print('raised', type(e).__name__, str(e).splitlines()[0])"
  [cuda_op_both]="import torch, zfk_probe._C, zfk_probe._C_cuda
try:
    $BAD_CUDA
except ValueError as e:
    print('raised', type(e).__name__, str(e).splitlines()[0])"
)
ORDER="torch_internal cpu_op_C_only cpu_op_both cuda_op_both"
FIRST_CRASH=""
for name in $ORDER; do
  if [[ $name == *both ]] && ! ls "$ONLY"/zfk_probe/_C_cuda.*.so >/dev/null 2>&1; then
    note "probe $name: skipped (no _C_cuda built)"; continue
  fi
  if [[ $name == cuda_* ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    note "probe $name: skipped (no GPU)"; continue
  fi
  PYTHONPATH="$ONLY" timeout 120 "$PY" -X faulthandler -c "${CODE[$name]}" > "$LOG/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ] && [[ $name != torch_* ]] && ! grep -q '^raised.*params has 1; give one id per tensor' "$LOG/$name.log"; then
    note "probe $name: WRONG MESSAGE (the integers are missing): $(grep '^raised' "$LOG/$name.log" | head -1)"
    [ -z "$FIRST_CRASH" ] && FIRST_CRASH=$name
  elif [ $rc -eq 0 ] && grep -q '^raised' "$LOG/$name.log"; then
    note "probe $name: OK, $(grep '^raised' "$LOG/$name.log" | head -1)"
  elif [ $rc -ge 128 ]; then   # killed by a signal (139 = SIGSEGV): the failure this probe looks for
    note "probe $name: CRASHED (signal $((rc - 128))): $(grep -m1 -E 'Fatal Python error' "$LOG/$name.log")"
    [ -z "$FIRST_CRASH" ] && FIRST_CRASH=$name
  else
    note "probe $name: FAILED (exit $rc, no crash): $(grep -m1 -E 'Error' "$LOG/$name.log" | cut -c1-160)"
  fi
done

PYTEST_CMD=()
if [ -n "${PROBE_PYTEST:-}" ]; then
  read -r -a PYTEST_ARGS <<< "$PROBE_PYTEST"
  PYTEST_CMD=("$PY" -X faulthandler -m pytest -x -q -p no:cacheprovider "${PYTEST_ARGS[@]}")
  (cd "$ROOT" && PYTHONPATH="$ROOT/python:$ROOT" timeout 180 "${PYTEST_CMD[@]}") > "$LOG/pytest.log" 2>&1
  rc=$?
  if [ $rc -ge 128 ] || grep -q "Fatal Python error" "$LOG/pytest.log"; then
    note "probe pytest ($PROBE_PYTEST): CRASHED (exit $rc): $(grep -m1 -A4 'Current thread' "$LOG/pytest.log" | grep -m1 'test_' | sed 's/^ *//')"
    [ -z "$FIRST_CRASH" ] && FIRST_CRASH=pytest
  else
    note "probe pytest ($PROBE_PYTEST): exit $rc, $(grep -E 'passed|failed' "$LOG/pytest.log" | tail -1)"
  fi
fi

if [ -n "$FIRST_CRASH" ]; then
  echo "== native backtrace of $FIRST_CRASH (cuda-gdb) -> $LOG/backtrace.txt"
  if [ "$FIRST_CRASH" = pytest ]; then
    RUN=(env -C "$ROOT" PYTHONPATH="$ROOT/python:$ROOT" "${PYTEST_CMD[@]}")
  else
    RUN=(env PYTHONPATH="$ONLY" "$PY" -c "${CODE[$FIRST_CRASH]}")
  fi
  if command -v cuda-gdb >/dev/null; then
    timeout 240 cuda-gdb -batch -ex "set pagination off" -ex "set follow-fork-mode parent" -ex run -ex "bt 40" \
      -ex "info sharedlibrary" --args "${RUN[@]}" > "$LOG/backtrace.txt" 2>&1
    grep -E '^#[0-9]+ ' "$LOG/backtrace.txt" | head -14 | cut -c1-200
  else
    echo "cuda-gdb not found"
  fi
  echo "== symbol bindings of zfkernels code in $FIRST_CRASH (LD_DEBUG=bindings) -> $LOG/bindings.txt"
  LD_DEBUG=bindings timeout 180 "${RUN[@]}" 2>&1 \
    | grep -E "zf_ops|zf_cpu|zf_cuda|ValueError|c10::Error|_ZN6zf_" > "$LOG/bindings.txt" || true
  wc -l < "$LOG/bindings.txt" | sed 's/^/bindings lines: /'
  echo "zfkernels symbols bound across shared objects (interposition), if any:"
  grep -E "_ZN6zf_" "$LOG/bindings.txt" | awk '$4 != $7' | head -6 | cut -c1-220
fi
rm -rf "$ONLY"
