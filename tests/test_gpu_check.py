"""benchmarks/gpu_check.sh's own flow, on the CPU: a script that otherwise only runs on a device
lease, where a bash slip costs the lease. The device probe is answered by a wrapper around
python (the only part faked); the build, probe and test phases are skipped and the step
timeline runs on its host-work layout, so the phases, the summary and what comes back in $OUT
are those of a lease."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Answers gpu_check.sh's device probe (a python script on stdin that asserts CUDA) as an H200
# would; with FAKE_HANG_MODULE set, a run of that module hangs as one stuck in a CUDA call does
# (SIGINT never handled; FAKE_HANG_READY is created once it ignores SIGINT); every other call
# goes to this interpreter.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-" ]; then
  src=$(cat)
  if grep -q "torch sees no CUDA device" <<< "$src"; then
    echo '{{"gpu": "dry run", "torch": "t", "cuda": "c", "triton": "tr", "numpy": "n", "commit": "dry"}}'; exit 0
  fi
  exec {py} - <<< "$src"
fi
if [ -n "${{FAKE_HANG_MODULE:-}}" ] && [ "$1 $2" = "-m $FAKE_HANG_MODULE" ]; then
  exec {py} -c 'import signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
open(sys.argv[1], "w").close()
time.sleep(600)' "$FAKE_HANG_READY"
fi
exec {py} "$@"
"""


def _gpu_check(tmp_path, start=False, **env):
    """gpu_check.sh run to its end (a CompletedProcess), or with ``start`` running (a Popen,
    stdout piped) for a test to interrupt; and its $OUT."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(py=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "out"
    (tmp_path / "tmp").mkdir()
    full = dict(os.environ, OUT=str(out), PYTHON=str(fake), SKIP_BUILD="1", SKIP_PROBE="1", SKIP_TESTS="1",
                GPU_CHECK_BUDGET_S="240", TMPDIR=str(tmp_path / "tmp"))   # its work folder: in tmp_path
    full.update(env)
    cmd = ["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")]
    if start:
        proc = subprocess.Popen(cmd, env=full, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return proc, out
    return subprocess.run(cmd, env=full, cwd=ROOT, capture_output=True, text=True, timeout=300), out


def test_an_argument_is_refused_before_anything_runs(tmp_path):
    """Settings are environment variables: `gpu_check.sh SKIP_BUILD=auto` (as the README wrote
    it) was ignored, and the check rebuilt and ran with every default."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "SKIP_BUILD=auto"],
                          env=dict(os.environ, OUT=str(out), TMPDIR=str(tmp_path)), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "takes no arguments (got: SKIP_BUILD=auto)" in proc.stderr
    assert "SKIP_BUILD=auto bash benchmarks/gpu_check.sh" in proc.stderr
    assert os.listdir(tmp_path) == []         # no $OUT, no work folder: nothing ran


def test_every_argument_is_named_in_the_refusal(tmp_path):
    """Two settings given as arguments: both are named (each was ignored), and nothing runs."""
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "SKIP_BUILD=auto",
                           "BENCH_ONLY=none"], env=dict(os.environ, OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path)),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "takes no arguments (got: SKIP_BUILD=auto BENCH_ONLY=none)" in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == []


def test_timeline_phase_comes_back_in_the_summary(tmp_path):
    proc, out = _gpu_check(tmp_path, BENCH_ONLY="none", TIMELINE_LAYOUTS="vit_b_tiny")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["gpu_logs.tar.gz", "step_timeline.txt", "summary.json", "summary.txt"]
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["phase"], p["status"]) for p in summary["phases"]] == [("device", "ok"), ("timeline", "ok")]
    text = (out / "summary.txt").read_text()
    for case in ("zo_sgd-rademacher", "zo_sgd-gaussian", "zo_adam-rademacher", "zo_adam-gaussian"):
        assert f"  vit_b_tiny {case}: " in text
    assert "zo_adam-gaussian" in (out / "step_timeline.txt").read_text()
    with tarfile.open(out / "gpu_logs.tar.gz") as tar:
        names = tar.getnames()
    assert "./bench/step_timeline_vit_b_tiny.json" in names
    assert sum(n.startswith("./traces/vit_b_tiny/") and n.endswith(".json") for n in names) == 4


