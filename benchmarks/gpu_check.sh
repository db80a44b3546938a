#!/usr/bin/env bash
# GPU check of zeroflow, sized for a device lease (one H200; GPU_CHECK_BUDGET_S is its budget):
#   1. builds the extensions (CPU + CUDA, sm_90) in place;                   full log: build.log
#   2. probes the build for the bad-input crash (benchmarks/crash_probe.sh);  crash_probe/
#   3. runs the parity suite on every GPU backend (cuda, native triton, the reference on the
#      GPU) the replay tests and CUDA-graph capture, in pytest-xdist workers: a worker that dies is reported
#      with its test's name and the others go on (without xdist: one process per module);
#   4. runs the GPU benchmark subset (kernels at 64M/256M, fp16 at 256M; optimizer step on the ViT-B list,
#      one ViT-B/16 training iteration per method, the OPT-1.3B-shaped LLM iteration) and writes
#      the report;
#   5. (TIMELINE=1, the default) profiles ZO-SGD / ZO-Adam steps on the ViT-B list and on its
#      layout with 1-4 elements a tensor: where a step's time goes, device busy per op and idle
#      per host category (benchmarks/step_timeline.py): step_timeline.txt in $OUT;
#   6. (PROFILE=1) times the profiled kernel cases against copy_ (the Triton cases named in
#      PROFILE_TRITON too) and, unless NCU=0, runs ncu on one launch of each CUDA case (and of
#      the PROFILE_TRITON cases) (benchmarks/profile_kernels.py): profile.txt and ncu.txt in $OUT;
#      TRITON_VARIANTS="case,..." adds benchmarks/sass_census.py --time (the Triton launch with
#      options constant vs as launched, bit-checked and timed) to profile.txt; CUDA_VARIANTS="dir,..."
#      (folders of prebuilt _C/_C_cuda) runs benchmarks/cuda_variants.py first, each build's
#      kernels bit-checked and timed against this build's (CUDA_VARIANT_CASES: its cases; the
#      phase gets VARIANTS_LIMIT_S, 150, more for it);
#   7. writes the report of every benchmark JSON (also when the check is stopped before it) and
#      prints a one-screen summary (tests passed / failed / crashed by name, each target with
#      its measured value, the step timelines' medians, the minutes per phase).
# What comes back from a lease fits its limits (at most 8 files): in $OUT (or results/gpu/)
# summary.txt, summary.json, performance.md, step_timeline.txt, profile.txt, ncu.txt and
# gpu_logs.tar.gz (every full log, the junit XML, the benchmark JSON, the profiler traces and
# the plots). Nothing is cut to a tail. The summary and the tarball are rewritten after every
# phase, and a SIGTERM or SIGINT (a lease's limit, ^C) stops the command under way and writes
# them with that phase marked "stopped": a call cut short still returns what it measured.
# Env: SKIP_BUILD=1 (or auto: use carried extensions if they load), SKIP_PROBE=1, KERNELS_SELECT (-k of the kernel suite), SKIP_TESTS=1, TESTS (the test files), TEST_DESELECT (node ids; default: two host-only build tests), TEST_SELECT (a pytest -k
#      expression), TEST_LIMIT_S (170), BENCH_ONLY="kernels optim e2e llm" (or none), TIMELINE=0, TIMELINE_LAYOUTS="vit_b vit_b_tiny", PROFILE=1, GPU_CHECK_BUDGET_S (350),
#      TEST_WORKERS (12), KILL_AFTER_S (15: SIGKILL that long after a command's SIGINT), REPORT_LIMIT_S (25: the report's own limit, after the budget), ZEROFLOW_COMMIT (the commit to report where .git is stale, as in a device lease).
set -uo pipefail
if [ "$#" -gt 0 ]; then
  # "gpu_check.sh SKIP_BUILD=auto" passed the setting as an argument, which the script never
  # read: it rebuilt (a minute of the lease) and ran with every other default
  echo "gpu_check.sh: takes no arguments (got: $*); its settings are environment variables, e.g." \
       "SKIP_BUILD=auto bash benchmarks/gpu_check.sh (the list is at the top of the script)" >&2
  exit 2
