"""What the performance report (benchmarks/report.py) and the GPU check's summary
(benchmarks/gpu_summary.py) tell a reader, pinned where the neighbouring tests leave it open:
the units and formats of every cell, which record a target or a ratio is taken from (largest
size, worst q, same dtype, the CUDA row of the same case, the fp32 copy_), the thresholds and
their direction, the order of devices and rows, and what a run's odd inputs (several calls per
round, a record without a device, a JSON that is not a benchmark file, no file at all) give.
Synthetic records with round numbers, so that each expected cell is worked out by hand."""
from __future__ import annotations

import copy
import json
from unittest import mock

import pytest
from test_bench_llm import _key as _llm_key
from test_bench_llm import _llm_records
from test_bench_llm import _write as _llm_write
from test_bench_report import FIXTURE, _fixture, _write

from benchmarks import gpu_summary as G
from benchmarks import report as R

MiB = 2**20


# ----------------------------------------------------------------------------- helpers
def _bench(key, t, calls_per_round=None, **x):
    """One pytest-benchmark record (median ``t`` seconds per round) with ``extra_info`` x."""
    ex = {"key": key, **x}
    if calls_per_round:
        ex["calls_per_round"] = calls_per_round
    return {"name": key, "group": "g", "extra_info": ex,
            "stats": {"median": t, "min": t, "rounds": 5, "stddev": 0.0}}


def _kern(backend, op, variant, dtype, dist, numel, t, device="cpu", kind="zeroflow", **x):
    """A kernel-suite record; bytes read + written = 2 elements of the dtype (as for perturb)."""
    esize = 4 if dtype == "fp32" else 2
    key = f"kernels|{op}|{variant}|{backend}|{device}|{dtype}|{dist}|{numel}"
    return _bench(key, t, suite="kernels", kind=kind, device=device, op=op, variant=variant, backend=backend,
                  dtype=dtype, dist=dist, numel=numel, elements=numel, bytes=2 * esize * numel,
                  copy_ref=f"kernels|copy|{device}|{dtype}|{numel}", **x)


def _copy(dtype, numel, t, device="cpu"):
    esize = 4 if dtype == "fp32" else 2
    return _bench(f"kernels|copy|{device}|{dtype}|{numel}", t, suite="kernels", kind="copy", device=device,
                  op="copy", variant="copy_", backend="torch", dtype=dtype, dist="-", numel=numel,
                  elements=numel, bytes=2 * esize * numel)


def _records(tmp_path, benchmarks, name="b.json"):
    p = _write(tmp_path, {"machine_info": {}, "benchmarks": benchmarks}, name)
    records, _ = R.load([p])
    R.derive(records)
    return records


def _rows(records, startswith):
    return [r for r in R.targets(records) if r[1].startswith(startswith)]


def _as_cuda(data, device="cuda"):
    """The CPU fixture's records relabelled as a run on ``device`` (keys and refs follow)."""
    data = copy.deepcopy(data)
    for b in data["benchmarks"]:
        x = b["extra_info"]
        x["device"] = device
        for k in ("key", "copy_ref", "mezo_ref", "fo_ref"):
            if isinstance(x.get(k), str):
                x[k] = x[k].replace("|cpu|", f"|{device}|")
    return data


def _section(text, start, end):
    i = text.index(start)
    return text[i:text.index(end, i)]


# ----------------------------------------------------------------------------- formats
def test_number_formats():
    assert (R.fnum(1000), R.fnum(123.4), R.fnum(12.34), R.fnum(1.234), R.fnum(0.012345)) == \
        ("1,000", "123", "12.3", "1.23", "0.0123")
    assert (R.fpct(0.9), R.fpct(0.854), R.fpct(None)) == ("90 %", "85 %", "—")
    assert (R.fms(0.0123), R.fms(2.5), R.fms(None)) == ("12.3 ms", "2.5 s", "—")
    assert (R.fmib(3 * MiB), R.fmib(1.5 * 2**30)) == ("3 MiB", "1.5 GiB")


def test_sizes_are_exact_binary_multiples_or_plain_counts():
    assert (R.fsize(4096), R.fsize(2**28), R.fsize(2**30)) == ("4K", "256M", "1G")
    assert (R.fsize(1536), R.fsize(1000), R.fsize(3 * 2**19), R.fsize(3 * 2**19 + 1)) == \
        ("1536", "1000", "1536K", "1.6 million")
    assert (R.fsize(86_567_656), R.fsize(999_999)) == ("86.6 million", "999999")   # the ViT-B/16 list
    # the decimal boundary is 10^6 itself, not 2^20: a million and the counts up to 2^20 are millions too
    assert (R.fsize(10**6), R.fsize(10**6 + 1), R.fsize(2**20 - 1)) == ("1.0 million",) * 3


def test_status_at_the_target_is_met_and_a_small_miss_keeps_a_decimal():
    assert R._status(1.3, 1.3) == "**met**"
    assert R._status(1.0, 1.0, higher=False) == "**met**"
    assert R._status(0.998, 1.0) == "**missed** by 0.2 %"
    assert R._status(1.003, 1.0, higher=False) == "**missed** by 0.3 %"
    assert R._status(0.8999, 0.9) == "**missed** by 0.011 %"     # was "by 0.0 %", next to a "90 %"


# ----------------------------------------------------------------------------- loading
def test_times_are_per_call_when_a_round_ran_several(tmp_path):
    recs = _records(tmp_path, [_kern("cpu", "perturb", "plain", "fp32", "rademacher", 4096, 8e-3,
                                     calls_per_round=4)])
    assert recs[0]["t"] == pytest.approx(2e-3)
    assert recs[0]["elem_s"] == pytest.approx(4096 / 2e-3)