@pytest.mark.parametrize("bench_only", ["kernel", "optim_step"])
def test_an_unknown_suite_is_named_and_fails_the_check(tmp_path, bench_only):
    proc, out = _gpu_check(tmp_path, BENCH_ONLY=bench_only, TIMELINE="0")
    assert proc.returncode == 1
    assert f"bench {bench_only}: no such suite (BENCH_ONLY takes kernels, optim, e2e, llm or none)" in proc.stdout


def _processes_naming(text: str) -> list[tuple[str, str]]:
    """(pid, command line) of every process whose command line holds ``text``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append((pid, cmd))
    return found


def _loaded(cmd_text: str, library: str) -> bool:
    """Whether a process whose command line holds ``cmd_text`` has mapped ``library``."""
    for pid, _ in _processes_naming(cmd_text):
        try:
            with open(f"/proc/{pid}/maps") as f:
                if library in f.read():
                    return True
        except OSError:
            pass
    return False


def _wait_until(proc, ready, what: str) -> None:
    """Poll ``ready()`` until it holds, failing with ``what`` if the check ends or a minute passes."""
    deadline = time.monotonic() + 60
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_check_stopped_mid_phase_still_returns_what_finished(tmp_path):
    """A lease's limit sends SIGTERM: the phases that finished are already in $OUT (written after
    each phase, so even a SIGKILL keeps them), the command under way is stopped, and the summary
    names the phase it cut."""
    proc, out = _gpu_check(tmp_path, start=True, BENCH_ONLY="none", TIMELINE_LAYOUTS="vit_b_tiny vit_b_tiny")
    # wait for the first layout's python to be importing torch (past its startup, where SIGINT
    # would end it without a word)
    _wait_until(proc, lambda: _loaded(f"step_timeline --layout vit_b_tiny --json {tmp_path}", "libtorch"),
                "the first step timeline never started")
    # written back after the device phase, while the timeline runs
    assert [p["phase"] for p in json.loads((out / "summary.json").read_text())["phases"]] == ["device"]
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout
    assert "SIGTERM: stopping the command under way" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["phase"], p["status"]) for p in summary["phases"]] == [("device", "ok"), ("timeline", "stopped")]
    assert "timeline" in (out / "summary.txt").read_text()
    with tarfile.open(out / "gpu_logs.tar.gz") as tar:
        timeline_log = tar.extractfile("./logs/step_timeline.txt").read().decode()
    # SIGINT reached the first layout's run at once (bash alone would have waited for it to end)
    # and the second never started
    assert "KeyboardInterrupt" in timeline_log and "Traceback" in timeline_log, timeline_log
    assert _processes_naming(str(tmp_path)) == []   # nothing of the check outlives it


def test_a_stopped_command_that_ignores_sigint_is_killed(tmp_path):
    """A process stuck in a CUDA call never runs Python's SIGINT handler: when the lease's limit
    stops the check, the command under way (here the profile, which once ran without ``-k``) is
    killed KILL_AFTER_S after the SIGINT, and the check ends with its summary, instead of waiting
    on it until the lease kills everything."""
    ready = tmp_path / "hanging"
    proc, out = _gpu_check(tmp_path, start=True, BENCH_ONLY="none", TIMELINE="0", PROFILE="1", NCU="0",
                           KILL_AFTER_S="2", FAKE_HANG_MODULE="benchmarks.profile_kernels", FAKE_HANG_READY=str(ready))
    _wait_until(proc, ready.exists, "the profile never started")
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)   # without the kill: the hang's 600 s
    assert proc.returncode == 143, stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["phase"], p["status"]) for p in summary["phases"]] == [("device", "ok"), ("profile", "stopped")]
    assert _processes_naming(str(tmp_path)) == []


def test_a_check_stopped_before_its_report_still_writes_it(tmp_path):
    """performance.md came only from the last phase: a check stopped during the profile (after
    its benchmark suites had written their JSON) returned no report and no targets. Now the
    summary is written back first, then the report of every JSON so far."""
    import glob
    import shutil
    ready = tmp_path / "hanging"
    proc, out = _gpu_check(tmp_path, start=True, BENCH_ONLY="none", TIMELINE="0", PROFILE="1", NCU="0",
                           KILL_AFTER_S="2", FAKE_HANG_MODULE="benchmarks.profile_kernels", FAKE_HANG_READY=str(ready))
    _wait_until(proc, ready.exists, "the profile never started")
    # The work folder, not the .tar.gz beside it. A pattern like ``.*[!z]`` once missed a folder
    # whose random mktemp suffix ended in "z" (1 run in 62 failed CI).
    (work,) = [p for p in glob.glob(str(tmp_path / "tmp" / "zeroflow_gpu_check.*")) if os.path.isdir(p)]
    shutil.copy(os.path.join(ROOT, "benchmarks", "fixtures", "bench_fast_cpu.json"),
                os.path.join(work, "bench", "gpu_kernels.json"))               # as a suite's JSON
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=180)
    assert proc.returncode == 143, stdout
    assert f"report -> {out}/performance.md" in stdout
    report = (out / "performance.md").read_text()
    assert report.startswith("# zeroflow performance on dry run\n"), report[:200]
    with tarfile.open(out / "gpu_logs.tar.gz") as tar:
        assert "./targets.json" in tar.getnames()
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["phase"], p["status"]) for p in summary["phases"]] == [("device", "ok"), ("profile", "stopped")]


def test_a_spent_budget_skips_the_profile_instead_of_running_it_unbounded(tmp_path):
    """With the budget spent, ``timeout 0`` (the limit the profile's share of it came to) would
    have meant no limit at all: the phase is skipped and named so."""
    proc, out = _gpu_check(tmp_path, BENCH_ONLY="none", TIMELINE="0", PROFILE="1", GPU_CHECK_BUDGET_S="0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "profile skipped: the budget is spent" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["phase"], p["status"]) for p in summary["phases"]] == [("device", "ok"), ("profile", "skipped")]


def test_profile_kernels_refuses_an_unknown_case_before_any_launch(capsys):
    """A typo in PROFILE_TRITON ended the profile with a KeyError after the cases before it had
    run (on a lease, minutes); now an argparse error names it and the valid cases, before CUDA."""
    from benchmarks import profile_kernels
    with pytest.raises(SystemExit) as e:
        profile_kernels.main(["--backend", "triton", "--cases", "sgd-fp32-rademacher, sgd-fp32-gausian"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--cases: unknown case(s) sgd-fp32-gausian; valid: perturb-fp32-rademacher," in err


def test_a_crash_probe_cut_at_its_limit_fails_the_check(tmp_path):
    # only CRASHED / WRONG in its summary failed the phase: a probe cut off at its limit (exit
    # 124, no summary line) or one that failed otherwise was recorded "probe (ok)"
    proc, out = _gpu_check(tmp_path, SKIP_PROBE="0", BENCH_ONLY="none", TIMELINE="0", GPU_CHECK_BUDGET_S="6")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "crash probe exit 124 (124 = hit its limit)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert ("probe", "failed") in [(p["phase"], p["status"]) for p in summary["phases"]]


def test_the_crash_probe_run_directly_keeps_what_a_crashing_test_printed(tmp_path):
    """benchmarks/crash_probe.sh run on its own (not under gpu_check.sh, which exports
    PYTHONUNBUFFERED): its pytest probe's output went to a log file, block-buffered, and the
    segfault it looks for lost what the crashing test had printed."""
    import shutil
    built = [os.path.join(ROOT, "zfkernels", f) for f in os.listdir(os.path.join(ROOT, "zfkernels"))
             if f.startswith("_C.") and f.endswith(".so")]
    if not built:
        pytest.skip("the CPU extension is not built")
    (tmp_path / "build" / "zfkernels").mkdir(parents=True)
    shutil.copy(built[0], tmp_path / "build" / "zfkernels")
    crash = tmp_path / "crash_test.py"
    crash.write_text("def test_crashes():\n    import ctypes\n    print('printed before the crash')\n"
                     "    ctypes.string_at(0)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    # no cuda-gdb rerun of the crash (minutes): the probe looks for it on PATH
    env.update(PYTHON=sys.executable, PROBE_PYTEST=f"-s {crash}",
               PATH=os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if "cuda" not in d))
    res = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "crash_probe.sh"), str(tmp_path / "build"),
                          str(tmp_path / "log")], capture_output=True, text=True, timeout=600, env=env)
    summary = (tmp_path / "log" / "summary.txt").read_text()
    assert f"probe pytest (-s {crash}): CRASHED (exit 139)" in summary, summary + res.stderr
    assert "printed before the crash" in (tmp_path / "log" / "pytest.log").read_text()


def test_profile_case_lists_with_spaces_reach_the_scripts_whole(tmp_path):
    """PROFILE_TRITON="a, b" (as profile_kernels' own --cases takes it) was word-split into
    ``--cases a, b``: argparse refused "unrecognized arguments: b" and the Triton timing of a
    profile call was lost; sass_census refused " b" as an unknown case."""
    proc, out = _gpu_check(tmp_path, BENCH_ONLY="none", TIMELINE="0", PROFILE="1", PROFILE_CUDA="0", NCU="0",
                           PROFILE_TRITON="sgd-fp32-rademacher, sgd-fp32-gaussian",
                           TRITON_VARIANTS="sgd-fp32-rademacher, sgd-fp32-gaussian")
    profile = (out / "profile.txt").read_text()
    assert "## profile_kernels --backend triton --cases sgd-fp32-rademacher,sgd-fp32-gaussian" in profile, profile
    assert "unrecognized arguments" not in profile, profile
    assert "unknown case" not in profile, profile


def test_cuda_variants_run_first_with_their_cases_and_their_own_time(tmp_path):
    """CUDA_VARIANTS="a, b" reaches benchmarks/cuda_variants.py whole, with CUDA_VARIANT_CASES and
    a JSON in the work folder, before profile_kernels, and the phase gets VARIANTS_LIMIT_S more
    than its 100 s (the answer of a recording python: its arguments, in order of the calls)."""
    log = tmp_path / "calls.txt"
    wrap = tmp_path / "pywrap"
    wrap.write_text('#!/usr/bin/env bash\ncase "$1 $2" in\n'
                    f'  "-m benchmarks.cuda_variants"|"-m benchmarks.profile_kernels") echo "$*" >> {log}; exit 0;;\n'
                    f'esac\nexec {tmp_path / "python"} "$@"\n')
    wrap.chmod(0o755)
    proc, out = _gpu_check(tmp_path, BENCH_ONLY="none", TIMELINE="0", PROFILE="1", NCU="0", PYTHON=str(wrap),
                           CUDA_VARIANTS="results/v/a, results/v/b", CUDA_VARIANT_CASES="sgd-bf16-rademacher, x",
                           VARIANTS_LIMIT_S="60")
    assert proc.returncode == 0, proc.stdout[-3000:]
    calls = log.read_text().splitlines()
    assert calls[0].startswith("-m benchmarks.cuda_variants --variants results/v/a,results/v/b "
                               "--cases sgd-bf16-rademacher,x --json "), calls
    assert calls[0].endswith("/bench/cuda_variants.json") and calls[1].startswith("-m benchmarks.profile_kernels")
    assert "## cuda_variants --variants results/v/a,results/v/b --cases sgd-bf16-rademacher,x" in \
        (out / "profile.txt").read_text()
    assert "(limit 160s)" in proc.stdout          # 100 + VARIANTS_LIMIT_S
    (tmp_path / "plain").mkdir()     # without CUDA_VARIANTS: the phase's 100 s, no variants run
    proc, _ = _gpu_check(tmp_path / "plain", BENCH_ONLY="none", TIMELINE="0", PROFILE="1", NCU="0", PYTHON=str(wrap))
    assert "(limit 100s)" in proc.stdout and "cuda_variants" not in log.read_text().splitlines()[-1]


def test_sass_census_takes_a_case_list_with_spaces(monkeypatch):
    import torch

    from benchmarks import sass_census
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:      # past the case names: no GPU here for --time
        sass_census.main(["--time", "--cases", "sgd-fp32-rademacher, sgd-fp32-gaussian"])
    assert "unknown case" not in str(e.value.code), e.value.code


def test_a_profile_whose_steps_fail_fails_the_phase(tmp_path):
    """Every profile step's exit was ignored: a profile_kernels that died (here: no CUDA device)
    or hit its limit left the phase "profile (ok)" and the check's exit 0."""
    proc, out = _gpu_check(tmp_path, BENCH_ONLY="none", TIMELINE="0", PROFILE="1", NCU="0")
    assert proc.returncode == 1, proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["phase"], p["status"]) for p in summary["phases"]] == [("device", "ok"), ("profile", "failed")]
    assert "profile: a step exit 1" in proc.stdout