fi
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
DEST="${OUT:-$ROOT/results/gpu}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/zeroflow_gpu_check.XXXXXX")
mkdir -p "$DEST" "$WORK/logs" "$WORK/bench"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$WORK/triton_cache}"
START=$(date +%s)
DEADLINE=$(( START + ${GPU_CHECK_BUDGET_S:-350} ))   # later steps get what is left
STATUS=0
left() { local l=$(( DEADLINE - $(date +%s) )); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
say() { echo "== [$(( $(date +%s) - START ))s] $*" | tee -a "$WORK/logs/gpu_check.log"; }
PHASE_T0=$START
PHASE=device   # the phase under way: recorded as "stopped" if the check ends during it
record_phase() {  # name status: one row of phases.tsv per phase
  local now; now=$(date +%s)
  printf '%s\t%s\t%s\n' "$1" "$(( now - PHASE_T0 ))" "$2" >> "$WORK/phases.tsv"
  PHASE_T0=$now; PHASE="after_$1"
}
phase_done() { record_phase "$1" "$2"; write_back > /dev/null; }   # then what has finished so far to $DEST
# Phase $1 under way with up to $2 s of what is left of the budget, in $lim; under 15 s left it
# is recorded as skipped and this returns 1.
begin_phase() {
  PHASE=$1; lim=$(left "$2")
  [ "$lim" -ge 15 ] && return 0
  say "$1 skipped: the budget is spent"; phase_done "$1" skipped; return 1
}
# The summary and every log so far, into $DEST: after each phase, so a lease whose limit
# (timeout_s) kills this script outright still returns all the phases that finished before.
write_back() {
  "$PY" -m benchmarks.gpu_summary --work "$WORK" --out-json "$DEST/summary.json" --out-text "$DEST/summary.txt"
  # packed beside the work folder, then moved: a kill during tar leaves the last tarball whole
  tar czf "$WORK.tar.gz" -C "$WORK" --exclude triton_cache . 2>/dev/null && mv -f "$WORK.tar.gz" "$DEST/gpu_logs.tar.gz"
}
# The traps below can run inside a command's redirections (into its log): fds 3 and 4 keep the
# script's own stdout and stderr for them (closed in the commands run starts).
exec 3>&1 4>&2
# performance.md and targets.json from every benchmark JSON written so far (a suite stopped by
# its limit or a signal still writes its JSON): by phase 7, or by ended_early for a check that
# stopped before it, which used to return no report at all. The title's GPU name comes from
# env.json (no torch import); REPORT_LIMIT_S bounds it.
REPORTED=0
write_report() {
  REPORTED=1
  local jsons=() j gpu
  for j in "$WORK"/bench/gpu_*.json; do [ -f "$j" ] && jsons+=("$j"); done
  [ ${#jsons[@]} -gt 0 ] || return 0
  # a suite that ran (its .skips.txt is written after it) but wrote no JSON (a crash, a kill):
  # passed too, so that the page names it under "Not measured" instead of leaving it out
  for j in "$WORK"/bench/gpu_*.json.skips.txt; do
    [ -f "$j" ] && [ ! -f "${j%.skips.txt}" ] && jsons+=("${j%.skips.txt}")
  done
  gpu=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["gpu"])' "$WORK/env.json" 2> /dev/null) || gpu="a GPU"
  say "report -> $DEST/performance.md (plots in gpu_logs.tar.gz: perf/)"
  timeout -k 5 "${REPORT_LIMIT_S:-25}" "$PY" -m benchmarks.report "${jsons[@]}" --out "$WORK/performance.md" \
    --plots "$WORK/perf" --targets-json "$WORK/targets.json" --title "zeroflow performance on $gpu" \
    >> "$WORK/logs/gpu_check.log" 2>&1 && cp "$WORK/performance.md" "$DEST/performance.md"
}
FINISHED=0
finish() {
  FINISHED=1
  say "summary -> $DEST/summary.txt"
  write_back
  echo "files in $DEST: $(ls "$DEST" | tr '\n' ' ')"
  exit "$STATUS"
}
# Ended before finish (a signal, an error of this script): the phase under way is recorded as
# stopped and the check ends as a finished one does, summary and logs in $DEST; the summary
# and logs first (a lease's kill may follow its signal closely), then the report of what ran.
ended_early() {
  [ "$FINISHED" = 1 ] && return
  exec 1>&3 2>&4
  say "stopped during phase $PHASE (exit $1)"
  STATUS=$1; [ "$STATUS" = 0 ] && STATUS=1
  record_phase "$PHASE" stopped
  if [ "$REPORTED" = 0 ]; then write_back > /dev/null; write_report; fi
  finish
}
trap 'ended_early $?' EXIT
# Long commands run in the background and are waited for: bash runs a trap only between
# commands but interrupts a `wait`, so a SIGTERM (a lease's limit) or ^C is taken at once and
# passed on as SIGINT to the command under way (timeout forwards it, pytest then still writes
# its junit and benchmark JSON) before the summary is written.
CHILD=""
run() { "$@" 3>&- 4>&- & CHILD=$!; wait "$CHILD"; local rc=$?; CHILD=""; return "$rc"; }
# A long command under a limit of $1 seconds: SIGINT (LIMIT_SIGNAL) at the limit or when this
# script is stopped, and SIGKILL to its whole process group KILL_AFTER_S later, since a process
# stuck in a CUDA call never gets to Python's SIGINT handler (without -k the stop would wait on
# it until the lease killed everything). A limit under 1 s is refused: `timeout 0` means none.
KILL_AFTER_S=${KILL_AFTER_S:-15}
limited() {
  local lim=$1; shift
  if [ "$lim" -lt 1 ]; then echo "no time left for: $*"; return 124; fi
  run timeout -s "${LIMIT_SIGNAL:-INT}" -k "$KILL_AFTER_S" "$lim" "$@"
}
on_signal() {
  trap - TERM INT
  exec 1>&3 2>&4
  say "SIG$1: stopping the command under way"
  if [ -n "$CHILD" ]; then kill -INT "$CHILD" 2> /dev/null; wait "$CHILD"; fi
  exit "$2"
}
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT

# -------------------------------------------------------------------------- 0. the device
say "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || echo 'nvidia-smi missing')"
if ! "$PY" - > "$WORK/env.json" 2> "$WORK/logs/env.log" <<'EOF'
import json, os, subprocess, numpy, torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
try:
    import triton; tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"missing ({e})"
commit = os.environ.get("ZEROFLOW_COMMIT", "")   # a lease's copy of the tree carries a stale .git
if not commit:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "triton": tv, "numpy": numpy.__version__, "commit": commit or "unknown (no .git)"}))
EOF
then
  say "no usable CUDA device: $(tail -1 "$WORK/logs/env.log")"; STATUS=2; phase_done device failed; finish