def test_a_record_without_a_median_is_dropped(tmp_path):
    bad = _kern("cpu", "perturb", "plain", "fp32", "gaussian", 4096, 0.0)
    good = _kern("cpu", "perturb", "plain", "fp32", "rademacher", 4096, 1e-3)
    recs = _records(tmp_path, [bad, good])
    assert [r["x"]["dist"] for r in recs] == ["rademacher"]


def test_a_json_list_is_named_not_a_benchmark_json(tmp_path):
    lst = tmp_path / "list.json"
    lst.write_text("[]")
    text = R.render([FIXTURE, str(lst)], None)
    assert "### Kernels on cpu" in text
    assert "- list.json: no results (not a benchmark JSON)" in text


def test_a_record_without_a_device_is_a_cpu_record(tmp_path):
    data = _fixture()
    for b in data["benchmarks"]:
        del b["extra_info"]["device"]
    text = R.render([_write(tmp_path, data)], None)
    assert "### Kernels on cpu" in text and "| cpu | Rademacher perturb ≥ 1.3 G elem/s | 0.149 G/s |" in text


def test_devices_in_order_cpu_before_cuda(tmp_path):
    cpu = _write(tmp_path, _fixture(), "cpu.json")
    gpu = _write(tmp_path, _as_cuda(_fixture()), "gpu.json")
    records, _ = R.load([gpu, cpu])
    R.derive(records)
    devs = [r[0] for r in R.targets(records)]
    assert devs == sorted(devs) and devs[0] == "cpu" and devs[-1] == "cuda"
    text = R.render([gpu, cpu], None)
    assert text.index("### Kernels on cpu") < text.index("### Kernels on cuda")


# ----------------------------------------------------------------------------- CPU targets
def test_cpu_kernel_targets_use_the_largest_fp32_size_of_their_case(tmp_path):
    n = 2**20
    recs = _records(tmp_path, [
        _kern("cpu", "perturb", "plain", "fp32", "rademacher", 4096, 4096 / 0.5e9),       # 0.5 G/s, small size
        _kern("cpu", "perturb", "plain", "fp32", "rademacher", n, n / 1.2e9),             # 1.2 G/s: the one
        _kern("cpu", "perturb", "plain", "fp32", "gaussian", n, 1e-3, mezo_ref="mezo|fp32"),
        _kern("cpu", "perturb", "plain", "bf16", "gaussian", n, 1e-3, mezo_ref="mezo|bf16"),
        _bench("mezo|fp32", 1.8e-3, suite="kernels", kind="mezo", device="cpu"),           # 1.80x
        _bench("mezo|bf16", 5e-3, suite="kernels", kind="mezo", device="cpu"),
    ])
    rad, = _rows(recs, "Rademacher perturb")
    assert rad[2:] == ("1.20 G/s", "**missed** by 8 %", "cpu fp32 1M")
    gauss, = _rows(recs, "Gaussian perturb")
    assert gauss[2:] == ("1.80×", "**missed** by 10 %", "cpu fp32 1M")


def test_step_targets_per_device_and_their_worst_q(tmp_path):
    records, _ = R.load([FIXTURE])
    R.derive(records)
    rows = {r[1]: r for r in R.targets(records)}
    # CPU: 2.5x (Gaussian), 10x (Rademacher); the worst q of each, the q values in order
    assert rows["zo_sgd step ≥ 2.5× MeZO-style (gaussian, tiny)"][2:] == ("7.32×", "**met**",
                                                                           "q=1: 9.21×, q=2: 7.32×")
    assert rows["zo_sgd step ≥ 10× MeZO-style (rademacher, tiny)"][2:4] == ("5.68×", "**missed** by 43 %")
    gpu = _records(tmp_path, _as_cuda(_fixture())["benchmarks"])
    names = [r[1] for r in R.targets(gpu)]
    assert "zo_sgd step ≥ 3× MeZO-style (gaussian, tiny)" in names
    assert "zo_sgd step ≥ 3× MeZO-style (rademacher, tiny)" in names


def test_step_target_lists_q_in_order_whatever_the_record_order(tmp_path):
    data = _fixture()
    data["benchmarks"].reverse()
    recs = _records(tmp_path, data["benchmarks"])
    row, = [r for r in R.targets(recs) if r[1] == "zo_sgd step ≥ 2.5× MeZO-style (gaussian, tiny)"]
    assert row[4] == "q=1: 9.21×, q=2: 7.32×"


def test_memory_target_takes_the_worst_zeroflow_step(tmp_path):
    data = _fixture()
    for b in data["benchmarks"]:
        if b["extra_info"]["key"] == "optim|zeroflow|adam|cpu|tiny|gaussian|1":
            b["extra_info"]["peak_extra_bytes"] = 3 * MiB
    recs = _records(tmp_path, data["benchmarks"])
    row, = _rows(recs, "ZO step extra memory")
    assert row[2:] == ("3 MiB", "**missed** by 200 %", "worst: zo_adam gaussian q=1")


# ----------------------------------------------------------------------------- GPU targets
def test_a_cuda_device_with_an_index_gets_the_gpu_targets(tmp_path):
    recs = _records(tmp_path, _as_cuda(_fixture(), "cuda:0")["benchmarks"])
    names = [r[1] for r in R.targets(recs)]
    assert any("of copy bandwidth" in n for n in names)
    assert not any(n.startswith("Rademacher perturb") for n in names)