@pytest.mark.parametrize("step", ["ncu", "sass_census", "cuda_variants"])
def test_a_failing_ncu_or_sass_census_fails_the_profile_phase(tmp_path, step):
    """The ncu step's exit was only written to ncu.txt, the register census's nowhere: with
    profile_kernels passing (answered here) and that step failing (exit 3: a fake ncu on PATH, or
    benchmarks.sass_census / benchmarks.cuda_variants answered so), the phase was "profile (ok)"."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "ncu").write_text("#!/usr/bin/env bash\necho '==ERROR== no device'\nexit 3\n")
    (bin_ / "ncu").chmod(0o755)
    wrap = tmp_path / "pywrap"
    wrap.write_text('#!/usr/bin/env bash\n[ "$1 $2" = "-m benchmarks.profile_kernels" ] && exit 0\n'
                    '[ "$1 $2" = "-m benchmarks.sass_census" ] && exit 3\n'
                    '[ "$1 $2" = "-m benchmarks.cuda_variants" ] && exit 3\n'
                    f'exec {tmp_path / "python"} "$@"\n')
    wrap.chmod(0o755)
    env = {"ncu": dict(NCU="1", PATH=f"{bin_}:{os.environ['PATH']}"), "sass_census": dict(NCU="0", TRITON_VARIANTS="a"),
           "cuda_variants": dict(NCU="0", CUDA_VARIANTS="v")}[step]
    proc, out = _gpu_check(tmp_path, BENCH_ONLY="none", TIMELINE="0", PROFILE="1", PYTHON=str(wrap), **env)
    assert proc.returncode == 1, proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["phase"], p["status"]) for p in summary["phases"]] == [("device", "ok"), ("profile", "failed")]
    assert "profile: a step exit 3" in proc.stdout
    if step == "ncu":
        assert "ncu exit 3" in (out / "ncu.txt").read_text()


# Benchmark suites answered without running them: the optimizer suite writes a JSON (the CPU
# fixture's), the LLM suite dies as a segfault does, before writing any.
FAKE_SUITES = """#!/usr/bin/env bash
if [ "$1 $2" = "-m pytest" ]; then
  for a in "$@"; do case $a in --benchmark-json=*) json=${{a#--benchmark-json=}};; esac; done
  case "$3" in
    *test_bench_optim_step.py) cp {fixture} "$json"; echo "1 passed in 0.1s"; exit 0;;
    *test_bench_llm.py) echo "Fatal Python error: Segmentation fault"; exit 139;;
  esac