fi
cat "$WORK/env.json" | tee -a "$WORK/logs/gpu_check.log"; echo
phase_done device ok

# -------------------------------------------------------------------------- 1. build
# Extensions built elsewhere for this image and carried in: used if they load and were built from
# the csrc/ of this tree (a build older than an edit of csrc/ would run, and time, the old kernels).
PHASE=build
if [ "${SKIP_BUILD:-0}" = "auto" ]; then
  if "$PY" -c "from zfkernels import _compiled as c; assert c.cpu_available() and c.cuda_available(), c.missing_reason('cuda'); \
s = c.stale(); assert not s, 'built from other sources than csrc/: ' + ', '.join(sorted(s))" \
      > "$WORK/logs/prebuilt.log" 2>&1; then
    say "build: skipped, the carried extensions load and match csrc/: $(ls zfkernels/*.so | tr '\n' ' ')"
    SKIP_BUILD=1; phase_done build prebuilt
  else
    say "build: the carried extensions cannot be used ($(tail -1 "$WORK/logs/prebuilt.log")); building"; SKIP_BUILD=0
  fi
fi
if [ "${SKIP_BUILD:-0}" != "1" ]; then
  say "build: pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
  # Not bounded by the budget: a build cut short is lost, a finished one serves the next call on
  # a warm machine (SKIP_BUILD=auto). 900 s only stops a hang (it took 57-75 s on the H200).
  if ZEROFLOW_BUILD_CUDA=1 limited 900 "$PY" -m pip install -v --no-build-isolation --no-deps -e . > "$WORK/logs/build.log" 2>&1; then
    phase_done build ok
  else
    say "build FAILED; its errors (full log in gpu_logs.tar.gz: logs/build.log):"
    grep -n -E "error|Error" "$WORK/logs/build.log" | head -40
    STATUS=1; phase_done build failed
  fi
