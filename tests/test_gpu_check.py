"""benchmarks/gpu_check.sh's own flow, on the CPU: a script that otherwise only runs on a device
lease, where a bash slip costs the lease. The device probe is answered by a wrapper around
python (the only part faked); the build, probe and test phases are skipped and the step
timeline runs on its host-work layout, so the phases, the summary and what comes back in $OUT
are those of a lease."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Answers gpu_check.sh's device probe (a python script on stdin that asserts CUDA) as an H200
# would; every other call goes to this interpreter.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-" ]; then
  src=$(cat)
  if grep -q "torch sees no CUDA device" <<< "$src"; then
    echo '{{"gpu": "dry run", "torch": "t", "cuda": "c", "triton": "tr", "numpy": "n", "commit": "dry"}}'; exit 0
  fi
  exec {py} - <<< "$src"
fi
exec {py} "$@"
"""


def _gpu_check(tmp_path, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(py=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "out"
    (tmp_path / "tmp").mkdir()
    full = dict(os.environ, OUT=str(out), PYTHON=str(fake), SKIP_BUILD="1", SKIP_PROBE="1", SKIP_TESTS="1",
                GPU_CHECK_BUDGET_S="240", TMPDIR=str(tmp_path / "tmp"), **env)   # its work folder: in tmp_path
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    return proc, out


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
