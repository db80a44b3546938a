"""benchmarks/step_timeline.py: the interval arithmetic and the attribution on a hand-made trace
with a known answer, and the whole script on the CPU (the GPU lease runs it for issue 13 item 2:
a script that only ever runs there must not rot here)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import step_timeline as st


def test_interval_arithmetic():
    assert st.union([(5, 7), (0, 2), (1, 3), (3, 4), (8, 8)]) == [(0, 4), (5, 7)]
    assert st.intersect([(0, 4), (5, 7)], [(3, 6)]) == [(3, 4), (5, 6)]
    assert st.subtract([(0, 10)], [(2, 3), (5, 12)]) == [(0, 2), (3, 5)]
    assert st.subtract([(0, 10)], []) == [(0, 10)]
    assert st.length([(0, 2), (3, 5.5)]) == 4.5


@pytest.mark.parametrize("name,short", [
    ("void zf_cuda::multi_tensor_kernel<zf_cuda::SgdFunctor<float, (zf::Dist)1>, 4>(zf_cuda::Common, int)",
     "multi_tensor_kernel<SgdFunctor>"),
    ("_perturb_kernel", "_perturb_kernel"),
    ("void at::native::elementwise_kernel(int)", "elementwise_kernel"),
])
def test_short_kernel_name(name, short):
    assert st.short_kernel_name(name) == short


def _ev(name, cat, ts, dur, **args):
    e = {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "tid": 1}
    if args:
        e["args"] = args
    return e


def test_analyse_attributes_each_idle_stretch_once():
    # step 0 = [0, 100), step 1 = [100, 200); END after the sync at 200
    events = [
        _ev(st.STEP_MARK, "user_annotation", 0, 60), _ev(st.STEP_MARK, "user_annotation", 100, 60),
        _ev(st.END_MARK, "user_annotation", 200, 0),
        _ev("Optimizer.step#ZOFusedSGD.step", "user_annotation", 1, 55),     # python, not a category
        _ev("zfkernels::perturb_", "cpu_op", 2, 7),
        _ev("cudaLaunchKernel", "cuda_runtime", 5, 3, correlation=1),
        _ev("void zf_cuda::multi_tensor_kernel<zf_cuda::PerturbFunctor<float>>(int)", "kernel", 10, 30, correlation=1),
        _ev("aten::_local_scalar_dense", "cpu_op", 38, 7),                  # the loss read: 40..45 is idle
        _ev("aten::mul", "cpu_op", 112, 7),
        _ev("cudaLaunchKernel", "cuda_runtime", 115, 3, correlation=2),
        _ev("elementwise_kernel", "kernel", 120, 30, correlation=2),
        _ev("_sgd_kernel", "kernel", 190, 20, correlation=3),              # no runtime event; clipped at 200
        _ev(st.STEP_MARK, "gpu_user_annotation", 10, 140),                  # a span on the device: not activity
    ]
    out = st.analyse(events)
    s0, s1 = out["steps"]
    assert s0["period_us"] == 100 and s0["busy_us"] == 30 and s0["idle_us"] == 70
    assert s0["idle_by_us"] == {"loss read": 5, "runtime": 3, "zf op": 4, "torch ops": 0, "python": 58}
    assert s0["busy_by"] == {"zfkernels::perturb_": {"us": 30, "launches": 1}}
    assert s1["period_us"] == 100 and s1["busy_us"] == 40 and s1["idle_us"] == 60
    assert s1["idle_by_us"] == {"loss read": 0, "runtime": 3, "zf op": 0, "torch ops": 4, "python": 53}
    assert s1["busy_by"] == {"aten::mul": {"us": 30, "launches": 1}, "_sgd_kernel": {"us": 10, "launches": 1}}
    assert out["median"]["idle_by_us"]["python"] == 55.5
    assert out["median"]["busy_by"]["_sgd_kernel"] == {"us": 5, "launches": 0.5}


def test_analyse_times_the_host_from_each_loss_read_to_the_next_zfkernels_op():
    # step 0 = [0, 100): reads end at 20 and 55, ops start at 31 and 90 (an aten op between does not
    # count); step 1 = [100, 200): a read that no op follows in its step
    events = [
        _ev(st.STEP_MARK, "user_annotation", 0, 5), _ev(st.STEP_MARK, "user_annotation", 100, 5),
        _ev(st.END_MARK, "user_annotation", 200, 0),
        _ev("aten::item", "cpu_op", 10, 10), _ev("aten::_local_scalar_dense", "cpu_op", 12, 7),
        _ev("aten::add", "cpu_op", 25, 2),
        _ev("zfkernels::perturb_", "cpu_op", 31, 4),
        _ev("aten::item", "cpu_op", 50, 5),
        _ev("zfkernels::zo_sgd_update_", "cpu_op", 90, 4),
        _ev("zfkernels::perturb_", "cpu_op", 102, 4),
        _ev("aten::item", "cpu_op", 150, 5),
        _ev("zfkernels::perturb_", "cpu_op", 210, 4),
    ]
    out = st.analyse(events)
    assert [s["read_to_op_us"] for s in out["steps"]] == [[11, 35], []]
    assert out["median"]["read_to_op_us"] == [11, 35]
    case = {"case": "c", "unprofiled_step_us": 1, "roofline_us": 1, "ratio": 1, "median": out["median"]}
    assert "loss read's return to the next zfkernels op: 11.0, 35.0 us\n" in st.render_case(case)
    case["read_to_op_unprofiled_us"] = [6.5, 9]
    assert "op: 11.0, 35.0 us (unprofiled 6.5, 9.0 us)\n" in st.render_case(case)


def test_read_to_op_counts_the_reads_that_start_in_the_step_up_to_the_next_op_in_it():
    # the ends of [a, b) and of the search, found by mutation: a read starting at a counts, one
    # starting at b is the next step's; an op starting where the read ends is 0 us after it; an op
    # starting at b is the next step's; no op after the read at all is no entry (not an IndexError)
    assert st.read_to_op([(0, 5)], [5, 9], 0, 100) == [0]
    assert st.read_to_op([(100, 105)], [120], 0, 100) == []
    assert st.read_to_op([(50, 60)], [100], 0, 100) == []
    assert st.read_to_op([(50, 60)], [10], 0, 100) == []


def test_analyse_read_to_op_of_an_unordered_trace_is_the_median_over_steps_of_host_ops_only():
    # a trace's events come in any order; only host (cpu_op) zfkernels:: ops end the stretch, not an
    # annotation of that name; the median of three steps' 11, 30 and 15 is 15
    events = [
        _ev(st.STEP_MARK, "user_annotation", 0, 5), _ev(st.STEP_MARK, "user_annotation", 100, 5),
        _ev(st.STEP_MARK, "user_annotation", 200, 5), _ev(st.END_MARK, "user_annotation", 300, 0),
        _ev("aten::item", "cpu_op", 10, 10), _ev("zfkernels::perturb_", "user_annotation", 25, 1),
        _ev("zfkernels::perturb_", "cpu_op", 31, 4),
        _ev("aten::item", "cpu_op", 110, 10), _ev("zfkernels::zo_sgd_update_", "cpu_op", 150, 4),
        _ev("aten::item", "cpu_op", 210, 10), _ev("zfkernels::perturb_", "cpu_op", 235, 4),
    ][::-1]
    out = st.analyse(events)
    assert [s["read_to_op_us"] for s in out["steps"]] == [[11], [30], [15]]
    assert out["median"]["read_to_op_us"] == [15]


def test_render_case_prints_no_read_line_without_reads_and_no_unprofiled_part_without_its_values():
    # triton and torch have no compiled op to time unprofiled: [] there, and a trace whose reads no
    # op follows has [] too; neither is an empty "... op:  us" or "(unprofiled  us)"
    med = {"period_us": 1, "busy_us": 0, "idle_us": 1, "idle_by_us": {c: 0 for c in st.CATEGORIES}, "busy_by": {}}
    case = {"case": "c", "unprofiled_step_us": 1, "roofline_us": 1, "ratio": 1,
            "median": dict(med, read_to_op_us=[]), "read_to_op_unprofiled_us": [1.0]}
    assert "loss read" not in st.render_case(case).split("\n", 1)[1]
    case.update(median=dict(med, read_to_op_us=[2.0]), read_to_op_unprofiled_us=[])
    text = st.render_case(case)
    assert "next zfkernels op: 2.0 us\n" in text and "unprofiled" not in text


def test_read_to_op_unprofiled_takes_each_read_followed_by_an_op_and_the_median_per_read(monkeypatch):
    """On a clock of its own (ns): per step, a read then an op after a us (the first read's
    entry), a read followed by another read (none), a read then an op after b us (the second),
    and a last read that nothing follows (none); step 2 has no second entry. Per entry, the
    median over the steps that have it: median(5, 7, 30) = 7 and median(2, 4) = 3."""
    import torch
    ns, now = torch.ops.zfkernels, [0]
    for op in ("perturb_", "zo_sgd_update_", "zo_adam_update_"):
        monkeypatch.setattr(ns, op, lambda *args: None)
    fakes = {op: getattr(ns, op) for op in ("perturb_", "zo_sgd_update_", "zo_adam_update_")}
    monkeypatch.setattr(st, "time", type("Clock", (), {"perf_counter_ns": staticmethod(lambda: now[0])}))

    class Opt:
        zeroth_order = True
        step_no = 0

        def step(self, closure):
            a, b = [(5, 2), (7, 4), (30, None)][self.step_no]
            self.step_no += 1
            torch.ops.zfkernels.perturb_()
            loss = closure().item()
            now[0] += a * 1000
            torch.ops.zfkernels.perturb_()
            if b is not None:
                closure().item()
                closure().item()
                now[0] += b * 1000
                torch.ops.zfkernels.zo_sgd_update_()
            closure().item()
            return loss

    assert st.read_to_op_unprofiled(Opt(), lambda: torch.tensor(1.5), 3) == [7.0, 3.0]
    assert all(getattr(ns, op) is fn for op, fn in fakes.items()) and st._ReadNoted.notes is None


def test_analyse_refuses_a_trace_without_marks():
    with pytest.raises(ValueError, match="zf_timeline_step"):
        st.analyse([_ev("aten::mul", "cpu_op", 0, 1)])


def test_runs_on_the_cpu(tmp_path, capsys):
    import torch
    packets = {op: getattr(torch.ops.zfkernels, op) for op in ("perturb_", "zo_sgd_update_", "zo_adam_update_")}
    out = tmp_path / "timeline.json"
    assert st.main(["--device", "cpu", "--layout", "vit_b_tiny", "--steps", "3", "--backend", "cpu",
                    "--cases", "zo_sgd-rademacher,zo_adam-gaussian", "--json", str(out),
                    "--trace-dir", str(tmp_path / "traces")]) == 0    # gpu_check.sh's arguments
    report = json.loads(out.read_text())
    assert [json.loads(Path(r["trace"]).read_text())["traceEvents"] != [] for r in report["cases"]] == [True, True]
    assert report["header"]["n_tensors"] == 152 and report["header"]["backend"] == "cpu"
    assert [r["case"] for r in report["cases"]] == ["zo_sgd-rademacher", "zo_adam-gaussian"]
    for r in report["cases"]:
        # q = 1: L+ and L-, each followed by an op; without the profiler, for 20 steps
        assert len(r["read_to_op_unprofiled_us"]) == 2 and min(r["read_to_op_unprofiled_us"]) > 0
        assert len(r["steps"]) == 3
        for s in r["steps"]:
            # no asynchronous device: the whole period is the host's, and each category was seen
            assert s["busy_us"] == 0 and s["busy_by"] == {}
            assert sum(s["idle_by_us"].values()) == pytest.approx(s["period_us"])
            assert s["idle_by_us"]["zf op"] > 0, "the zfkernels:: op calls were not found in the trace"
            assert s["idle_by_us"]["loss read"] > 0, "the closure's loss reads were not found in the trace"
            assert len(s["read_to_op_us"]) == 2 and min(s["read_to_op_us"]) > 0   # q = 1: L+ and L-
    text = capsys.readouterr().out
    assert "zo_adam-gaussian" in text and "no device activity recorded" in text and "(unprofiled " in text
    # the ops wrapped for the unprofiled measure are the ops again
    assert all(getattr(torch.ops.zfkernels, op) is fn for op, fn in packets.items())


@pytest.mark.parametrize("argv,says", [
    (["--cases", "zo_sgd-normal"], "--cases: 'zo_sgd-normal'"),
    (["--cases", "sgd-rademacher"], "--cases: 'sgd-rademacher'"),
    (["--steps", "1"], "--steps must be at least 2"),
])
def test_bad_arguments_are_named(argv, says, capsys):
    with pytest.raises(SystemExit):
        st.main(["--device", "cpu", "--layout", "vit_b_tiny"] + argv)
    assert says in capsys.readouterr().err


def test_a_run_stopped_by_sigint_reports_the_cases_it_finished(tmp_path, capsys, monkeypatch):
    """gpu_check.sh stops a run at its limit with SIGINT: every case finished before it was lost
    (the text and the JSON were written after the last case only)."""
    real, calls = st.run_case, []

    def run_case(*args, **kw):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(st, "run_case", run_case)
    out = tmp_path / "timeline.json"
    try:
        rc = st.main(["--device", "cpu", "--layout", "vit_b_tiny", "--steps", "2", "--backend", "cpu",
                      "--cases", "zo_sgd-rademacher,zo_adam-gaussian", "--json", str(out)])
    except KeyboardInterrupt:
        pytest.fail("the SIGINT escaped: no report of the case that finished")
    assert rc == 130
    report = json.loads(out.read_text())
    assert [r["case"] for r in report["cases"]] == ["zo_sgd-rademacher"]
    assert report["header"]["stopped"] == "stopped (SIGINT) after 1 of 2 cases"
    text = capsys.readouterr().out
    assert "zo_sgd-rademacher" in text and "stopped (SIGINT) after 1 of 2 cases" in text
    # and gpu_check.sh's summary says the run was cut, next to the case it has
    from benchmarks import gpu_summary
    work = tmp_path / "work"
    (work / "bench").mkdir(parents=True)
    (work / "bench" / "step_timeline_vit_b_tiny.json").write_text(out.read_text())
    summary = gpu_summary.render(gpu_summary.summarize(str(work)))
    assert "  vit_b_tiny: stopped (SIGINT) after 1 of 2 cases" in summary
    assert "  vit_b_tiny zo_sgd-rademacher: " in summary
    # stopped before the first case finished: exit 130 with the one line, no IndexError traceback
    calls.clear()
    calls.append("already one")          # the next call is the second: interrupted
    out.unlink()
    assert st.main(["--device", "cpu", "--layout", "vit_b_tiny", "--steps", "2", "--backend", "cpu",
                    "--cases", "zo_sgd-rademacher", "--json", str(out)]) == 130
    assert "stopped (SIGINT) after 0 of 1 cases" in capsys.readouterr().err and not out.exists()


def test_a_sigint_during_the_copy_pass_loses_no_case(tmp_path, capsys, monkeypatch):
    """The copy_ pass was timed after the last case: a SIGINT then (gpu_check.sh's limit) escaped
    as a traceback and every finished case was lost. It is timed before the first case now."""
    order = []
    real_case = st.run_case

    def run_case(*args, **kw):
        order.append("case")
        return real_case(*args, **kw)

    def copy_pass_us(*args):
        order.append("copy")
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "run_case", run_case)
    monkeypatch.setattr(st, "copy_pass_us", copy_pass_us)
    out = tmp_path / "timeline.json"
    try:
        rc = st.main(["--device", "cpu", "--layout", "vit_b_tiny", "--steps", "2", "--backend", "cpu",
                      "--cases", "zo_sgd-rademacher", "--json", str(out)])
    except KeyboardInterrupt:
        pytest.fail(f"the SIGINT during the copy_ pass escaped (after: {order})")
    assert rc == 130 and order == ["copy"]
    assert "stopped (SIGINT) after 0 of 1 cases" in capsys.readouterr().err


def test_a_sigterm_before_any_case_finished_exits_143_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """Stopped by a SIGTERM before a case finished (here in the copy_ pass): nothing to report,
    and the exit status is still SIGTERM's 143, not SIGINT's 130."""
    import signal

    def copy_pass_us(*args):
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), "no SIGTERM handler while the cases run"
        handler(signal.SIGTERM, None)       # what the signal would run, without signalling pytest

    monkeypatch.setattr(st, "copy_pass_us", copy_pass_us)
    out = tmp_path / "timeline.json"
    rc = st.main(["--device", "cpu", "--layout", "vit_b_tiny", "--steps", "2", "--backend", "cpu",
                  "--cases", "zo_sgd-rademacher", "--json", str(out)])
    assert rc == 143 and not out.exists()
    assert "stopped (SIGTERM) after 0 of 1 cases" in capsys.readouterr().err

def _signalled_in_the_second_case(tmp_path, signame: str):
    """step_timeline over two cases, sent ``signame`` as its second case starts: the process's
    result and the JSON report it left."""
    import subprocess
    import sys
    import textwrap

    from conftest import ROOT, child_env

    out = tmp_path / "timeline.json"
    code = textwrap.dedent(f"""
        import os, signal, sys
        from benchmarks import step_timeline as st
        real, calls = st.run_case, []
        def run_case(*args, **kw):
            calls.append(args[0])
            if len(calls) == 2:
                os.kill(os.getpid(), signal.{signame})
            return real(*args, **kw)
        st.run_case = run_case
        rc = st.main(["--device", "cpu", "--layout", "vit_b_tiny", "--steps", "2", "--backend", "cpu",
                      "--cases", "zo_sgd-rademacher,zo_adam-gaussian", "--json", {str(out)!r}])
        # the handler of before is back: the report is written, the process ends as asked
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        sys.exit(rc)
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                       timeout=300)
    return p, json.loads(out.read_text())