fi
"$PY" -c "import zfkernels as zk; print('backends on cuda:', zk.available_backends('cuda'))" 2>&1 | tee -a "$WORK/logs/gpu_check.log"

# -------------------------------------------------------------------------- 2. crash probe
if [ "${SKIP_PROBE:-0}" != "1" ]; then
  PHASE=probe; say "crash probe of this build (benchmarks/crash_probe.sh)"
  PROBE_PYTEST="tests/test_parity.py -k bad_inputs" LIMIT_SIGNAL=TERM limited "$(left 90)" \
    bash benchmarks/crash_probe.sh "$ROOT" "$WORK/logs/crash_probe" > "$WORK/logs/crash_probe.out" 2>&1
  rc=$?
  tee -a "$WORK/logs/gpu_check.log" < "$WORK/logs/crash_probe.out"
  # failed: a crash or wrong answer, a probe that failed otherwise, a probe that exited non-zero
  # (cut off at its limit: 124) or wrote no summary; only a clean, complete probe is ok
  if [ "$rc" != "0" ] || [ ! -s "$WORK/logs/crash_probe/summary.txt" ] \
     || grep -qE "CRASHED|WRONG|FAILED|\): exit [1-9]" "$WORK/logs/crash_probe/summary.txt"; then
    say "crash probe exit $rc (124 = hit its limit); see logs/crash_probe.out"; STATUS=1; phase_done probe failed
  else phase_done probe ok; fi
fi