def _gpu_kernels():
    """CUDA and Triton rows at 4K and 1M. At 1M: perturb plain fp32 at 87 % of copy_ for both z
    (Rademacher's 90 % missed, Gaussian's 85 % met); Triton perturb plain fp32 Gaussian at 2.0 /
    2.2 ms of CUDA's (91 %), sgd plain fp32 Rademacher at 1.0 / 1.5 ms (67 %); a bf16 CUDA row of
    the same case listed first, at another time; and a larger copy_ than any kernel ran."""
    n, dev = 2**20, "cuda"
    ct = 1e-3                                               # fp32 copy_ of 1M
    return [
        _kern("cuda", "perturb", "plain", "bf16", "gaussian", n, 1e-3, device=dev),
        _copy("fp32", n, ct, device=dev), _copy("fp32", 4096, 1e-5, device=dev), _copy("fp32", 2**22, 4e-3, dev),
        _kern("cuda", "perturb", "plain", "fp32", "rademacher", n, ct / 0.87, device=dev),
        _kern("cuda", "perturb", "plain", "fp32", "gaussian", n, 2.0e-3, device=dev),
        _kern("triton", "perturb", "plain", "fp32", "gaussian", n, 2.2e-3, device=dev),
        _kern("cuda", "perturb", "plain", "fp32", "gaussian", 4096, 1e-5, device=dev),
        _kern("triton", "perturb", "plain", "fp32", "gaussian", 4096, 3e-5, device=dev),
        _kern("cuda", "sgd", "plain", "fp32", "rademacher", n, 1.0e-3, device=dev),
        _kern("triton", "sgd", "plain", "fp32", "rademacher", n, 1.5e-3, device=dev),
    ]


def test_gpu_bandwidth_targets_per_z_at_the_largest_size(tmp_path):
    recs = _records(tmp_path, _gpu_kernels())
    rows = {r[1]: r for r in R.targets(recs)}
    rad = rows["perturb plain (cuda, fp32, rademacher) ≥ 90 % of copy bandwidth"]
    assert rad[2:] == ("87 %", "**missed** by 3 %", "cuda fp32 1M")
    gauss = rows["perturb plain (cuda, fp32, gaussian) ≥ 85 % of copy bandwidth"]
    assert gauss[2:] == ("50 %", "**missed** by 41 %", "cuda fp32 1M")      # 1 ms copy_ / 2 ms


def test_gpu_gaussian_bandwidth_target_is_85_percent(tmp_path):
    n = 2**20
    recs = _records(tmp_path, [_copy("fp32", n, 1e-3, device="cuda"),
                               _kern("cuda", "perturb", "plain", "fp32", "gaussian", n, 1e-3 / 0.87, device="cuda")])
    row, = _rows(recs, "perturb plain (cuda, fp32, gaussian)")
    assert row[2:4] == ("87 %", "**met**")


def test_every_case_has_a_cuda_row_even_when_only_triton_ran(tmp_path):
    from benchmarks import kernel_cases

    n = 2**20
    recs = _records(tmp_path, [_copy("fp32", n, 1e-3, device="cuda"),
                               _kern("triton", "perturb", "plain", "fp32", "gaussian", n, 2e-3, device="cuda")])
    cuda = [r for r in R.targets(recs) if "(cuda," in r[1] and "of copy bandwidth" in r[1]]
    assert len(cuda) == len(list(kernel_cases.rows()))
    assert all(r[3] == "not measured" for r in cuda)


def test_triton_is_compared_with_the_cuda_row_of_the_same_case_at_the_largest_kernel_size(tmp_path):
    recs = _records(tmp_path, _gpu_kernels())
    rows = [r for r in R.targets(recs) if "of the CUDA backend" in r[1]]
    assert [r[1:] for r in rows if r[3] != "not measured"] == [
        ("perturb plain (triton, fp32, gaussian) ≥ 80 % of the CUDA backend", "91 %", "**met**", "triton fp32 1M"),
        ("sgd plain (triton, fp32, rademacher) ≥ 80 % of the CUDA backend", "67 %", "**missed** by 17 %",
         "triton fp32 1M")]


def test_fp16_rows_have_the_bf16_targets_against_the_fp16_copy_and_reach_the_summary(tmp_path):
    """fp16 storage, as bf16: >= 90 % (Rademacher) / 85 % (Gaussian) of the copy_ of its own
    dtype and size (here twice the bf16 copy_'s time), Triton >= 80 % of CUDA; a case without a
    record reads "not measured"; the GPU summary prints the rows from the report's targets.json."""
    n, dev = 2**28, "cuda"
    cp = 2e-3                                                     # fp16 copy_ of 256M; bf16's is 1 ms
    recs = [_copy("bf16", n, 1e-3, device=dev), _copy("fp16", n, cp, device=dev),
            _kern("cuda", "sgd", "plain", "fp16", "rademacher", n, cp / 0.95, device=dev),
            _kern("triton", "sgd", "plain", "fp16", "rademacher", n, 2 * cp / 0.95, device=dev)]
    js = _write(tmp_path, {"machine_info": {}, "benchmarks": recs}, "gpu_kernels.json")
    work = tmp_path / "work"
    work.mkdir()
    R.render([js], str(tmp_path / "perf.md"), targets_json=str(work / "targets.json"))
    rows = {r["target"]: r for r in json.loads((work / "targets.json").read_text())}
    cuda = rows["sgd plain (cuda, fp16, rademacher) ≥ 90 % of copy bandwidth"]
    assert (cuda["measured"], cuda["status"], cuda["detail"]) == ("95 %", "**met**", "cuda fp16 256M")
    tri = rows["sgd plain (triton, fp16, rademacher) ≥ 80 % of the CUDA backend"]
    assert (tri["measured"], tri["status"]) == ("50 %", "**missed** by 38 %")
    assert rows["adam plain (cuda, fp16, gaussian) ≥ 85 % of copy bandwidth"]["status"] == "not measured"
    text = G.render(G.summarize(str(work)))
    assert "  [**met**] sgd plain (cuda, fp16, rademacher) ≥ 90 % of copy bandwidth: 95 % (cuda fp16 256M)" in text