fi
exec {fake} "$@"
"""


def test_a_suite_that_wrote_no_json_is_named_in_the_report(tmp_path):
    """The report was given only the JSON files that exist: a suite that crashed before writing
    its JSON (the LLM suite here) was left out of performance.md without a word."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(py=sys.executable))
    fake.chmod(0o755)
    suites = tmp_path / "suites"
    suites.write_text(FAKE_SUITES.format(fixture=os.path.join(ROOT, "benchmarks", "fixtures", "bench_fast_cpu.json"),
                                         fake=fake))
    suites.chmod(0o755)
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=str(suites), SKIP_BUILD="1", SKIP_PROBE="1", SKIP_TESTS="1",
               GPU_CHECK_BUDGET_S="240", TMPDIR=str(tmp_path / "tmp"), BENCH_ONLY="optim llm", TIMELINE="0")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [(p["phase"], p["status"]) for p in summary["phases"]] == [
        ("device", "ok"), ("bench_optim", "ok"), ("bench_llm", "failed"), ("report", "ok")]
    report = (out / "performance.md").read_text()
    assert "- gpu_llm.json: no results (missing)" in report, report[-2000:]


# The GPU tests' pytest killed before it writes its junit XML (SIGKILL after its limit: exit 137).
FAKE_KILLED_TESTS = """#!/usr/bin/env bash
# FAKE_XDIST set: xdist is there; empty: it is not, whatever the python running the tests has
[ "$1 $2" = "-c import xdist" ] && {{ [ -n "${{FAKE_XDIST:-}}" ]; exit $?; }}
if [ "$1 $2 $3 $4" = "-X faulthandler -m pytest" ]; then
  # FAKE_EMPTY_JUNIT: killed after opening its junit file, before writing it (0 bytes)
  for a in "$@"; do
    [ -n "${{FAKE_EMPTY_JUNIT:-}}" ] && [ "${{a#--junitxml=}}" != "$a" ] && : > "${{a#--junitxml=}}"
  done
  echo "== 3 passed (then hung and killed)"; exit 137
fi
exec {fake} "$@"
"""