# -------------------------------------------------------------------------- 3. GPU tests
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  PHASE=tests
  TESTS="${TESTS:-tests/test_parity.py tests/test_optim_layout.py tests/test_replay.py tests/test_build.py tests/test_cuda_graph_capture.py}"
  SELECT=(); [ -n "${TEST_SELECT:-}" ] && SELECT=(-k "$TEST_SELECT")
  # Host-only tests that cost the limit most and use no GPU: a rebuild of the CPU extension with
  # MAX_JOBS=2 (88 s on a 2-core machine: in the first xdist pass it held that pass for most of
  # TEST_LIMIT_S, leaving the Triton pass no time) and a second run of the crash probe of phase 2.
  # TEST_DESELECT="" keeps them.
  DESELECT=()
  for t in ${TEST_DESELECT-tests/test_build.py::test_static_libstdcxx_driver_still_links_the_shared_one tests/test_build.py::test_crash_probe_script_on_this_build}; do
    DESELECT+=(--deselect "$t")
  done
  lim=$(left "${TEST_LIMIT_S:-170}")
  say "GPU tests: $TESTS (limit ${lim}s; full log: logs/tests.log)"
  # TRITON_INTERPRET=0: tests/conftest.py only *defaults* it to 1, so Triton compiles for the GPU.
  export TRITON_INTERPRET=0
  # A pytest killed (KILL_AFTER_S past its limit: a hang in a CUDA call) or crashed writes no junit
  # XML, nor does a pass left no time, and the summary counted only the other passes ("0 failed"
  # over tests that never reported): such a run is recorded as one error that names it.
  no_junit() {  # xml what why
    [ -s "$1" ] && return 0
    printf '<testsuites><testsuite name="gpu_check"><testcase classname="benchmarks.gpu_check" name="%s">%s</testcase></testsuite></testsuites>\n' \
      "$(sed 's/&/\&amp;/g; s/</\&lt;/g; s/"/\&quot;/g' <<< "$2")" \
      "<error message=\"$3: no junit XML, its results are lost (logs/tests.log)\"/>" > "$1"
  }
  TIMEOUT_OPT=""; "$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT="--timeout=150"
  if "$PY" -c "import xdist" 2>/dev/null; then
    # Two passes: the cases of the compiled ops and of the reference first, then the Triton
    # ones. Triton compiles each kernel for the GPU on first use (seconds each), and in one
    # pass the 75 s limit of the 44384e0 lease cut 13 of the 91 cuda cases, which come late
    # in file order; now the limit can only cut Triton cases.
    rc=0; tests_end=$(( $(date +%s) + lim ))
    for pass in "not triton" "triton"; do
      expr="$pass"; [ -n "${TEST_SELECT:-}" ] && expr="($TEST_SELECT) and ($pass)"
      plim=$(left $(( tests_end - $(date +%s) )))
      if [ "$plim" -lt 10 ]; then
        say "no time left for the '$pass' test pass"; rc=124
        no_junit "$WORK/tests_${pass// /_}.xml" "test pass -k '$expr'" "not run: no time left of TEST_LIMIT_S"; break
      fi
      say "test pass -k '$expr' (limit ${plim}s)" >> "$WORK/logs/tests.log"
      limited "$plim" "$PY" -X faulthandler -m pytest $TESTS "${DESELECT[@]}" -k "$expr" -n "${TEST_WORKERS:-12}" -q -rfEs \
        -p no:cacheprovider $TIMEOUT_OPT --junitxml="$WORK/tests_${pass// /_}.xml" >> "$WORK/logs/tests.log" 2>&1
      prc=$?
      no_junit "$WORK/tests_${pass// /_}.xml" "test pass -k '$expr'" "pytest exit $prc"
      # 5 = nothing selected (e.g. no Triton on this image): not a failure
      [ "$prc" != "0" ] && [ "$prc" != "5" ] && rc=$prc
      grep -E "passed|failed|error|no tests ran" "$WORK/logs/tests.log" | tail -1 | tee -a "$WORK/logs/gpu_check.log"
    done
  else   # one process per module: a crash loses that module's remaining tests, named in the log
    rc=0
    for t in $TESTS; do
      limited "$(left 170)" "$PY" -X faulthandler -m pytest "$t" "${SELECT[@]}" "${DESELECT[@]}" -q -rfEs -p no:cacheprovider \
        $TIMEOUT_OPT --junitxml="$WORK/tests_$(basename "$t" .py).xml" >> "$WORK/logs/tests.log" 2>&1
      prc=$?; [ "$prc" = 0 ] || rc=$prc
      no_junit "$WORK/tests_$(basename "$t" .py).xml" "$t" "pytest exit $prc"
    done
  fi
  if [ "$rc" = "0" ]; then phase_done tests ok; else say "GPU tests exit $rc (124 = hit the limit)"; STATUS=1; phase_done tests failed; fi
  unset TRITON_INTERPRET
fi

# -------------------------------------------------------------------------- 4. benchmarks
export BENCH_DEVICE=cuda TRITON_INTERPRET=0
unset BENCH_FAST
for suite in ${BENCH_ONLY:-kernels optim e2e llm}; do
  case $suite in
    # kernels 90: the phase took 55 s on the H200 (2026-12-04); the Triton update kernels' constexpr
    # options (f4058f0) and the fp16 rows at 256M add an estimated 11-17 s
    kernels) file=benchmarks/test_bench_kernels.py; sel=(); share=90
             [ -n "${KERNELS_SELECT:-}" ] && sel=(-k "$KERNELS_SELECT") ;;   # one argument, spaces and all
    optim)   file=benchmarks/test_bench_optim_step.py; sel=(-k "vit_b_86m or host"); share=30 ;;
    e2e)     file=benchmarks/test_bench_end_to_end.py; sel=(); share=50 ;;
    llm)     file=benchmarks/test_bench_llm.py; sel=(); share=90 ;;
    none)    continue ;;   # BENCH_ONLY=none: a call for the profile alone
    *)       say "bench $suite: no such suite (BENCH_ONLY takes kernels, optim, e2e, llm or none)"; STATUS=1; continue ;;
  esac
  begin_phase "bench_$suite" "$share" || { STATUS=1; continue; }
  say "bench $suite (limit ${lim}s)"
  # SIGINT (not KILL) at the limit: pytest still finishes the session and writes the JSON so far
  limited "$lim" "$PY" -m pytest "$file" "${sel[@]}" -q -rfEs -p no:cacheprovider \
    --benchmark-json="$WORK/bench/gpu_$suite.json" --benchmark-columns=min,median,rounds --benchmark-sort=name \
    > "$WORK/logs/bench_$suite.log" 2>&1
  rc=$?
  grep -E '^(SKIPPED|FAILED|ERROR)' "$WORK/logs/bench_$suite.log" > "$WORK/bench/gpu_$suite.json.skips.txt" || true
  grep -E "passed|failed|error" "$WORK/logs/bench_$suite.log" | tail -1 | tee -a "$WORK/logs/gpu_check.log"
  if [ "$rc" = "0" ]; then phase_done "bench_$suite" ok; else say "bench $suite exit $rc (124/130 = hit its limit)"; STATUS=1; phase_done "bench_$suite" failed; fi