def test_every_case_has_a_triton_vs_cuda_row_when_triton_ran(tmp_path):
    """A Triton case cut off (or failed), or one whose CUDA row is missing, had no "Triton ≥ 80 %
    of CUDA" row at all: the page did not say the target went unmeasured. Guards: each case has
    its row once Triton ran, "not measured" with the reason where a timing is missing."""
    from benchmarks import kernel_cases

    n = 2**20
    recs = _records(tmp_path, [_copy("fp32", n, 1e-3, device="cuda"),
                               _kern("triton", "perturb", "plain", "fp32", "gaussian", n, 2e-3, device="cuda"),
                               _kern("cuda", "sgd", "plain", "fp32", "gaussian", n, 2e-3, device="cuda")])
    rows = {r[1]: r for r in R.targets(recs) if "of the CUDA backend" in r[1]}
    assert len(rows) == len(list(kernel_cases.rows()))
    assert rows["perturb plain (triton, fp32, gaussian) ≥ 80 % of the CUDA backend"][3:] == (
        "not measured", "triton fp32 1M; no CUDA record of this case and size")
    assert rows["sgd plain (triton, fp32, gaussian) ≥ 80 % of the CUDA backend"][3].startswith("not measured")
    assert "no Triton record" in rows["sgd plain (triton, fp32, gaussian) ≥ 80 % of the CUDA backend"][4]
    # a measured pair: CUDA's time over Triton's (Triton 1.25x slower: 80 %); a CUDA record without
    # a timing (failed) is no CUDA record; a run without Triton has no such rows at all
    recs = _records(tmp_path, [_copy("fp32", n, 1e-3, device="cuda"),
                               _kern("triton", "perturb", "plain", "fp32", "gaussian", n, 2.5e-3, device="cuda"),
                               _kern("cuda", "perturb", "plain", "fp32", "gaussian", n, 2e-3, device="cuda"),
                               _kern("triton", "sgd", "plain", "fp32", "gaussian", n, 2e-3, device="cuda"),
                               _kern("cuda", "sgd", "plain", "fp32", "gaussian", n, None, device="cuda")],
                    name="measured.json")
    rows = {r[1]: r for r in R.targets(recs) if "of the CUDA backend" in r[1]}
    assert rows["perturb plain (triton, fp32, gaussian) ≥ 80 % of the CUDA backend"][2] == "80 %"
    assert rows["sgd plain (triton, fp32, gaussian) ≥ 80 % of the CUDA backend"][3:] == (
        "not measured", "triton fp32 1M; no CUDA record of this case and size")
    recs = _records(tmp_path, [_copy("fp32", n, 1e-3, device="cuda"),
                               _kern("cuda", "sgd", "plain", "fp32", "gaussian", n, 2e-3, device="cuda")],
                    name="no_triton.json")
    assert not [r for r in R.targets(recs) if "of the CUDA backend" in r[1]]


def _roofline_records(device="cuda"):
    """A 100 GB/s fp32 copy_ (the largest fp32 one), a faster small fp32 and a bf16 copy_, and
    zo_sgd Rademacher on vit_b_86m (1e6 fp32 params) at q=2 (listed first) and q=1: 3 passes of
    8 bytes per param at 100 GB/s = 0.24 ms; the q=1 step takes 0.3 ms = 1.25x."""
    n = 2**20
    opt = dict(suite="optim", device=device, impl="zeroflow", kind="zeroflow", opt="zo_sgd", dist="rademacher",
               param_set="vit_b_86m", numel=10**6)
    return [
        _copy("fp32", n, 8 * n / 100e9, device=device), _copy("fp32", 4096, 8 * 4096 / 200e9, device=device),
        _copy("bf16", 2**22, 4 * 2**22 / 300e9, device=device),
        _bench("optim|zo_sgd|rademacher|vit|2", 9e-4, q=2, **opt),
        _bench("optim|zo_sgd|rademacher|vit|1", 3e-4, q=1, **opt),
    ]


def test_step_roofline_target(tmp_path):
    recs = _records(tmp_path, _roofline_records())
    row, = _rows(recs, "zo_sgd step ≤ 1.3× its passes at copy bandwidth (rademacher")
    assert row[1] == "zo_sgd step ≤ 1.3× its passes at copy bandwidth (rademacher, vit_b_86m, q=1)"
    assert row[2:4] == ("1.25×", "**met**")
    assert row[4] == ("0.3 ms vs 0.24 ms (3 tensor passes of 1.0 million fp32 params at the fp32 copy_ 100 GB/s)")


def test_step_roofline_target_missed_when_slower(tmp_path):
    benches = _roofline_records()
    benches[-1]["stats"]["median"] = 4.8e-4                  # 2x the roofline
    row, = _rows(_records(tmp_path, benches), "zo_sgd step ≤ 1.3× its passes at copy bandwidth (rademacher")
    assert row[2:4] == ("2.00×", "**missed** by 54 %")


