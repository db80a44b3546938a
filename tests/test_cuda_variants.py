"""benchmarks/cuda_variants.py: prebuilt variants of the kernels, timed against zfkernels/' build,
bits first. Its GPU use needs a device; the flow (a package copy per variant, one child process
each, the bits compared, the baseline twice, refusals before any run) runs here with the CPU
backend (``--device cpu``) on copies of this machine's build."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, child_env

from benchmarks import cuda_variants as cv
from zfkernels import _compiled

pytestmark = pytest.mark.skipif(not _compiled.cpu_available(), reason="the compiled CPU extension is missing")
CASES = "sgd-bf16-rademacher,adam-bf16-rademacher"


def _variant(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    for f in glob.glob(os.path.join(ROOT, "zfkernels", "_C*" + cv.EXT)):
        shutil.copy2(f, folder)
    return str(folder)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.cuda_variants", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=600)


def test_each_variant_runs_its_own_copy_of_the_package_and_matches_the_baseline(tmp_path):
    a, b = _variant(tmp_path, "a"), _variant(tmp_path, "b")
    out = tmp_path / "rows.json"
    run = _run("--variants", f"{a},{b}", "--device", "cpu", "--numel", "4096", "--cases", CASES, "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert list(res) == ["baseline", "a", "b", "baseline again"]
    for label, rows in res.items():
        assert list(rows) == CASES.split(",")
        where = {os.path.realpath(r["zfkernels"]) for r in rows.values()}
        if label.startswith("baseline"):
            assert where == {os.path.realpath(os.path.join(ROOT, "zfkernels"))}
        else:       # a temporary copy holding the variant's files, not the checkout's package
            assert len(where) == 1 and "zf_variant_" in where.pop()
        for case, r in rows.items():
            assert r["bits"] == res["baseline"][case]["bits"] and r["ms"] > 0 and r["of_copy"] > 0
    table = [ln for ln in run.stdout.splitlines() if ln.startswith(tuple(CASES.split(",")))]
    assert len(table) == 2 and all(ln.count("%") == 4 for ln in table) and "BITS DIFFER" not in run.stdout


def test_bits_that_differ_fail_the_run_and_are_named(monkeypatch, tmp_path, capsys):
    a = _variant(tmp_path, "a")

    def run_one(label, files, cases, numel, device, timeout):
        return {c: {"case": c, "bits": "x" if label == "a" and c == cases[1] else "y", "ms": 1.0, "copy_ms": 1.0,
                    "of_copy": 1.0, "zfkernels": ""} for c in cases}

    monkeypatch.setattr(cv, "run_one", run_one)
    assert cv.main(["--variants", a, "--device", "cpu", "--cases", CASES]) == 1
    out, err = capsys.readouterr()
    assert "bits differ from the baseline's for a: adam-bf16-rademacher" in err
    flagged = [ln.split() for ln in out.splitlines() if "BITS DIFFER" in ln]
    assert flagged[0][:2] == ["a", "adam-bf16-rademacher"]              # the row printed as "a" finished
    assert flagged[-1][0] == "adam-bf16-rademacher" and len(flagged) == 2    # and the final table's
    assert cv.verdicts({"baseline": {"c": {"bits": "1"}}, "v": {"c": {"bits": "1"}}}) == []


def test_a_variant_whose_run_fails_is_named_and_the_others_still_run(tmp_path):
    """A build whose child fails (here a _C that does not load, so the op is missing; on a device:
    a crash, a misaligned address, its time limit) used to end the whole run with a traceback:
    the builds after it were never timed."""
    a, bad, b = _variant(tmp_path, "a"), _variant(tmp_path, "bad"), _variant(tmp_path, "b")
    (tmp_path / "bad" / ("_C" + cv.EXT)).write_bytes(b"not a shared object")
    out = tmp_path / "rows.json"
    run = _run("--variants", f"{a},{bad},{b}", "--device", "cpu", "--numel", "4096", "--cases", CASES,
               "--json", str(out))
    assert run.returncode == 1, run.stdout + run.stderr[-3000:]
    got = json.loads(out.read_text())
    assert list(got["results"]) == ["baseline", "a", "b", "baseline again"] and list(got["failed"]) == ["bad"]
    assert "bad                    FAILED: bad: the child run failed" in run.stdout
    assert "the run of bad failed" in run.stderr and "bits differ" not in run.stderr


def test_a_baseline_that_fails_ends_the_run_saying_so(monkeypatch, tmp_path, capsys):
    def run_one(label, *args):
        raise RuntimeError(f"{label}: the child run failed (exit 1)")

    monkeypatch.setattr(cv, "run_one", run_one)
    assert cv.main(["--variants", _variant(tmp_path, "a"), "--device", "cpu", "--cases", CASES]) == 1
    assert "the baseline's run failed, nothing to compare with" in capsys.readouterr().err


def test_a_run_stopped_midway_keeps_the_builds_it_timed(monkeypatch, tmp_path, capsys):
    """Stopped during the second build (a lease's limit: gpu_check.sh's SIGINT, or a SIGTERM taken
    as one), the baseline's rows are printed and in the JSON, and the exit says it was stopped."""
    a, out = _variant(tmp_path, "a"), tmp_path / "rows.json"
    calls = []

    def run_one(label, files, cases, numel, device, timeout):
        calls.append(label)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {c: {"case": c, "bits": "b", "ms": 2.0, "copy_ms": 1.0, "of_copy": 0.5, "zfkernels": ""} for c in cases}

    monkeypatch.setattr(cv, "run_one", run_one)
    assert cv.main(["--variants", a, "--device", "cpu", "--cases", CASES, "--json", str(out)]) == 130
    printed, err = capsys.readouterr()
    assert list(json.loads(out.read_text())["results"]) == ["baseline"]
    assert [ln.split()[:3] for ln in printed.splitlines()[1:]] == [["baseline", c, "50.0"] for c in CASES.split(",")]
    assert "stopped (SIGINT) after 1 of 3 runs" in err


@pytest.mark.parametrize("problem", ["missing", "empty", "duplicate", "baseline", "case", "none"])
def test_bad_arguments_are_refused_before_any_run(problem, monkeypatch, tmp_path, capsys):
    ran = []
    monkeypatch.setattr(cv, "run_one", lambda *a, **k: ran.append(a))
    good = _variant(tmp_path, "good")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "_C.cpython-39-x86_64-linux-gnu.so").write_bytes(b"")
    other = tmp_path / "other"
    other.mkdir()
    dup = _variant(other, "good")
    base = _variant(tmp_path, "baseline")
    args = {"missing": ["--variants", f"{good},{tmp_path / 'nope'}"], "empty": ["--variants", f"{good},{empty}"],
            "duplicate": ["--variants", f"{good},{dup}"], "baseline": ["--variants", base],
            "case": ["--variants", good, "--cases", "sgd-bf17-rademacher"], "none": ["--variants", " , "]}[problem]
    with pytest.raises((SystemExit, FileNotFoundError)) as e:
        cv.main([*args, "--device", "cpu"])
    said = str(e.value) + capsys.readouterr().err
    assert ran == []
    expected = {"missing": "is no folder", "empty": "holds no _C", "duplicate": "its own name",
                "baseline": "other than 'baseline'", "case": "sgd-bf17-rademacher", "none": "at least one folder"}
    assert expected[problem] in said
    if problem == "empty":
        assert "_C.cpython-39-x86_64-linux-gnu.so" in said      # what the folder holds instead