done

# -------------------------------------------------------------------------- 5. step timeline
# Where the optimizer step's time goes (issue 13 item 2): a profiler timeline of ZO-SGD / ZO-Adam
# steps, the device's busy time per op and its idle time per host category; on the ViT-B list
# and on the same layout with 1-4 elements a tensor (host work alone). step_timeline.txt in $OUT.
if [ "${TIMELINE:-1}" = "1" ] && begin_phase timeline 60; then
  say "step timeline (benchmarks/step_timeline.py, limit ${lim}s)"
  rc=0; tl_end=$(( $(date +%s) + lim ))
  for layout in ${TIMELINE_LAYOUTS:-vit_b vit_b_tiny}; do
    llim=$(left $(( tl_end - $(date +%s) )))
    [ "$llim" -lt 10 ] && { echo "layout $layout: no time left" >> "$WORK/logs/step_timeline.txt"; rc=124; break; }
    limited "$llim" "$PY" -m benchmarks.step_timeline --layout "$layout" \
      --json "$WORK/bench/step_timeline_$layout.json" --trace-dir "$WORK/traces/$layout" \
      >> "$WORK/logs/step_timeline.txt" 2>&1 || rc=$?
  done
  tee -a "$WORK/logs/gpu_check.log" < "$WORK/logs/step_timeline.txt"
  cp "$WORK/logs/step_timeline.txt" "$DEST/step_timeline.txt"
  if [ "$rc" = "0" ]; then phase_done timeline ok; else say "step timeline exit $rc"; STATUS=1; phase_done timeline failed; fi
fi