# ----------------------------------------------------------------------------- LLM
def test_llm_share_exactly_its_forwards_is_unresolved(tmp_path):
    recs = _records(tmp_path, _llm_records(0.080, 0.110, 10e9))   # iteration = the 80 ms of its forwards
    rows = [r for r in R.targets(recs) if r[1].startswith("LLM ZO-SGD optimizer share")]
    assert len(rows) == 2 and all(r[3].startswith("**unresolved**") for r in rows), rows


# ----------------------------------------------------------------------------- sections
def test_kernel_tables_rows_and_order():
    text = R.render([FIXTURE], None)
    kern = _section(text, "### Kernels on cpu", "Variants:")
    rows = [ln.split(" | ") for ln in kern.splitlines() if ln.startswith("| ") and not ln.startswith("| op ")]
    n_zf = sum(b["extra_info"]["suite"] == "kernels" and b["extra_info"]["kind"] == "zeroflow"
               for b in _fixture()["benchmarks"])
    assert len(rows) == n_zf and not any(r[1] == "mezo" for r in rows)
    ops = [R._OP_ORDER[r[0][2:]] for r in rows]
    assert ops == sorted(ops)
    base = _section(text, "Baselines measured in the same run", "## ")
    assert "| copy_ (dst.copy_(src)) | fp32 | - | 4K |" in base
    assert all(ln.endswith("| 100 % |") for ln in base.splitlines() if ln.startswith("| copy_ "))
    assert "| MeZO-style perturb | fp32 | gaussian | 4K |" in base
    assert "Times are per call" not in text


def test_step_table_ratios():
    text = R.render([FIXTURE], None)
    # zeroflow 0.665 ms, MeZO recipe 6.13 ms, FO-Adam 1.78 ms (FO-SGD: 0.658 ms)
    assert "| tiny | zo_sgd | gaussian | 1 | 0.665 ms | 6.13 ms | 9.21× | 2.67× |" in text


def test_e2e_table_ratios_and_fo_methods_last():
    text = R.render([FIXTURE], None)
    e2e = _section(text, "### One training iteration on cpu", "Peak total")
    rows = [ln for ln in e2e.splitlines() if ln.startswith("| ") and not ln.startswith("| method ")]
    assert "| zo_sgd | 2 | 368 ms | 12.63× | 0.0664 MiB | 0.141 MiB | 0.45× |" in rows
    assert [r.split(" | ")[0][2:] for r in rows[-2:]] == ["fo_adam", "fo_sgd"]


def test_e2e_plot_puts_the_fo_methods_last():
    data = _fixture()
    recs = [{"x": b["extra_info"], "t": b["stats"]["median"]} for b in data["benchmarks"]
            if b["extra_info"]["suite"] == "e2e"]
    plt = mock.MagicMock()
    a1, a2 = mock.MagicMock(), mock.MagicMock()
    plt.subplots.return_value = (mock.MagicMock(), (a1, a2))
    R.plot_e2e(plt, "cpu", recs)
    names = list(a1.barh.call_args[0][0])
    assert names[-2:] == ["fo_adam", "fo_sgd"] and names[0] == "forward_grad"


def test_distributed_table_ratios(tmp_path):
    def rec(method, world, q, t, comm):
        key = f"distributed/{method}" + (f"/q{q}" if q else "") + f"/w{world}"
        return _bench(key, t, suite="distributed", device="cpu", method=method, world=world, q=q, params=10**6,
                      global_batch=64, comm_bytes_per_step=comm, comm_calls_per_step=2.0,
                      ddp_ref=f"distributed/ddp_fo_sgd/w{world}", elements=10**6, bytes=0)

    benches = [rec("zo_sgd", 1, 1, 0.020, 24.0), rec("zo_sgd", 2, 1, 0.010, 24.0),
               rec("ddp_fo_sgd", 1, 0, 0.050, 0.0), rec("ddp_fo_sgd", 2, 0, 0.080, 4.0e6)]
    text = R.render([_write(tmp_path, {"machine_info": {}, "benchmarks": benches})], None)
    # DDP sends 4e6 B, ZO 24 B: 166,667x; the 2-rank ZO step is twice as fast as the 1-rank one
    assert "| DataParallelZO zo_sgd q=1 | 2 | 24 B | 2 | 166,667× | 10 ms | 2.00× |" in text
    assert "| DDP + FO-SGD (gradient all-reduce) | 2 | 4,000,000 B | 2 | — | 80 ms | 0.62× |" in text


# ----------------------------------------------------------------------------- render, CLI
def test_missed_target_prompt_and_notes(tmp_path):
    text = R.render([FIXTURE], None)
    assert "Missed targets are not analysed yet" in text          # the fixture misses some
    notes = tmp_path / "notes.md"
    notes.write_text("Why the CPU misses: it is a 2-core VM.\n")
    text = R.render([FIXTURE], None, notes_path=str(notes))
    assert "## Analysis\n\nWhy the CPU misses: it is a 2-core VM.\n" in text
    assert "Missed targets are not analysed yet" not in text
    # only "not measured" rows (an e2e-only run): nothing to analyse
    e2e = [b for b in _fixture()["benchmarks"] if b["extra_info"]["suite"] == "e2e"]
    text = R.render([_write(tmp_path, {"machine_info": {}, "benchmarks": e2e})], None)
    assert "| not measured |" in text and "Missed targets are not analysed yet" not in text