@pytest.mark.parametrize("xdist,empty", [("1", ""), ("", ""), ("", "1")],
                         ids=["xdist-passes", "per-module", "per-module-empty-xml"])
def test_a_test_run_that_wrote_no_junit_is_an_error_in_the_summary(tmp_path, xdist, empty):
    """A test pass killed at its limit (or crashed) writes no junit XML (or an empty one), and the
    summary's tests line counted only the passes that did: "0 failed, 0 crashed" over tests that
    never reported."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(py=sys.executable))
    fake.chmod(0o755)
    killed = tmp_path / "killed"
    killed.write_text(FAKE_KILLED_TESTS.format(fake=fake))
    killed.chmod(0o755)
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=str(killed), SKIP_BUILD="1", SKIP_PROBE="1", SKIP_TESTS="0",
               TESTS="tests/test_build.py", GPU_CHECK_BUDGET_S="240", TMPDIR=str(tmp_path / "tmp"),
               BENCH_ONLY="none", TIMELINE="0", FAKE_XDIST=xdist, FAKE_EMPTY_JUNIT=empty)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["tests"]["errors"]) == (2 if xdist else 1), summary["tests"]   # the two passes, or the module
    assert ("tests", "failed") in [(p["phase"], p["status"]) for p in summary["phases"]]
    errors = summary["tests"]["errors"]
    assert errors, summary["tests"]
    assert all(e["message"] == "pytest exit 137: no junit XML, its results are lost (logs/tests.log)"
               for e in errors), errors
    assert "benchmarks/gpu_check.py::" in errors[0]["name"]
    assert f"{len(errors)} errors" in (out / "summary.txt").read_text()


FAKE_RECORD_TESTS = """#!/usr/bin/env bash
# FAKE_XDIST set: xdist is there; empty: it is not, whatever the python running the tests has
[ "$1 $2" = "-c import xdist" ] && {{ [ -n "${{FAKE_XDIST:-}}" ]; exit $?; }}
[ "$1 $2 $3 $4" = "-X faulthandler -m pytest" ] && {{ echo "$*" >> {args}; exit 0; }}
exec {fake} "$@"
"""


@pytest.mark.parametrize("xdist", ["1", ""], ids=["xdist-passes", "per-module"])
@pytest.mark.parametrize("deselect", [None, ""], ids=["default", "kept"])
def test_the_gpu_tests_leave_out_the_host_only_build_tests(tmp_path, xdist, deselect):
    """tests/test_build.py's rebuild of the CPU extension (MAX_JOBS=2: 88 s on 2 cores) ran in
    the first xdist pass on the lease and held it for most of TEST_LIMIT_S, with no GPU use;
    the crash probe test repeated phase 2. They are deselected unless TEST_DESELECT says else."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(py=sys.executable))
    fake.chmod(0o755)
    args = tmp_path / "args"
    rec = tmp_path / "record"
    rec.write_text(FAKE_RECORD_TESTS.format(fake=fake, args=args))
    rec.chmod(0o755)
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(rec), SKIP_BUILD="1", SKIP_PROBE="1",
               SKIP_TESTS="0", GPU_CHECK_BUDGET_S="240", TMPDIR=str(tmp_path / "tmp"), BENCH_ONLY="none",
               TIMELINE="0", FAKE_XDIST=xdist)
    env.pop("TEST_DESELECT", None)
    if deselect is not None:
        env["TEST_DESELECT"] = deselect
    subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=env, cwd=ROOT,
                   capture_output=True, text=True, timeout=300)
    runs = args.read_text().splitlines()
    assert len(runs) == (2 if xdist else 5), runs     # two passes, or one run per test file (TESTS: 5)
    host_only = ("test_static_libstdcxx_driver_still_links_the_shared_one", "test_crash_probe_script_on_this_build")
    for run in runs:
        for test in host_only:
            assert (f"--deselect tests/test_build.py::{test}" in run) == (deselect is None), run