# -------------------------------------------------------------------------- 6. kernel profile
# case lists as written ("a, b"): the names hold no spaces, and a space split "--cases" in two
CUDA_VARIANTS="${CUDA_VARIANTS:-}"; CUDA_VARIANTS="${CUDA_VARIANTS// /}"
CUDA_VARIANT_CASES="${CUDA_VARIANT_CASES:-}"; CUDA_VARIANT_CASES="${CUDA_VARIANT_CASES// /}"
VARIANTS_LIMIT_S="${VARIANTS_LIMIT_S:-150}"
PROFILE_CAP=100; [ -n "$CUDA_VARIANTS" ] && PROFILE_CAP=$(( PROFILE_CAP + VARIANTS_LIMIT_S ))
if [ "${PROFILE:-0}" = "1" ] && begin_phase profile "$PROFILE_CAP"; then
  say "profile: kernels vs copy_ at 256M, then ncu on one launch per case at 64M (limit ${lim}s)"
  profile_status=ok; prc=0   # prc: the exit of the last profile step that failed
  if [ -n "$CUDA_VARIANTS" ]; then
    # Prebuilt builds of the kernels against this one, bits first (benchmarks/cuda_variants.py):
    # first, as what a call that names them is made for; the other steps share what is left.
    echo "## cuda_variants --variants $CUDA_VARIANTS${CUDA_VARIANT_CASES:+ --cases $CUDA_VARIANT_CASES}" \
      >> "$WORK/logs/profile.txt"
    t0=$(date +%s)
    limited "$(left "$VARIANTS_LIMIT_S")" "$PY" -m benchmarks.cuda_variants --variants "$CUDA_VARIANTS" \
      ${CUDA_VARIANT_CASES:+--cases "$CUDA_VARIANT_CASES"} --json "$WORK/bench/cuda_variants.json" \
      >> "$WORK/logs/profile.txt" 2>&1 || prc=$?
    lim=$(left $(( lim - ($(date +%s) - t0) )))
  fi
  # Each step's limit is its share of the phase's (1/6 per timing run, 1/4 per ncu run, 1/6 for
  # the census): the shares used to add up to twice the phase, so the budget cut the last step,
  # the Triton ncu that a profile call is made for. The census of Triton variants, the least
  # needed, now comes last.
  share() { left $(( lim * $1 / $2 )); }
  PROFILE_TRITON="${PROFILE_TRITON:-}"; PROFILE_TRITON="${PROFILE_TRITON// /}"
  TRITON_VARIANTS="${TRITON_VARIANTS:-}"; TRITON_VARIANTS="${TRITON_VARIANTS// /}"
  PROFILE_RUNS=(); [ "${PROFILE_CUDA:-1}" = "1" ] && PROFILE_RUNS+=("--backend cuda")
  [ -n "${PROFILE_TRITON:-}" ] && PROFILE_RUNS+=("--backend triton --cases $PROFILE_TRITON")
  for args in "${PROFILE_RUNS[@]}"; do
    echo "## profile_kernels $args" >> "$WORK/logs/profile.txt"
    limited "$(share 1 6)" "$PY" -m benchmarks.profile_kernels $args >> "$WORK/logs/profile.txt" 2>&1 || prc=$?
  done
  if [ "${NCU:-1}" = "0" ]; then
    :
  elif command -v ncu > /dev/null; then
    NCU_SECTIONS=(--section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats
                  --section WarpStateStats --section MemoryWorkloadAnalysis)
    if [ "${PROFILE_CUDA:-1}" = "1" ]; then
      limited "$(share 1 4)" ncu --clock-control none -k regex:multi_tensor_kernel "${NCU_SECTIONS[@]}" \
        "$PY" -m benchmarks.profile_kernels --numel 67108864 --no-timing >> "$WORK/logs/ncu.txt" 2>&1
      rc=$?; echo "ncu exit $rc" >> "$WORK/logs/ncu.txt"; [ "$rc" = 0 ] || prc=$rc
    fi
    if [ -n "${PROFILE_TRITON:-}" ]; then   # the Triton kernels of the same cases
      limited "$(share 1 4)" ncu --clock-control none -k 'regex:_(perturb|sgd|adam)_kernel' "${NCU_SECTIONS[@]}" \
        "$PY" -m benchmarks.profile_kernels --backend triton --cases "$PROFILE_TRITON" --numel 67108864 --no-timing \
        >> "$WORK/logs/ncu.txt" 2>&1
      rc=$?; echo "ncu (triton) exit $rc" >> "$WORK/logs/ncu.txt"; [ "$rc" = 0 ] || prc=$rc
    fi
    cp "$WORK/logs/ncu.txt" "$DEST/ncu.txt"
  else
    say "ncu not found"; profile_status=partial
  fi
  if [ -n "${TRITON_VARIANTS:-}" ]; then   # the register question of notes.md: options constant vs runtime
    echo "## sass_census --time --cases $TRITON_VARIANTS" >> "$WORK/logs/profile.txt"
    limited "$(share 1 6)" "$PY" -m benchmarks.sass_census --time --cases "$TRITON_VARIANTS" \
      --json "$WORK/bench/triton_variants.json" >> "$WORK/logs/profile.txt" 2>&1 || prc=$?
  fi
  tee -a "$WORK/logs/gpu_check.log" < "$WORK/logs/profile.txt"
  cp "$WORK/logs/profile.txt" "$DEST/profile.txt"
  # a step that failed or hit its limit fails the phase (it was recorded "ok" whatever they did)
  if [ "$prc" != 0 ]; then say "profile: a step exit $prc (124 = hit its limit; profile.txt, ncu.txt)"; STATUS=1
    profile_status=failed; fi
  phase_done profile "$profile_status"
fi

# -------------------------------------------------------------------------- 7. report, summary
PHASE=report
if compgen -G "$WORK/bench/gpu_*.json" > /dev/null; then
  if write_report; then phase_done report ok; else say "report failed (gpu_check.log)"; STATUS=1; phase_done report failed; fi
fi
finish