def test_targets_json_feeds_the_gpu_summary(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    R.render([FIXTURE], None, targets_json=str(work / "targets.json"))
    first = json.loads((work / "targets.json").read_text())[0]
    assert first == {"device": "cpu", "target": "Rademacher perturb ≥ 1.3 G elem/s", "measured": "0.149 G/s",
                     "status": "**missed** by 89 %", "detail": "cpu fp32 4K"}
    text = G.render(G.summarize(str(work)))
    assert "  [**missed** by 89 %] Rademacher perturb ≥ 1.3 G elem/s: 0.149 G/s (cpu fp32 4K)" in text


def test_skipped_cases_are_listed_once(tmp_path):
    a = _write(tmp_path, _fixture(), "a.json")
    b = _write(tmp_path, {"benchmarks": []}, "b.json")
    line = "SKIPPED [1] benchmarks/test_bench_kernels.py:40: needs CUDA"
    for p in (a, b):
        (tmp_path / (p.rsplit("/", 1)[1] + ".skips.txt")).write_text(f"{line}\nnoise\n")
    text = R.render([a, b], None)
    assert text.count(f"- {line}") == 1 and "noise" not in text


def test_cli_without_any_json_fails_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "perf.md"
    with pytest.raises(SystemExit) as exc:
        R.main([str(tmp_path / "missing.json"), "--out", str(out)])
    assert exc.value.code == 2 and not out.exists()
    assert "missing.json not found" in capsys.readouterr().err


def test_a_missing_suite_json_is_named_on_the_page_not_only_on_stderr(tmp_path, capsys):
    # main() dropped a missing file before render: the page did not say that a suite (one that
    # crashed before writing its JSON, say) was not measured; only stderr did
    a = _write(tmp_path, _fixture(), "a.json")
    out = tmp_path / "perf.md"
    assert R.main([a, str(tmp_path / "llm.json"), "--out", str(out)]) == 0
    assert "llm.json not found, ignored" in capsys.readouterr().err
    text = out.read_text()
    assert "## Not measured in this run" in text and "- llm.json: no results (missing)" in text


# ----------------------------------------------------------------------------- gpu_summary
def _junit(tmp_path, cases):
    (tmp_path / "tests.xml").write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest">'
                                        + "".join(cases) + "</testsuite></testsuites>")
    return G.read_junit([str(tmp_path / "tests.xml")])


def test_summary_crash_patterns(tmp_path):
    t = _junit(tmp_path, [
        '<testcase classname="tests.t" name="a"><failure message="boom">Fatal Python error: Aborted</failure>'
        '</testcase>',
        '<testcase classname="tests.t" name="b"><error message="SEGMENTATION FAULT in worker"/></testcase>',
        '<testcase classname="tests.t" name="c"><failure message="child died with exit code -11"/></testcase>',
        '<testcase classname="tests.t" name="d"><failure message="[gw2] node down: Not properly terminated"/>'
        '</testcase>',
        '<testcase classname="tests.t" name="e"><failure message="worker gw1 crashed while running"/></testcase>',
        '<testcase classname="tests.t" name="f"><failure message="assert 1 == 2"/></testcase>',
        '<testcase classname="tests.t" name="g"><failure message="bash: line 1: exit code 134"/></testcase>',
        # a process that failed, not one that crashed (benchmarks/test_bench_distributed.py's helper)
        '<testcase classname="tests.t" name="h"><failure message="rank 1 helper failed (exit code 1)"/></testcase>',
        '<testcase classname="tests.t" name="i"><failure message="exit code 13 of the child"/></testcase>',
    ])
    assert [c["name"] for c in t["crashed"]] == [f"tests/t.py::{n}" for n in "abcdeg"]
    assert [f["name"] for f in t["failed"]] == [f"tests/t.py::{n}" for n in "fhi"]


def test_summary_message_is_the_first_line_cut_at_240(tmp_path):
    long = "x" * 300
    t = _junit(tmp_path, ['<testcase classname="tests.t" name="a"><failure message="first&#10;second"/></testcase>',
                          f'<testcase classname="tests.t" name="b"><failure message="{long}"/></testcase>'])
    assert [f["message"] for f in t["failed"]] == ["first", "x" * 240]


def test_summary_lists_25_per_kind_then_counts_the_rest(tmp_path):
    fails = [f'<testcase classname="tests.t" name="f{i}"><failure message="m{i}"/></testcase>' for i in range(26)]
    crash = '<testcase classname="tests.t" name="c"><failure message="Segmentation fault"/></testcase>'
    _junit(tmp_path, [*fails, crash])
    text = G.render(G.summarize(str(tmp_path)))
    lines = text.splitlines()
    assert sum(ln.startswith("  FAILED ") for ln in lines) == 25
    assert "  ... and 1 more failed (gpu_logs.tar.gz: tests.log)" in lines
    assert lines.index("  CRASHED tests/t.py::c: Segmentation fault") < lines.index("  FAILED tests/t.py::f0: m0")


def test_summary_skips_a_timeline_without_cases(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "step_timeline_vit_b.json").write_text(json.dumps({"header": {"layout": "vit_b"},
                                                                              "cases": []}))
    assert "step timelines" not in G.render(G.summarize(str(tmp_path)))