def test_a_test_pass_left_no_time_is_an_error_in_the_summary(tmp_path):
    """TEST_LIMIT_S spent by the first xdist pass: the Triton pass never ran, and the summary's
    tests line did not say so."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(py=sys.executable))
    fake.chmod(0o755)
    args = tmp_path / "args"
    rec = tmp_path / "record"
    rec.write_text(FAKE_RECORD_TESTS.replace('exit 0; }}', 'sleep 3; exit 0; }}').format(fake=fake, args=args))
    rec.chmod(0o755)
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=str(rec), SKIP_BUILD="1", SKIP_PROBE="1", SKIP_TESTS="0",
               TEST_LIMIT_S="12", GPU_CHECK_BUDGET_S="240", TMPDIR=str(tmp_path / "tmp"), BENCH_ONLY="none",
               TIMELINE="0", FAKE_XDIST="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert "no time left for the 'triton' test pass" in proc.stdout, proc.stdout[-3000:]
    errors = json.loads((out / "summary.json").read_text())["tests"]["errors"]
    assert {"name": "benchmarks/gpu_check.py::test pass -k 'triton'",
            "message": "not run: no time left of TEST_LIMIT_S: no junit XML, its results are lost (logs/tests.log)"} \
        in errors, errors


def test_each_profile_case_is_what_its_name_says():
    """The lease's ncu rows are read by case name: op-dtype-dist[-sparse] must be the op, the
    storage dtype, the distribution and the mask the case launches."""
    from benchmarks import _common as C
    from benchmarks import profile_kernels as pk

    for name, (op, dtype, dist, opts) in pk.CASES.items():
        parts = name.split("-")
        assert parts[:3] == [op, next(k for k, v in C.DTYPES.items() if v == dtype), dist], name
        assert (parts[3:] == ["sparse"]) == ("mask_seed" in opts and opts.get("sparsity", 0) > 0), name
        assert len(parts) in (3, 4), name


def test_profile_kernels_refuses_a_bad_numel_before_any_launch(capsys):
    """--numel 0 ended in a ZeroDivisionError after the first case had run (a negative one in
    torch.randn's error)."""
    from benchmarks import profile_kernels
    with pytest.raises(SystemExit) as e:
        profile_kernels.main(["--numel", "0"])
    assert e.value.code == 2
    assert "--numel must be at least 1 (got 0)" in capsys.readouterr().err


def _profile_kernels_sent(sig: str) -> subprocess.CompletedProcess:
    """profile_kernels over two cases in a child whose stdout is a pipe (block-buffered, as a
    user's: child_env drops PYTHONUNBUFFERED), ``signal.<sig>`` sent to itself as the second case
    is made. The device is faked (CPU tensors, constant timings): what is checked is the stop,
    not the numbers."""
    import textwrap

    from conftest import child_env

    code = textwrap.dedent(f"""
        import os, signal, sys, torch
        from benchmarks import profile_kernels as pk
        real_randn, real_empty = torch.randn, torch.empty
        torch.randn = lambda *a, device=None, **k: real_randn(*a, **k)
        torch.empty = lambda *a, device=None, **k: real_empty(*a, **k)
        torch.cuda.synchronize = lambda *a: None
        pk.median_ms = lambda fn, *a, **k: 1.0
        real_call, made = pk.make_call, []
        def make_call(*args):
            made.append(1)
            if len(made) == 2:
                os.kill(os.getpid(), signal.{sig})
            return real_call(*args)
        pk.make_call = make_call
        sys.exit(pk.main(["--backend", "cpu", "--numel", "64", "--cases", "sgd-fp32-rademacher,adam-fp32-gaussian"]))
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=300)


def test_profile_kernels_stopped_by_sigterm_keeps_its_rows():
    """Killed by a SIGTERM (a plain ``timeout``, a lease's limit) with its stdout in a pipe, the
    profile lost every row it had measured (block-buffered, never flushed). Each row is flushed
    now and a SIGTERM is taken as a SIGINT is: exit 143 with the line that says so."""
    p = _profile_kernels_sent("SIGTERM")
    assert p.returncode == 143, (p.returncode, p.stdout, p.stderr[-2000:])
    assert "sgd-fp32-rademacher" in p.stdout and "adam-fp32-gaussian" not in p.stdout
    assert "profile_kernels: stopped (SIGTERM)" in p.stderr


def test_profile_kernels_killed_outright_keeps_the_rows_it_printed():
    """A SIGKILL (gpu_check.sh's KILL_AFTER_S after the SIGINT) runs no cleanup: the rows
    already measured reach the pipe only because each is flushed as it is printed."""
    p = _profile_kernels_sent("SIGKILL")
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stdout, p.stderr[-2000:])
    assert "sgd-fp32-rademacher" in p.stdout and "adam-fp32-gaussian" not in p.stdout, p.stdout