def test_a_run_stopped_by_sigterm_reports_the_cases_it_finished(tmp_path):
    """A SIGTERM (a plain ``timeout``, a lease's limit) ended the process at once: no report of
    the cases it had finished. It is taken as a SIGINT is, named, and the exit status is 143."""
    p, report = _signalled_in_the_second_case(tmp_path, "SIGTERM")
    assert p.returncode == 143, (p.returncode, p.stderr[-2000:])
    assert [r["case"] for r in report["cases"]] == ["zo_sgd-rademacher"]
    assert report["header"]["stopped"] == "stopped (SIGTERM) after 1 of 2 cases"
    assert "stopped (SIGTERM) after 1 of 2 cases" in p.stdout


def test_json_into_a_folder_not_made_yet(tmp_path):
    """--json into a folder that did not exist failed with FileNotFoundError after every case had
    run; the folder is made first."""
    out = tmp_path / "new" / "dir" / "timeline.json"
    assert st.main(["--device", "cpu", "--layout", "vit_b_tiny", "--steps", "2", "--backend", "cpu",
                    "--cases", "zo_sgd-rademacher", "--json", str(out)]) == 0
    assert [r["case"] for r in json.loads(out.read_text())["cases"]] == ["zo_sgd-rademacher"]


def test_a_run_killed_outright_leaves_the_cases_it_measured(tmp_path):
    """A SIGKILL (a lease's hard limit, the OOM killer) lost every case: the text and the JSON
    were written after the last case only. Each case is written as it finishes: its lines on
    stdout (flushed), the JSON replaced whole, its header saying the run did not finish."""
    p, report = _signalled_in_the_second_case(tmp_path, "SIGKILL")
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    assert [r["case"] for r in report["cases"]] == ["zo_sgd-rademacher"]
    assert report["header"]["stopped"] == ("unfinished after 1 of 2 cases (the run was killed, or is still "
                                           "running)")
    assert report["header"]["backend"] == "cpu" and report["cases"][0]["ratio"] > 0
    assert p.stdout.startswith("step timeline: cpu, layout vit_b_tiny") and "zo_sgd-rademacher" in p.stdout
    assert "zo_adam-gaussian" not in p.stdout


def test_each_json_write_says_how_far_the_run_got_and_names_no_removed_trace(tmp_path, monkeypatch):
    """The JSON is rewritten after every case so that a SIGKILL leaves the cases measured: the
    write after case 1 of 2 says 'unfinished after 1 of 2 cases', the one after the last case
    no longer does (a kill before the final write leaves a complete report, not one calling
    itself unfinished). Without --trace-dir no case names a trace: the temporary folder it was
    in is removed when the run ends."""
    out = tmp_path / "timeline.json"
    headers = []
    real = st.write_json

    def write_json(path, report):
        headers.append(dict(report["header"]))
        assert all("trace" not in r for r in report["cases"]), report["cases"]
        real(path, report)
    monkeypatch.setattr(st, "write_json", write_json)
    assert st.main(["--device", "cpu", "--layout", "vit_b_tiny", "--steps", "2", "--backend", "cpu",
                    "--cases", "zo_sgd-rademacher,zo_adam-gaussian", "--json", str(out)]) == 0
    assert [h.get("stopped") for h in headers] == [
        "unfinished after 1 of 2 cases (the run was killed, or is still running)", None, None]
    assert all("trace" not in r for r in json.loads(out.read_text())["cases"])