def test_two_runs_of_a_suite_on_one_device_are_refused_not_mixed(tmp_path, capsys):
    # Every ratio finds its baseline by key: with two files holding the same keys, a.json's
    # perturb was divided by b.json's 10x slower copy_ (14 % of copy read as 138 %) and the
    # table showed both runs under one label (the audit's merge bug). Refused, nothing written.
    a = _write(tmp_path, {"machine_info": {}, "benchmarks": [_copy("fp32", 4096, 1e-6),
                                                              _kern("cpu", "perturb", "plain", "fp32", "rademacher",
                                                                    4096, 2e-6)]}, "a.json")
    b = _write(tmp_path, {"machine_info": {}, "benchmarks": [_copy("fp32", 4096, 1e-5)]}, "b.json")
    with pytest.raises(R.MixedRuns, match=r"b\.json and .*a\.json both hold 'kernels\|copy\|cpu\|fp32\|4096'"):
        R.load([a, b])
    out = tmp_path / "perf.md"
    with pytest.raises(SystemExit) as e:
        R.main([a, b, "--out", str(out)])
    assert e.value.code == 2 and "pass the files of one run" in capsys.readouterr().err
    assert not out.exists()
    records, _ = R.load([a])
    R.derive(records)
    assert next(r for r in records if r["x"]["op"] == "perturb")["copy_frac"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- CPU capabilities
def _cap(cap, op, dtype, numel, t, dist="gaussian"):
    """A record of benchmarks/test_bench_kernels.py::test_cpu_capability."""
    r = _kern("cpu", op, "plain", dtype, dist, numel, t, kind="capability", capability=cap)
    r["extra_info"]["key"] = f"kernels|capability|{cap}|{op}|cpu|{dtype}|{dist}|{numel}"
    return r


def _capability_records(tmp_path):
    n = 2**20
    return _records(tmp_path, [
        _copy("fp32", n, 1e-3), _copy("bf16", n, 1e-3),
        _kern("cpu", "perturb", "plain", "fp32", "gaussian", n, 1e-3),
        _cap("default", "perturb", "fp32", n, 2e-3), _cap("avx2", "perturb", "fp32", n, 1e-3),
        _cap("avx512", "perturb", "fp32", n, 0.5e-3),
        _cap("default", "sgd", "fp32", n, 2e-3), _cap("avx512", "sgd", "bf16", n, 2e-3),
    ])


def test_capability_table_a_column_per_capability_lowest_first_and_cells_not_measured(tmp_path):
    text = R.kernel_section(_capability_records(tmp_path), {})
    caps = _section(text, "The compiled CPU kernels of each CPU capability", "\n\n|") + \
        text[text.index("| op | dtype | z | N | default"):]
    assert "| op | dtype | z | N | default | avx2 | avx512 |" in caps
    assert "| perturb | fp32 | gaussian | 1M | 2 ms (50 % of copy BW) | 1 ms (100 % of copy BW) | " \
           "0.5 ms (200 % of copy BW) |" in caps
    assert "| sgd | fp32 | gaussian | 1M | 2 ms (50 % of copy BW) | not measured | not measured |" in caps
    assert "| sgd | bf16 | gaussian | 1M | not measured | not measured | 2 ms (50 % of copy BW) |" in caps
    rows = [ln for ln in caps.splitlines() if ln.startswith("| perturb") or ln.startswith("| sgd")]
    assert [r.split(" | ")[0] for r in rows] == ["| perturb", "| sgd", "| sgd"]
    # the capability rows are not zeroflow kernel rows (the table above) nor baselines
    kern = _section(text, "### Kernels on cpu", "Variants:")
    assert kern.count("| perturb |") == 1
    assert "not measured" not in R.kernel_section(_records(tmp_path, [_copy("fp32", 2**20, 1e-3), _kern(
        "cpu", "perturb", "plain", "fp32", "gaussian", 2**20, 1e-3)], "c.json"), {})


def test_capability_table_names_the_capabilities_measured_only(tmp_path):
    n = 2**20
    recs = _records(tmp_path, [_copy("fp32", n, 1e-3), _cap("avx512", "perturb", "fp32", n, 1e-3),
                               _cap("default", "perturb", "fp32", n, 1e-3)])
    assert "| op | dtype | z | N | default | avx512 |" in R.capability_table(
        [r for r in recs if r["x"]["kind"] == "capability"])


def test_the_kernel_plot_leaves_the_capability_records_out(tmp_path):
    """The capability rows are plain fp32 CPU kernels too: in the bar chart they were extra
    "perturb gauss cpu" bars beside the kernel's own."""
    recs = [r for r in _capability_records(tmp_path) if r["x"]["kind"] != "copy"]
    plt = mock.MagicMock()
    ax = mock.MagicMock()
    plt.subplots.return_value = (mock.MagicMock(), ax)
    R.plot_kernels(plt, "cpu", recs + [r for r in _capability_records(tmp_path) if r["x"]["kind"] == "copy"])
    labels = list(ax.set_yticks.call_args[0][1])
    assert labels == ["perturb gauss cpu"]


def test_step_roofline_target_without_its_step_says_not_measured(tmp_path):
    """The step suite ran on the GPU (zo_sgd Rademacher) but not the other steps: every
    method and z keeps its roofline row, the missing ones "not measured" (they vanished)."""
    rows = {r[1]: r for r in _rows(_records(tmp_path, _roofline_records()), "zo_")
            if "its passes at copy bandwidth" in r[1]}
    assert len(rows) == 4
    assert rows["zo_sgd step ≤ 1.3× its passes at copy bandwidth (rademacher, vit_b_86m, q=1)"][3] == "**met**"
    for name in ("zo_sgd step ≤ 1.3× its passes at copy bandwidth (gaussian, vit_b_86m, q=1)",
                 "zo_adam step ≤ 1.3× its passes at copy bandwidth (rademacher, vit_b_86m, q=1)",
                 "zo_adam step ≤ 1.3× its passes at copy bandwidth (gaussian, vit_b_86m, q=1)"):
        assert rows[name][2:4] == ("—", "not measured"), name
        assert rows[name][4].startswith("no zeroflow step record of vit_b_86m, q=1 in this run"), name
    # no step suite on the device: no step rows at all
    kern_only = [b for b in _roofline_records() if b["extra_info"]["suite"] == "kernels"]
    assert not [r for r in R.targets(_records(tmp_path, kern_only, "k.json")) if "its passes" in r[1]]


def _without(data, *keys):
    data = copy.deepcopy(data)
    data["benchmarks"] = [b for b in data["benchmarks"] if b["extra_info"]["key"] not in keys]
    return data


def test_a_q_whose_zeroflow_step_is_missing_is_named_in_the_step_target(tmp_path):
    """q = 2's zeroflow step failed and its MeZO-style step ran: the worst over q = 1 alone is
    shown with q = 2 named, not taken for the worst of every q."""
    recs = _records(tmp_path, _without(_fixture(), "optim|zeroflow|sgd|cpu|tiny|gaussian|2")["benchmarks"])
    row, = [r for r in R.targets(recs) if r[1] == "zo_sgd step ≥ 2.5× MeZO-style (gaussian, tiny)"]
    assert row[2:] == ("9.21×", "**met**", "q=1: 9.21×, q=2: no zeroflow record")


def test_step_and_memory_targets_of_a_set_whose_zeroflow_steps_all_failed_say_not_measured(tmp_path):
    """Every zeroflow step of the parameter set is missing, its MeZO-style steps ran: each step
    target and the memory target keep their row, "not measured" (they vanished with the set)."""
    gone = [b["extra_info"]["key"] for b in _fixture()["benchmarks"]
            if b["extra_info"]["key"].startswith("optim|zeroflow|")]
    recs = _records(tmp_path, _without(_fixture(), *gone)["benchmarks"])
    rows = {r[1]: r for r in R.targets(recs)}
    for kind in ("zo_sgd", "zo_adam"):
        for dist, tgt in (("gaussian", "2.5"), ("rademacher", "10")):
            assert rows[f"{kind} step ≥ {tgt}× MeZO-style ({dist}, tiny)"][2:] == (
                "—", "not measured", "q=1: no zeroflow record, q=2: no zeroflow record")
    assert rows["ZO step extra memory ≤ 1 MiB (tiny) [GPU target; CPU shown]"][2:4] == ("—", "not measured")


def test_a_parameter_set_with_first_order_steps_only_gets_no_zo_target_rows(tmp_path):
    """The step and memory targets are of the ZO steps (zeroflow and MeZO-style records): a
    parameter set where only the first-order baselines ran has no ZO step to measure, and no
    "not measured" row of a ZO target."""
    fixture = _fixture()
    fo = copy.deepcopy(next(b for b in fixture["benchmarks"] if b["extra_info"]["key"].startswith("optim|zeroflow|")))
    fo["extra_info"].update(kind="fo", impl="fo", opt="fo_sgd", dist="-", q=0, param_set="fo_only",
                            key="optim|fo|fo_only|sgd")
    rows = R.targets(_records(tmp_path, fixture["benchmarks"] + [fo]))
    assert [r for r in rows if "(tiny" in r[1]], rows         # the ZO targets of the set that has them
    assert [r for r in rows if "fo_only" in r[1]] == []

def test_step_roofline_rows_say_not_measured_when_only_mezo_steps_ran(tmp_path):
    """The step suite ran on the GPU but every zeroflow step failed (the MeZO-style ones ran):
    the four roofline rows stay, "not measured" (they vanished when only zeroflow records
    counted as the suite having run)."""
    benches = _roofline_records()
    for b in benches:
        x = b["extra_info"]
        if x["suite"] == "optim":
            x.update(impl="mezo", kind="mezo", key=x["key"].replace("optim|", "optim|mezo|"))
    rows = [r for r in R.targets(_records(tmp_path, benches)) if "its passes at copy bandwidth" in r[1]]
    assert len(rows) == 4, rows
    assert all(r[2:4] == ("—", "not measured") for r in rows), rows


def test_a_q_missing_in_one_distribution_is_not_named_in_the_other(tmp_path):
    """Gaussian q = 2 did not run at all (neither step); Rademacher q = 2 did: the Gaussian row
    lists q = 1 alone; "no zeroflow record" is per distribution, not borrowed from Rademacher."""
    recs = _records(tmp_path, _without(_fixture(), "optim|zeroflow|sgd|cpu|tiny|gaussian|2",
                                       "optim|mezo|sgd|cpu|tiny|gaussian|2")["benchmarks"])
    row, = [r for r in R.targets(recs) if r[1] == "zo_sgd step ≥ 2.5× MeZO-style (gaussian, tiny)"]
    assert row[2:] == ("9.21×", "**met**", "q=1: 9.21×")


def test_llm_target_rows_take_the_iteration_record_not_the_optimizer_only_one(tmp_path):
    """ZO-SGD's iteration failed and its optimizer-only record ran: its rows read "not
    measured", not a share worked out from the optimizer-only record's time."""
    recs = [r for r in _llm_records(0.084, 0.110, 10.2e9) if r["extra_info"]["key"] != _llm_key("zo_sgd")]
    text = R.render([_llm_write(tmp_path, recs)], None)
    rows = [ln for ln in text.splitlines() if ln.startswith("| cuda | LLM ZO-SGD")][:3]
    assert all("| — | not measured | no zo_sgd iteration record in this run" in r for r in rows), rows
