"""The performance report generator (benchmarks/report.py) on the saved pytest-benchmark JSON
fixture, and the benchmark suites in their fast (smoke) mode so that they cannot rot."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
from conftest import child_env

from benchmarks import report as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "benchmarks", "fixtures", "bench_fast_cpu.json")
# Every pytest-benchmark suite of benchmarks/ (issue 5's three and issue 6's distributed one).
SUITES = [f"benchmarks/test_bench_{s}.py" for s in ("kernels", "optim_step", "end_to_end", "distributed")]


def _fixture():
    with open(FIXTURE) as f:
        return json.load(f)


def _write(tmp_path, data, name="b.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def test_fixture_has_every_suite():
    suites = {b["extra_info"]["suite"] for b in _fixture()["benchmarks"]}
    assert suites == {"kernels", "optim", "e2e"}


def test_ratios_are_computed_from_the_same_run():
    records, _ = R.load([FIXTURE])
    idx = R.derive(records)
    k = [r for r in records if r["x"]["suite"] == "kernels" and r["x"]["kind"] == "zeroflow"
         and r["x"]["variant"] == "plain" and r["x"]["backend"] == "cpu"]
    assert k, "the fixture has compiled-CPU kernel records"
    for r in k:
        x = r["x"]
        copy_r, mezo_r = idx[x["copy_ref"]], idx[x["mezo_ref"]]
        assert r["gbs"] == pytest.approx(x["bytes"] / r["t"] / 1e9)
        assert r["elem_s"] == pytest.approx(x["elements"] / r["t"])
        assert r["copy_frac"] == pytest.approx(r["gbs"] / (copy_r["x"]["bytes"] / copy_r["t"] / 1e9))
        assert r["vs_mezo"] == pytest.approx(mezo_r["t"] / r["t"])
    opt = [r for r in records if r["x"]["suite"] == "optim" and r["x"]["impl"] == "zeroflow"]
    assert opt and all(r["vs_mezo"] is not None and r["vs_fo"] is not None for r in opt)


def test_report_markdown_and_plots(tmp_path):
    out = tmp_path / "docs" / "performance.md"
    plots = tmp_path / "docs" / "perf"
    text = R.render([FIXTURE], str(out), str(plots))
    assert out.read_text() == text
    for heading in ("## Machine and versions", "## Targets", "### Kernels on cpu", "### Optimizer step on cpu",
                    "### One training iteration on cpu", "FAST MODE"):
        assert heading in text, heading
    assert "torch" in text and "2 logical cores" in text or "logical cores" in text
    assert "Rademacher perturb ≥ 1.3 G elem/s" in text
    assert "vs MeZO-style" in text and "of copy BW" in text
    pytest.importorskip("matplotlib")
    pngs = sorted(os.listdir(plots))
    assert {"kernels_cpu.png", "optim_cpu.png", "e2e_cpu.png"} <= set(pngs)
    for p in pngs:
        assert (plots / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](perf/{p})" in text  # linked relative to the markdown file


def test_a_report_cut_while_plotting_has_written_its_page(tmp_path, monkeypatch):
    """gpu_check.sh runs the report under REPORT_LIMIT_S; the plots come first and take the most
    time (matplotlib's first import on a fresh machine builds its font cache), so a report cut
    there (timeout's SIGTERM: here the KeyboardInterrupt of a SIGINT stands for it) left no page
    at all. Guards: the page without its plots is on disk before plotting starts."""
    out = tmp_path / "performance.md"

    def cut(*args):
        assert "### Kernels on cpu" in out.read_text()      # the page is written already
        raise KeyboardInterrupt
    monkeypatch.setattr(R, "make_plots", cut)
    with pytest.raises(KeyboardInterrupt):
        R.render([FIXTURE], str(out), str(tmp_path / "perf"))
    assert "## Targets" in out.read_text() and "](perf/" not in out.read_text()


def test_target_status_says_by_how_much():
    assert R._status(1.0, 1.3) == "**missed** by 23 %"
    assert R._status(1.4, 1.3) == "**met**"
    assert R._status(2.0, 1.0, higher=False) == "**missed** by 100 %"
    assert R._status(None, 1.0) == "not measured"


def test_gpu_records_get_the_gpu_targets(tmp_path):
    data = copy.deepcopy(_fixture())
    for b in data["benchmarks"]:
        x = b["extra_info"]
        x["device"] = "cuda"
        x["key"] = x["key"].replace("|cpu|", "|cuda|")
        for k in ("copy_ref", "mezo_ref", "fo_ref"):
            if k in x:
                x[k] = x[k].replace("|cpu|", "|cuda|")
    text = R.render([_write(tmp_path, data)], None)
    assert "of copy bandwidth" in text
    assert "≥ 3× MeZO-style" in text
    assert "ZO step extra memory ≤ 1 MiB" in text


def test_gpu_targets_without_a_copy_baseline_say_not_measured(tmp_path):
    """A kernel phase cut before its copy_ rows used to drop every "% of copy" and step roofline
    target without a word; each now reads "not measured", naming the missing baseline."""
    data = copy.deepcopy(_fixture())
    for b in data["benchmarks"]:
        x = b["extra_info"]
        x["device"] = "cuda"
        for k in ("key", "copy_ref", "mezo_ref", "fo_ref"):
            if k in x:
                x[k] = x[k].replace("|cpu|", "|cuda|")
        if x.get("param_set") == "tiny":
            x["param_set"] = "vit_b_86m"          # the step roofline's parameter set
    data["benchmarks"] = [b for b in data["benchmarks"] if b["extra_info"].get("kind") != "copy"]
    records, _ = R.load([_write(tmp_path, data)])
    R.derive(records)
    rows = [r for r in R.targets(records) if "copy bandwidth" in r[1]]
    assert rows and all(r[2:4] == ("—", "not measured") for r in rows), rows
    assert any("no copy_ baseline of this dtype and size" in r[4] for r in rows)
    assert any(r[1].startswith("zo_sgd step") and "no fp32 copy_ baseline" in r[4] for r in rows), rows


def test_host_work_table_divides_by_the_foreach_of_the_same_run(tmp_path):
    """test_bench_optim_step.py's test_host_* records: each step over its host_ref baseline."""
    data = copy.deepcopy(_fixture())

    def rec(what, t, **x):
        key = f"optim_host|{what}|cpu|vit_b_86m_layout_tiny"
        return {"name": what, "group": "host", "stats": {"median": t, "min": t, "rounds": 5, "stddev": 0.0},
                "extra_info": {"suite": "optim_host", "key": key, "device": "cpu", "n_tensors": 152,
                               "param_set": "vit_b_86m_layout_tiny", **x}}

    ref = "optim_host|foreach_add_|cpu|vit_b_86m_layout_tiny"
    data["benchmarks"] += [
        rec("foreach_add_", 200e-6, kind="foreach", impl="foreach_add_"),
        rec("zo_sgd|rademacher", 500e-6, kind="zeroflow", impl="zeroflow", opt="zo_sgd", dist="rademacher",
            backend="cpu", host_ref=ref),
        rec("zo_adam|gaussian", 900e-6, kind="zeroflow", impl="zeroflow", opt="zo_adam", dist="gaussian",
            backend="cpu", host_ref=ref)]
    text = R.render([_write(tmp_path, data)], None)
    assert "152 tensors of 1-4 elements" in text
    assert "| zo_sgd | rademacher | cpu | 0.5 ms | 0.2 ms | 2.50× |" in text
    assert "| zo_adam | gaussian | cpu | 0.9 ms | 0.2 ms | 4.50× |" in text


def test_sweep_section_and_plot(tmp_path):
    sweep = {"results": [{"optimizer": o, "q": q, "avg": 50 + q / 2 + (o == "zo_adam")}
                         for o in ("zo_sgd", "zo_adam") for q in (1, 2, 4, 8, 16, 32)]}
    sp = _write(tmp_path, sweep, "sweep.json")
    text = R.render([FIXTURE], str(tmp_path / "p.md"), str(tmp_path / "perf"), sweep_path=sp)
    assert "## Query sweep" in text and "| zo_sgd | 50.50 |" in text and "q=32" in text
    pytest.importorskip("matplotlib")
    assert (tmp_path / "perf" / "query_sweep.png").exists()


def test_cli(tmp_path):
    out = tmp_path / "perf.md"
    p = subprocess.run([sys.executable, "-m", "benchmarks.report", FIXTURE, "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert out.exists() and "## Targets" in out.read_text()


@pytest.mark.slow
def test_suites_fast_mode(tmp_path):
    """Every benchmark suite in BENCH_FAST mode (tiny sizes, one round), then the report."""
    js = tmp_path / "fast.json"
    env = child_env(BENCH_FAST="1", BENCH_DEVICE="cpu", BENCH_BACK_TO_BACK="2")   # the GPU's kernel rounds
    p = subprocess.run([sys.executable, "-m", "pytest", *SUITES, "-q", "-rs", "-p", "no:cacheprovider",
                        f"--benchmark-json={js}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = "\n".join((p.stdout + p.stderr).splitlines()[-30:])
    assert p.returncode == 0, tail
    data = json.loads(js.read_text())
    suites = {b["extra_info"]["suite"] for b in data["benchmarks"]}
    assert {"kernels", "optim", "e2e", "distributed"} <= suites, tail
    kern = [b for b in data["benchmarks"] if b["extra_info"]["suite"] == "kernels"]
    assert kern and all(b["extra_info"]["calls_per_round"] == 2 for b in kern)
    records, _ = R.load([str(js)])           # times per call: a round's median over its 2 calls
    by_key = {r["x"]["key"]: r["t"] for r in records}
    assert all(by_key[b["extra_info"]["key"]] == b["stats"]["median"] / 2 for b in kern)
    text = R.render([str(js)], str(tmp_path / "perf.md"))
    assert "### Kernels on cpu" in text and "each timed round ran 2 calls back to back" in text
    assert "### Data-parallel steps" in text and "DDP + FO-SGD" in text


def test_the_kernel_suite_measures_its_baselines_first():
    """pytest runs a file's tests in definition order: with the 112 kernel cases first, a
    kernel phase cut by its time share (gpu_check.sh) had no copy_ row for any target."""
    from benchmarks import test_bench_kernels as K
    order = [name for name in vars(K) if name.startswith("test_")]
    assert order.index("test_copy") < order.index("test_kernel")
    assert order.index("test_mezo") < order.index("test_kernel")


def test_the_kernel_suite_has_plain_rows_of_every_storage_dtype_with_their_baselines():
    """Issue 13 asks bf16 and fp16 storage the same fractions of their copy_: the suite timed fp32
    and bf16 only, so no run had an fp16 row. Each dtype has the plain rows (perturb, sgd, adam x
    both z; the other variants fp32 only), fp16 at the largest size only, and every kernel case
    its copy_ (and, plain, its MeZO recipe) of the same dtype and size."""
    from benchmarks import _common as C
    from benchmarks import kernel_cases
    from benchmarks import test_bench_kernels as K

    rows = list(kernel_cases.rows())
    plain = {(op, dist) for op in ("perturb", "sgd", "adam") for dist in ("gaussian", "rademacher")}
    for dname in ("fp32", "bf16", "fp16"):
        assert {(op, dist) for op, v, d, dist in rows if v == "plain" and d == dname} == plain, dname
    assert {d for _, v, d, _ in rows if v != "plain"} == {"fp32"}
    assert tuple(C.DTYPES) == kernel_cases.DTYPES
    gpu = [1 << 26, 1 << 28]
    assert kernel_cases.sizes("fp16", gpu) == [1 << 28] and kernel_cases.sizes("bf16", gpu) == gpu
    baselines = {tuple(p.values) for p in K._sized()}           # (n, dname) of test_copy and test_mezo
    cases = [p.values for p in K._matrix()]
    assert {(d, n) for _, _, _, d, _, n in cases if d == "fp16"} == {("fp16", C.kernel_sizes()[-1])}
    assert all((n, d) in baselines for _, _, _, d, _, n in cases)
    assert {d for _, d in baselines} == {"fp32", "bf16", "fp16"}


def test_the_baselines_run_at_exactly_their_dtypes_sizes_with_the_ids_of_two_parametrizations():
    """test_copy and test_mezo run each dtype at kernel_cases.sizes only (fp16 at the largest
    size: the kernel phase's share of the lease), not at every size, and keep the ids they had as
    two parametrizations ("64M-fp32"); sizes takes any iterable and returns a list."""
    from benchmarks import _common as C
    from benchmarks import kernel_cases
    from benchmarks import test_bench_kernels as K

    sizes = C.kernel_sizes()
    want = [(n, d) for d in C.DTYPES for n in (sizes[-1:] if d == "fp16" else sizes)]
    got = K._sized()
    assert [tuple(p.values) for p in got] == want
    assert [p.id for p in got] == [f"{C.fmt_numel(n)}-{d}" for n, d in want]
    assert kernel_cases.sizes("fp16", iter([1, 2, 3])) == [3]
    assert kernel_cases.sizes("fp32", (1, 2)) == [1, 2]


def test_an_empty_or_broken_json_is_named_and_the_rest_still_renders(tmp_path):
    # pytest-benchmark writes a 0-byte JSON when every case of a suite is skipped: json.load
    # raised and the whole report (every other suite's results) was lost
    empty = tmp_path / "gpu_llm.json"
    empty.write_text("")
    broken = tmp_path / "gpu_optim.json"
    broken.write_text("{")
    (tmp_path / "gpu_kernels.json.skips.txt").write_text(
        "FAILED benchmarks/test_bench_kernels.py::test_kernel[adam] - RuntimeError: boom\n")
    good = _write(tmp_path, _fixture(), "gpu_kernels.json")
    text = R.render([good, str(empty), str(broken)], str(tmp_path / "perf.md"))
    assert "### Kernels on cpu" in text
    assert "- gpu_llm.json: no results (empty: every case skipped or deselected)" in text
    assert "- gpu_optim.json: no results (not a benchmark JSON)" in text
    assert "- FAILED benchmarks/test_bench_kernels.py::test_kernel[adam] - RuntimeError: boom" in text


def test_a_q_without_its_mezo_baseline_is_named_in_the_step_target(tmp_path):
    # the worst q was taken over the q values that had a MeZO run only: a target read "met
    # (q=1)" where q=2 was measured for zeroflow and its MeZO baseline was skipped
    data = _fixture()
    data["benchmarks"] = [b for b in data["benchmarks"]
                          if b["extra_info"].get("key") != "optim|mezo|sgd|cpu|tiny|gaussian|2"]
    records, _ = R.load([_write(tmp_path, data)])
    R.derive(records)
    rows = [r for r in R.targets(records) if "zo_sgd step" in r[1] and "(gaussian, tiny)" in r[1]]
    assert len(rows) == 1 and rows[0][4].endswith(", q=2: no MeZO baseline"), rows
    assert rows[0][4].startswith("q=1: ")


def test_every_gpu_kernel_case_has_a_target_row_measured_or_not(tmp_path):
    # a kernel phase cut before its Adam cases dropped their target rows (56 -> 36) instead of
    # showing them as not measured
    from benchmarks import kernel_cases

    data = _fixture()
    for b in data["benchmarks"]:          # the CPU fixture's compiled-CPU records, relabelled as a GPU run
        x = b["extra_info"]
        for k in ("key", "copy_ref", "mezo_ref"):
            if isinstance(x.get(k), str):
                x[k] = x[k].replace("|cpu|", "|cuda|")
        if x.get("backend") == "cpu":
            x["backend"] = "cuda"
        if x.get("device") == "cpu":
            x["device"] = "cuda"
    data["benchmarks"] = [b for b in data["benchmarks"] if b["extra_info"].get("op") != "adam"
                          or b["extra_info"].get("kind") != "zeroflow"]
    records, _ = R.load([_write(tmp_path, data)])
    R.derive(records)
    rows = [r for r in R.targets(records) if "of copy bandwidth" in r[1] and "(cuda," in r[1]]
    assert len(rows) == len(list(kernel_cases.rows())), [r[1] for r in rows]
    adam = [r for r in rows if r[1].startswith("adam ")]
    assert adam and all(r[3] == "not measured" and "no record in this run" in r[4] for r in adam)
    assert any(r[3] != "not measured" for r in rows if not r[1].startswith("adam "))     # the relabelled rest


@pytest.mark.parametrize("op,variant", [("perturb", "plain"), ("perturb", "sparse"), ("sgd", "plain"),
                                        ("sgd", "sign"), ("sgd", "sparse"), ("sgd", "history"),
                                        ("sgd", "momentum"), ("adam", "plain"), ("adam", "sign"),
                                        ("adam", "sparse"), ("adam", "history")])
def test_a_kernel_case_calls_its_op_with_its_variants_options(monkeypatch, op, variant):
    """benchmarks/test_bench_kernels.py::_kernel_call (shared by test_kernel and
    test_cpu_capability): each variant's options reach the op, on a parameter of the case's dtype."""
    import torch

    import zfkernels as zk
    from benchmarks import test_bench_kernels as K

    calls = []
    for name in ("perturb_", "zo_sgd_update_", "zo_adam_update_"):
        monkeypatch.setattr(zk, name, lambda *a, _name=name, **kw: calls.append((_name, a, kw)))
    K._kernel_call("cpu", op, variant, torch.bfloat16, "rademacher", 64)()
    (name, args, kw), = calls
    assert name == {"perturb": "perturb_", "sgd": "zo_sgd_update_", "adam": "zo_adam_update_"}[op]
    p = args[0][0]
    assert p.dtype == torch.bfloat16 and p.numel() == 64
    want = {"dist": "rademacher", "backend": "cpu"}
    if variant == "sparse":
        want.update(mask_seed=77, sparsity=0.5)
    elif variant == "sign":
        want["sign"] = True
    elif variant == "history":
        want["history_alpha"] = 0.9
    elif variant == "momentum":
        want["momentum"] = 0.9
    assert {k: v for k, v in kw.items() if k in ("dist", "backend", "mask_seed", "sparsity", "sign",
                                                 "history_alpha", "momentum")} == want
    for buf in ("history_buffers", "momentum_buffers"):
        if variant == buf.split("_")[0]:
            assert len(kw[buf]) == 1 and kw[buf][0].shape == p.shape
        else:
            assert buf not in kw


def test_the_cpu_capability_bench_runs_its_capability_and_restores_the_one_before(monkeypatch):
    """benchmarks/test_bench_kernels.py::test_cpu_capability: the case runs under its capability
    and leaves the one in force before it, whether it passed or failed."""
    from types import SimpleNamespace

    import zfkernels as zk
    from benchmarks import _common as C
    from benchmarks import test_bench_kernels as K
    from zfkernels import _compiled

    if not _compiled.cpu_available():
        pytest.skip("the compiled CPU extension is missing")
    monkeypatch.setattr(C, "kernel_sizes", lambda: [4096])
    before = zk.cpu_capability()
    seen = []

    def run_bench(fn, extra, **kw):
        seen.append((zk.cpu_capability(), extra["capability"], extra["kind"]))
        if len(seen) == 2:
            raise RuntimeError("the case failed")
    K.test_cpu_capability(run_bench, SimpleNamespace(), "default", "sgd", "fp32", "gaussian")
    assert seen == [("default", "default", "capability")] and zk.cpu_capability() == before
    with pytest.raises(RuntimeError, match="the case failed"):
        K.test_cpu_capability(run_bench, SimpleNamespace(), "default", "sgd", "fp32", "gaussian")
    assert zk.cpu_capability() == before
