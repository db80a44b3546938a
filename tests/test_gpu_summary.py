"""benchmarks/gpu_summary.py, the one-screen summary a device lease returns: fed a work
folder as gpu_check.sh leaves it (junit XML of both test passes, phases, env, crash probe,
targets), it must count and name every outcome; a lease has no second chance to read them."""
from __future__ import annotations

import gc
import json
import warnings

from benchmarks import gpu_summary as G

JUNIT_CUDA = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
 <testcase classname="tests.test_parity" name="test_perturb[cuda]" time="0.1"/>
 <testcase classname="tests.test_parity" name="test_sgd[cuda]" time="0.1">
  <failure message="AssertionError: bits differ at 17">trace</failure></testcase>
 <testcase classname="tests.test_parity" name="test_adam[cuda]" time="0.1">
  <failure message="worker 'gw3' crashed while running 'tests/test_parity.py::test_adam[cuda]'">x</failure></testcase>
 <testcase classname="tests.test_replay" name="test_replay[cuda]" time="0.1">
  <skipped message="needs two GPUs"/></testcase>
</testsuite></testsuites>"""
JUNIT_TRITON = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
 <testcase classname="tests.test_parity" name="test_perturb[triton-cuda]" time="0.1"/>
 <testcase classname="tests.test_parity" name="test_fixture[triton-cuda]" time="0.1">
  <error message="fixture 'x' not found">e</error></testcase>
</testsuite></testsuites>"""


def _work(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tests_not_triton.xml").write_text(JUNIT_CUDA)
    (tmp_path / "tests_triton.xml").write_text(JUNIT_TRITON)
    (tmp_path / "tests_cut.xml").write_text("<testsuites><testsuite")          # cut off by the time limit
    (tmp_path / "phases.tsv").write_text("device\t3\tok\nbuild\t40\tprebuilt\ntests\t120\tfailed\n")
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "torch": "2.11.0+cu130",
                                                   "triton": "3.6.0", "numpy": "2.5.2", "commit": "abc1234"}))
    (tmp_path / "logs" / "crash_probe").mkdir(parents=True)
    (tmp_path / "logs" / "crash_probe" / "summary.txt").write_text("probe bad_inputs: ok\nnoise line\n")
    (tmp_path / "targets.json").write_text(json.dumps([
        {"status": "met", "target": "perturb >= 90 % of copy", "measured": "91 %", "detail": "256M fp32"}]))
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "step_timeline_vit_b.json").write_text(json.dumps({
        "header": {"layout": "vit_b"},
        "cases": [{"case": "zo_sgd-rademacher", "unprofiled_step_us": 805.2, "roofline_us": 499.0, "ratio": 1.614,
                   "median": {
            "period_us": 812.4, "busy_us": 560.1, "idle_us": 252.3,
            "idle_by_us": {"loss read": 5.0, "runtime": 30.2, "zf op": 60.0, "torch ops": 10.0, "python": 147.1},
            "read_to_op_us": [22.4, 40.6]}}]}))
    (tmp_path / "bench" / "step_timeline_vit_b_tiny.json").write_text("{")   # cut off by the time limit
    return tmp_path


def test_summary_counts_and_names_every_outcome(tmp_path):
    work = str(_work(tmp_path))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        s = G.summarize(work)
        gc.collect()
    assert [str(w.message) for w in said] == []     # the crash probe's file was read and never closed
    assert s["crash_probe"] == ["probe bad_inputs: ok", "noise line"]
    t = s["tests"]
    assert (t["passed"], t["skipped"]) == (2, 1)
    assert [f["name"] for f in t["failed"]] == ["tests/test_parity.py::test_sgd[cuda]"]
    assert [c["name"] for c in t["crashed"]] == ["tests/test_parity.py::test_adam[cuda]"]
    assert sorted(e["name"] for e in t["errors"]) == ["tests/test_parity.py::test_fixture[triton-cuda]",
                                                       "tests_cut.xml"]
    assert s["total_seconds"] == 163 and [p["phase"] for p in s["phases"]] == ["device", "build", "tests"]


def test_summary_text_and_cli(tmp_path):
    work = _work(tmp_path / "work")
    out_json, out_text = tmp_path / "summary.json", tmp_path / "summary.txt"
    assert G.main(["--work", str(work), "--out-json", str(out_json), "--out-text", str(out_text)]) == 0
    text = out_text.read_text()
    assert text.splitlines()[0] == ("zeroflow GPU check: NVIDIA H200 | torch 2.11.0+cu130 | triton 3.6.0 "
                                    "| numpy 2.5.2 | commit abc1234")
    assert "tests: 2 passed, 1 failed, 1 crashed, 2 errors, 1 skipped" in text
    assert "  CRASHED tests/test_parity.py::test_adam[cuda]: worker 'gw3' crashed" in text
    assert "  FAILED tests/test_parity.py::test_sgd[cuda]: AssertionError: bits differ at 17" in text
    assert "  probe bad_inputs: ok" in text and "noise line" not in text
    assert "  [met] perturb >= 90 % of copy: 91 % (256M fp32)" in text
    assert ("  vit_b zo_sgd-rademacher: 805 = 1.61x its passes at copy_ (499); profiled 812 = busy 560 + idle 252 "
            "[loss read 5, runtime 30, zf op 60, torch ops 10, python 147]; loss read -> next zfkernels op 22 / 41"
            ) in text
    assert json.loads(out_json.read_text())["tests"]["passed"] == 2


def test_a_timeline_without_read_to_op_values_has_no_read_suffix(tmp_path):
    """A timeline made before read_to_op_us was measured has no key, one whose reads no op
    followed has []: the line ends at the idle breakdown (no KeyError, no empty suffix)."""
    for reads in ("absent", []):
        work = _work(tmp_path / str(reads))
        path = work / "bench" / "step_timeline_vit_b.json"
        t = json.loads(path.read_text())
        if reads == "absent":
            del t["cases"][0]["median"]["read_to_op_us"]
        else:
            t["cases"][0]["median"]["read_to_op_us"] = reads
        path.write_text(json.dumps(t))
        text = G.render(G.summarize(str(work)))
        assert "[loss read 5, runtime 30, zf op 60, torch ops 10, python 147]\n" in text, reads
        assert "next zfkernels op" not in text, reads


def test_summary_of_an_empty_work_folder(tmp_path):
    """gpu_check.sh calls the summary also when the device probe failed first."""
    text = G.render(G.summarize(str(tmp_path)))
    assert text.startswith("zeroflow GPU check: ? | torch ? | triton ? | numpy ? | commit ?")
    assert "tests: 0 passed, 0 failed, 0 crashed, 0 errors, 0 skipped" in text
