"""Performance report: pytest-benchmark JSON -> docs/performance.md + PNG plots.

    python -m benchmarks.report results/*.json --out docs/performance.md --plots docs/perf/ \
        [--sweep results/query_sweep.json] [--notes benchmarks/notes.md] [--title TEXT]

Every record's ``extra_info`` (written by benchmarks/conftest.py ``run_bench``) carries
``suite``, ``key``, ``elements``, ``bytes`` and the keys of the baselines measured in the
same run (``copy_ref``, ``mezo_ref``, ``fo_ref``); the ratios are computed from the medians.
The targets of issue 5 are shown (met / missed by how much), never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict, defaultdict

from benchmarks import kernel_cases

MiB = 2**20


# ----------------------------------------------------------------------------- loading
class MixedRuns(ValueError):
    """Benchmark files of more than one run of a suite on a device, given to one report."""


def load(paths):
    """Records (dicts) of every benchmark in ``paths``, and the machine infos by file.

    A key held twice (the same suite and device in two files: two runs, or two machines' CPU
    rows) is refused: every ratio looks its baseline up by key (``copy_ref``, ...), so the
    records of one file were divided by the other file's baselines and the tables showed both
    under one label (an audit's find: 14 % of copy read as 138 %)."""
    records, machines, seen = [], [], {}
    for path in paths:
        data = _read_json(path)
        if data is None:      # named under "Not measured in this run" (_skips)
            continue
        mi = dict(data.get("machine_info") or {})
        mi["_file"] = os.path.basename(path)
        mi["_path"] = path        # read: _skips names the paths without one
        mi["_datetime"] = data.get("datetime")
        mi["_commit_info"] = data.get("commit_info") or {}
        machines.append(mi)
        for b in data.get("benchmarks") or []:
            ex = b.get("extra_info") or {}
            st = b.get("stats") or {}
            if not ex.get("key") or not st.get("median"):
                continue
            if ex["key"] in seen:
                raise MixedRuns(f"{path} and {seen[ex['key']]} both hold {ex['key']!r}: a report takes one run of "
                                 "each suite on each device (its ratios use the baselines of the same run); "
                                 "pass the files of one run")
            seen[ex["key"]] = path
            per = int(ex.get("calls_per_round") or 1)    # a round of back-to-back calls (conftest run_bench)
            records.append({"name": b.get("name"), "group": b.get("group"), "x": ex, "t": float(st["median"]) / per,
                            "t_min": float(st.get("min", st["median"])) / per, "rounds": int(st.get("rounds", 0)),
                            "stddev": float(st.get("stddev") or 0.0) / per, "file": os.path.basename(path)})
    return records, machines


def _read_json(path):
    """A benchmark JSON's contents, or None when it is empty or unreadable: pytest-benchmark
    writes a 0-byte file when every case of a suite was skipped or deselected, and one such
    file stopped the whole report (no page, every other suite's results lost)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def index(records):
    return {r["x"]["key"]: r for r in records}


# ----------------------------------------------------------------------------- helpers
def fnum(v, digits=3):
    if v is None:
        return "—"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.{digits}g}"


def fx(v):
    return "—" if v is None else f"{v:.2f}×"


def fpct(v):
    return "—" if v is None else f"{100 * v:.0f} %"


def fms(t):
    if t is None:
        return "—"
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def fmib(b):
    return "—" if b is None else (f"{b / MiB:.3g} MiB" if b < 1024 * MiB else f"{b / 2**30:.3g} GiB")


def fsize(n):
    """A kernel size as the benchmarks name it: an exact binary multiple as 16M / 256M (2^24, 2^28
    elements), any other count of a million or more in decimal millions. Binary "M" for the
    ViT-B/16 list's 86,567,656 parameters printed "82.6M" beside its name vit_b_86m."""
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    if n >= 10 ** 6:
        return f"{n / 1e6:.1f} million"
    return str(n)


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def derive(records):
    """Adds rate / bandwidth / ratios to every record, in place; returns the key index.
    Rates first (a ratio to the copy baseline needs the copy's own bandwidth), then ratios."""
    idx = index(records)
    for r in records:
        x, t = r["x"], r["t"]
        r["elem_s"] = x["elements"] / t if x.get("elements") else None
        r["gbs"] = x["bytes"] / t / 1e9 if x.get("bytes") else None
    for r in records:
        x, t = r["x"], r["t"]
        c = idx.get(x.get("copy_ref"))
        r["copy_frac"] = r["gbs"] / c["gbs"] if (c and r["gbs"] and c["gbs"]) else None
        m = idx.get(x.get("mezo_ref"))
        r["vs_mezo"] = m["t"] / t if m else None
        fo = idx.get(x.get("fo_ref"))
        r["vs_fo"] = fo["t"] / t if fo else None
    return idx


# ----------------------------------------------------------------------------- sections
def machine_section(machines):
    lines = ["## Machine and versions", ""]
    for mi in machines:
        zf = mi.get("zeroflow") or {}
        cpu = mi.get("cpu") or {}
        dev = zf.get("bench_device", "cpu")
        rows = [
            ("results file", f"`{mi['_file']}`"),
            ("date", zf.get("date") or mi.get("_datetime") or "—"),
            ("benchmark device", dev + (f" ({zf['cuda_device']}, {zf.get('cuda_memory_gib')} GiB, CUDA "
                                        f"{zf.get('cuda_version')})" if dev.startswith("cuda") and
                                        zf.get("cuda_device") else "")),
            ("CPU", f"{cpu.get('brand_raw', mi.get('processor') or '—')}, {zf.get('cpu_count', cpu.get('count', '—'))}"
                    f" logical cores, torch threads {zf.get('torch_threads', '—')}"),
            ("OS", f"{mi.get('system', '')} {mi.get('release', '')} {mi.get('machine', '')}".strip() or "—"),
            ("load average at start", " ".join(zf.get("loadavg_at_start") or []) or "—"),
            ("python / torch / triton", f"{mi.get('python_version', '—')} / {zf.get('torch', '—')} / "
                                        f"{zf.get('triton', '—')}"),
            ("zfkernels backends", ", ".join(zf["zfkernels_backends"]) if isinstance(
                zf.get("zfkernels_backends"), list) else str(zf.get("zfkernels_backends", "—"))),
            ("stream / commit", f"{zf.get('stream_version', '—')} / {zf.get('zeroflow_commit', '—')}"),
            ("mode", "FAST (smoke sizes, not performance numbers)" if zf.get("bench_fast") else "full"),
        ]
        lines += [table(["", ""], rows), ""]
    return "\n".join(lines)


def by_device(records, suite=None):
    """``[(device, records of that device)]`` in device order, optionally of one suite only."""
    recs = [r for r in records if suite is None or r["x"].get("suite") == suite]
    return [(dev, [r for r in recs if r["x"].get("device", "cpu") == dev])
            for dev in sorted({r["x"].get("device", "cpu") for r in recs})]


def _largest(records, **match):
    cand = [r for r in records if all(r["x"].get(k) == v for k, v in match.items())]
    if not cand:
        return None
    n = max(r["x"].get("numel", 0) for r in cand)
    return next(r for r in cand if r["x"].get("numel", 0) == n)


def _status(measured, target, higher=True):
    if measured is None:
        return "not measured"
    ok = measured >= target if higher else measured <= target
    if ok:
        return "**met**"
    miss = (target - measured) / target if higher else (measured - target) / target
    # two significant digits below 0.5 %: never "by 0 %" or "by 0.0 %" next to a value that rounds to the target
    return f"**missed** by {100 * miss:.0f} %" if miss >= 0.005 else f"**missed** by {100 * miss:.2g} %"


def targets(records):
    """Rows (device, target, measured, status, where) for the targets of issue 5."""
    rows = []
    for dev, recs in by_device(records):
        kern = [r for r in recs if r["x"].get("suite") == "kernels" and r["x"].get("kind") == "zeroflow"]
        steps = [r for r in recs if r["x"].get("suite") == "optim" and r["x"].get("impl") in ("zeroflow", "mezo")]
        if dev.startswith("cuda"):
            rows += _bandwidth_targets(dev, kern)
            step_targets = (("gaussian", 3.0), ("rademacher", 3.0))
        else:
            rows += _cpu_kernel_targets(dev, kern)
            step_targets = (("gaussian", 2.5), ("rademacher", 10.0))
        rows += _step_targets(dev, steps, step_targets)
        if dev.startswith("cuda"):
            rows += _step_roofline_targets(dev, steps, [r for r in recs if r["x"].get("suite") == "kernels"])
        rows += _memory_targets(dev, steps)
        rows += _llm_targets(dev, [r for r in recs if r["x"].get("suite") == "llm"])
    return rows


def _cpu_kernel_targets(dev, kern):
    """CPU: Rademacher perturb rate, Gaussian perturb vs the MeZO recipe (largest fp32 size)."""
    rows = []
    r = _largest(kern, op="perturb", variant="plain", dist="rademacher", dtype="fp32", backend="cpu")
    rows.append((dev, "Rademacher perturb ≥ 1.3 G elem/s", fnum(r["elem_s"] / 1e9) + " G/s" if r else "—",
                 _status(r["elem_s"] / 1e9 if r else None, 1.3), _where(r)))
    r = _largest(kern, op="perturb", variant="plain", dist="gaussian", dtype="fp32", backend="cpu")
    rows.append((dev, "Gaussian perturb ≥ 2× MeZO-style", fx(r["vs_mezo"]) if r else "—",
                 _status(r["vs_mezo"] if r else None, 2.0), _where(r)))
    return rows


# Issue 13's kernel targets on a GPU: fraction of the same-dtype copy_ bandwidth per z, and the
# Triton backend against the CUDA backend on the same row.
GPU_COPY_FRAC = {"rademacher": 0.90, "gaussian": 0.85}
TRITON_VS_CUDA = 0.80


def _bandwidth_targets(dev, kern):
    """GPU: every backend, op, variant and dtype at its largest size: Rademacher >= 90 %,
    Gaussian >= 85 % of the copy bandwidth; Triton >= 80 % of CUDA on the same row. Every
    case of the suite (benchmarks/kernel_cases.py) has its row, for the CUDA backend and any
    other that ran: a case without a record is "not measured" (skipped, failed or cut off).
    No row at all where the kernel suite did not run on the device (a run of other suites)."""
    rows = []
    if not kern:
        return rows
    for b in sorted({r["x"]["backend"] for r in kern} | {"cuda"}):
        for op, variant, dtype, dist in kernel_cases.rows():
            frac = GPU_COPY_FRAC[dist]
            name = f"{op} {variant} ({b}, {dtype}, {dist}) ≥ {100 * frac:.0f} % of copy bandwidth"
            r = _largest(kern, op=op, variant=variant, dtype=dtype, backend=b, dist=dist)
            if r is None:
                rows.append((dev, name, "—", "not measured", "no record in this run (skipped, failed or cut off: "
                                                             "see Not measured)"))
            elif r.get("copy_frac") is None:      # the kernel ran, its copy_ baseline did not
                rows.append((dev, name, "—", "not measured", f"{_where(r)}; no copy_ baseline of "
                                                              f"this dtype and size in the run"))
            else:
                rows.append((dev, name, fpct(r["copy_frac"]), _status(r["copy_frac"], frac), _where(r)))
    if "triton" not in {r["x"]["backend"] for r in kern}:
        return rows
    # Triton against CUDA: a row for every case, as above (a case whose Triton or CUDA timing is
    # missing, cut off or failed, read "not measured"; its row used to vanish without a word)
    for op, variant, dtype, dist in kernel_cases.rows():
        name = f"{op} {variant} (triton, {dtype}, {dist}) ≥ {100 * TRITON_VS_CUDA:.0f} % of the CUDA backend"
        t = _largest([r for r in kern if r["t"] is not None], op=op, variant=variant, dtype=dtype, dist=dist,
                     backend="triton")
        c = t and next((o for o in kern if o["t"] is not None and o["x"]["backend"] == "cuda" and all(
            o["x"].get(k) == t["x"].get(k) for k in ("op", "variant", "dtype", "dist", "numel"))), None)
        if t is None:
            rows.append((dev, name, "—", "not measured", "no Triton record in this run (skipped, failed or cut off: "
                                                         "see Not measured)"))
        elif c is None:
            rows.append((dev, name, "—", "not measured", f"{_where(t)}; no CUDA record of this case and size"))
        else:
            ratio = c["t"] / t["t"]
            rows.append((dev, name, fpct(ratio), _status(ratio, TRITON_VS_CUDA), _where(t)))
    return rows


# Issue 13: a ZO step on the ViT-B list (q = 1) within 1.3x of its passes over the parameters
# at the copy bandwidth: ZO-SGD 3 passes over theta (perturb +eps, perturb -2 eps, the fused
# restore + update), ZO-Adam 2 over theta and one over theta, m and v.
STEP_ROOFLINE_X = 1.3
STEP_BYTES_PER_PARAM = {"zo_sgd": 3 * 2, "zo_adam": 2 * 2 + 3 * 2}   # x element bytes (fp32: 4)


def _step_roofline_targets(dev, steps, kern):
    """A row per method and z wherever the step suite ran on the device (``steps``: its ZO
    records, zeroflow and MeZO-style): a zeroflow step without its record (skipped, failed, cut
    off or not selected) reads "not measured" (its row vanished)."""
    if not steps:
        return []
    opt = [r for r in steps if r["x"]["impl"] == "zeroflow"]
    copies = [r for r in kern if r["x"].get("kind") == "copy" and r["x"].get("dtype") == "fp32" and r["gbs"]]
    cp = max(copies, key=lambda r: r["x"]["numel"]) if copies else None
    rows = []
    for kind, per in STEP_BYTES_PER_PARAM.items():
        for dist in ("rademacher", "gaussian"):
            cand = [r for r in opt if r["x"]["opt"] == kind and r["x"]["dist"] == dist and r["x"]["q"] == 1
                    and r["x"].get("param_set") == "vit_b_86m" and r["t"]]
            name = f"{kind} step ≤ {STEP_ROOFLINE_X:g}× its passes at copy bandwidth ({dist}, vit_b_86m, q=1)"
            if not cand:
                rows.append((dev, name, "—", "not measured", "no zeroflow step record of vit_b_86m, q=1 in this "
                                                             "run (skipped, failed or cut off: see Not measured)"))
                continue
            r = cand[0]
            if cp is None:      # the step ran, the kernel suite's fp32 copy_ did not (cut, or not selected)
                rows.append((dev, name, "—", "not measured",
                             f"{fms(r['t'])}; no fp32 copy_ baseline in the kernels suite of this run"))
                continue
            roof_s = per * 4 * r["x"]["numel"] / (cp["gbs"] * 1e9)
            ratio = r["t"] / roof_s
            where = (f"{fms(r['t'])} vs {fms(roof_s)} ({per // 2} tensor passes of {fsize(r['x']['numel'])} "
                     f"fp32 params at the fp32 copy_ {fnum(cp['gbs'])} GB/s)")
            rows.append((dev, name, fx(ratio), _status(ratio, STEP_ROOFLINE_X, higher=False), where))
    return rows


def _step_targets(dev, steps, step_targets):
    """ZO step vs the MeZO recipe, per parameter set, method and distribution: the worst q.
    ``steps``: the suite's ZO records, zeroflow and MeZO-style; a q (or a parameter set) that
    has a MeZO-style record and no zeroflow one is named, not left out of the worst."""
    rows = []
    for pset in sorted({r["x"]["param_set"] for r in steps}):
        for kind in ("zo_sgd", "zo_adam"):
            for dist, tgt in step_targets:
                target = f"{kind} step ≥ {tgt:g}× MeZO-style ({dist}, {pset})"
                case = [r for r in steps if (r["x"]["param_set"], r["x"]["opt"], r["x"]["dist"]) == (pset, kind, dist)]
                ours = [r for r in case if r["x"]["impl"] == "zeroflow"]
                cand = [r for r in ours if r["vs_mezo"] is not None]
                # a q whose MeZO-style step ran and whose zeroflow step did not (failed, cut off)
                lost = sorted({r["x"]["q"] for r in case if r["x"]["impl"] == "mezo"} - {r["x"]["q"] for r in ours})
                no_zf = "".join(f", q={q}: no zeroflow record" for q in lost)
                if not cand:
                    rows.append((dev, target, "—", "not measured", no_zf[2:]))
                    continue
                worst = min(cand, key=lambda r: r["vs_mezo"])
                qs = ", ".join(f"q={r['x']['q']}: {r['vs_mezo']:.2f}×" for r in sorted(cand, key=lambda r: r["x"]["q"]))
                # a q measured for zeroflow but without its MeZO baseline is not in the worst:
                # say so rather than call the target met over the q values that had one
                unmatched = sorted({r["x"]["q"] for r in ours if r["vs_mezo"] is None})
                qs += "".join(f", q={q}: no MeZO baseline" for q in unmatched) + no_zf
                rows.append((dev, target, fx(worst["vs_mezo"]), _status(worst["vs_mezo"], tgt), qs))
    return rows


def _memory_targets(dev, steps):
    """ZO step extra memory ≤ 1 MiB per parameter set (a GPU target, shown for the CPU too), for
    every parameter set of ``steps`` (the suite's ZO records): one whose zeroflow steps have no
    memory measurement (q = 1 skipped, failed or cut off) reads "not measured"."""
    rows = []
    mem = [r for r in steps if r["x"]["impl"] == "zeroflow" and r["x"].get("peak_extra_bytes") is not None]
    for pset in sorted({r["x"]["param_set"] for r in steps}):
        name = f"ZO step extra memory ≤ 1 MiB ({pset})" + ("" if dev.startswith("cuda") else " [GPU target; CPU shown]")
        cand = [r for r in mem if r["x"]["param_set"] == pset]
        if not cand:
            rows.append((dev, name, "—", "not measured", "no zeroflow step of this parameter set measured its "
                                                         "memory (q = 1) in this run"))
            continue
        worst = max(cand, key=lambda r: r["x"]["peak_extra_bytes"])
        extra = worst["x"]["peak_extra_bytes"]
        rows.append((dev, name, fmib(extra), _status(extra / MiB, 1.0, higher=False),
                     f"worst: {worst['x']['opt']} {worst['x']['dist']} q={worst['x']['q']}"))
    return rows


# ----------------------------------------------------------------------------- LLM-sized suite
# Targets of issue 13 for the zeroflow ZO-SGD iteration on the LLM-sized model.
LLM_ROOFLINE_X, LLM_VS_MEZO_X, LLM_MEM_X = 1.3, 5.0, 1.05


def llm_derive(recs):
    """``{key: derived}`` for the LLM suite's records (benchmarks/test_bench_llm.py), from the
    medians of one run: the two forwards (the inference record), the optimizer's share
    (iteration minus those forwards), the roofline (``roofline_bytes`` at the copy record's
    bandwidth), the optimizer-only time, the MeZO recipe's share over ours, memory vs inference."""
    idx = index(recs)
    out = {}
    for r in recs:
        x = r["x"]
        cp, inf = idx.get(x.get("copy_ref")), idx.get(x.get("inference_ref"))
        copy_bps = cp["x"]["bytes"] / cp["t"] if cp and cp["x"].get("bytes") else None
        d = {"copy_bps": copy_bps, "forwards": inf["t"] if inf and r is not inf else None}
        zo = x.get("variant") == "iteration" and x.get("kind") in ("zeroflow", "mezo")
        d["share"] = r["t"] - inf["t"] if zo and inf else None
        d["roofline"] = x["roofline_bytes"] / copy_bps if x.get("roofline_bytes") and copy_bps else None
        only = idx.get(x.get("optimizer_only_ref"))
        d["only"] = only["t"] if only else None
        tot, base = x.get("peak_total_bytes"), inf["x"].get("peak_total_bytes") if inf else None
        d["mem_vs_inf"] = tot / base if tot and base else None
        out[x["key"]] = d
    for r in recs:   # needs every record's share first
        x, d = r["x"], out[r["x"]["key"]]
        m = out.get(x.get("mezo_ref"))
        d["share_vs_roofline"] = d["share"] / d["roofline"] if d["share"] is not None and d["roofline"] else None
        d["mezo_share_over_ours"] = m["share"] / d["share"] if m and m["share"] is not None and d["share"] else None
        only = idx.get(x.get("optimizer_only_ref"))
        mezo_only = idx.get(only["x"].get("mezo_ref")) if only else None   # both optimizer-only records
        d["mezo_only_over_ours"] = mezo_only["t"] / only["t"] if mezo_only else None
    return out


def _count(n):
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _llm_title(x):
    return f"{x['model']}, {x['dtype']}, batch {x['batch']} × {x['seq']}"


# The ZO-SGD methods the targets are checked on: MeZO's setting (Gaussian z) first, then
# the same step with Rademacher z (measured since the issue-13 profile put the Gaussian share
# at its instruction floor; the MeZO recipe it is compared with draws Gaussian z either way).
_LLM_TARGET_METHODS = {"zo_sgd": "ZO-SGD", "zo_sgd_rademacher": "ZO-SGD (Rademacher z)"}


def _llm_targets(dev, recs):
    """Issue 13's three targets for zeroflow ZO-SGD on the LLM-sized model, for each method of
    _LLM_TARGET_METHODS wherever the LLM suite has records on the device (none without): a
    method without its iteration record (skipped, failed or cut off) reads "not measured"."""
    if not recs:
        return []
    derived = llm_derive(recs)
    gpu_note = "" if dev.startswith("cuda") else " [GPU target; CPU shown]"
    rows = []
    for method, label in _LLM_TARGET_METHODS.items():
        roof_t, mezo_t, mem_t = (f"LLM {label} {what}{gpu_note}" for what in (
            f"optimizer share ≤ {LLM_ROOFLINE_X:g}× its 3-pass roofline",
            f"optimizer share ≥ {LLM_VS_MEZO_X:g}× below the MeZO recipe's",
            f"peak memory ≤ inference + {100 * (LLM_MEM_X - 1):.0f} %"))
        r = next((r for r in recs if r["x"].get("method") == method and r["x"].get("variant") == "iteration"), None)
        if r is None:
            why = f"no {method} iteration record in this run (skipped, failed or cut off: see Not measured)"
            rows += [(dev, t, "—", "not measured", why) for t in (roof_t, mezo_t, mem_t)]
            continue
        x, d = r["x"], derived[r["x"]["key"]]
        what = _llm_title(x) + (f", {x['backend']} backend" if x.get("backend") else "")
        share = d["share"]
        noise = share is not None and share <= 0
        unresolved = "**unresolved**: iteration ≤ its forwards (timing noise)"
        rows.append((dev, roof_t, fx(d["share_vs_roofline"]) if not noise else fms(share),
                     unresolved if noise else _status(d["share_vs_roofline"], LLM_ROOFLINE_X, higher=False),
                     f"{what}: share {fms(share)} = iteration {fms(r['t'])} − 2 forwards {fms(d['forwards'])}; "
                     f"roofline {fms(d['roofline'])} at copy {fnum(d['copy_bps'] / 1e9) if d['copy_bps'] else '—'}"
                     f" GB/s; optimizer alone {fms(d['only'])}"))
        rows.append((dev, mezo_t, fx(d["mezo_share_over_ours"]) if not noise else "—",
                     unresolved if noise else _status(d["mezo_share_over_ours"], LLM_VS_MEZO_X),
                     f"{what}; optimizer alone: MeZO ÷ ours {fx(d['mezo_only_over_ours'])}"))
        rows.append((dev, mem_t, fx(d["mem_vs_inf"]), _status(d["mem_vs_inf"], LLM_MEM_X, higher=False),
                     f"{what}: {fmib(x.get('peak_total_bytes'))} vs two forwards' "
                     f"{fmib(d['mem_vs_inf'] and x['peak_total_bytes'] / d['mem_vs_inf'])}"))
    return rows


_LLM_ORDER = {"inference": 0, "zo_sgd": 1, "zo_sgd_rademacher": 2, "zo_adam": 3, "mezo_sgd": 4, "fo_adamw": 5}
_LLM_NAMES = {"inference": "plain inference (2 forwards, no_grad)", "zo_sgd": "zeroflow ZO-SGD",
              "zo_sgd_rademacher": "zeroflow ZO-SGD, Rademacher z", "zo_adam": "zeroflow ZO-Adam",
              "mezo_sgd": "MeZO recipe (ZO-SGD)", "fo_adamw": "FO AdamW"}


def llm_section(records):
    """The LLM-sized end-to-end table (benchmarks/test_bench_llm.py); "" without its records."""
    out = []
    for dev, recs in by_device(records, "llm"):
        derived = llm_derive(recs)
        main = [r for r in recs if r["x"].get("variant") == "iteration" and r["x"]["method"] in _LLM_ORDER]
        if not main:
            continue
        x0 = main[0]["x"]
        out += [f"### LLM-sized end-to-end on {dev}: {x0.get('arch', '')} `{x0['model']}` "
                f"({_count(x0['numel'])} parameters in {x0['n_tensors']} tensors, {x0['dtype']}), "
                f"batch {x0['batch']} × {x0['seq']} tokens, causal-LM loss", ""]
        rows = []
        for r in sorted(main, key=lambda r: _LLM_ORDER[r["x"]["method"]]):
            x, d = r["x"], derived[r["x"]["key"]]
            only = f"{fms(d['only'])}" + (f" ({fx(d['only'] / d['roofline'])} roofline)" if d["only"] and
                                           d["roofline"] else "") if d["only"] is not None else "—"
            name = _LLM_NAMES[x["method"]] + (f" ({x['backend']} backend)" if x.get("backend") else "")
            rows.append((name, fms(r["t"]), fms(d["forwards"]) if d["share"] is not None else "—",
                         fms(d["share"]), fms(d["roofline"]), fx(d["share_vs_roofline"]),
                         fx(d["mezo_share_over_ours"]), only, fmib(x.get("peak_total_bytes")),
                         fx(d["mem_vs_inf"]) if x["method"] != "inference" else "1.00×"))
        out += [table(["method", "time / iteration", "its 2 forwards", "optimizer share", "roofline",
                       "share / roofline", "MeZO share ÷ ours", "optimizer alone (no forward)", "peak memory",
                       "memory vs inference"], rows), ""]
        cp = next((r for r in recs if r["x"].get("kind") == "copy"), None)
        out += ["Optimizer share = iteration − the two forwards of plain inference (same run, same batch); "
                "optimizer alone = the same step with a closure that returns precomputed losses. Roofline = the "
                "bytes the method's passes must read and write at the copy bandwidth"
                + (f" ({fnum(cp['x']['bytes'] / cp['t'] / 1e9)} GB/s, `copy_` of {fsize(cp['x']['numel'])} "
                   f"{cp['x']['dtype']} elements)" if cp else "")
                + ": ZO-SGD 3 passes over the parameters (perturb +ε, perturb −2ε, update with the restore "
                "fused), ZO-Adam 2 passes plus one over θ, m, v, the MeZO recipe 4 (z counted as free). "
                "The zeroflow rows draw Gaussian z, as the MeZO recipe does, unless named Rademacher. "
                "Peak memory: everything allocated at the iteration's peak (parameters, optimizer state, "
                "activations), measured after a warm-up iteration; FO AdamW adds gradients and its state.", ""]
    return "\n".join(out)


def _where(r):
    if r is None:
        return ""
    x = r["x"]
    return f"{x.get('backend')} {x.get('dtype')} {fsize(x.get('numel', 0))}"


_OP_ORDER = {"perturb": 0, "sgd": 1, "adam": 2, "copy": 3}
_VARIANT_ORDER = {"plain": 0, "sign": 1, "sparse": 2, "history": 3, "momentum": 4}


def kernel_section(records, plots_rel):
    out = []
    for dev, recs in by_device(records, "kernels"):
        out += [f"### Kernels on {dev} ({recs[0]['x'].get('device_name', '')})", ""]
        zf = [r for r in recs if r["x"]["kind"] == "zeroflow"]
        out += [kernel_table(zf), ""]
        notes = sorted({f"{x.get('backend_label') or x['backend']}: {x['note']}" for x in (r["x"] for r in zf)
                        if x.get("note")})
        if notes:
            out += ["Backends marked: " + "; ".join(notes) + ".", ""]
        out += ["Variants: plain (restore + q=1 estimate for the updates), sign (element-wise sign), sparse "
                "(mask, sparsity 0.5), history (h buffer, alpha 0.9), momentum (SGD buffer 0.9). "
                "vs MeZO-style = MeZO recipe time / kernel time (plain variants).", ""]
        per = sorted({int(r["x"].get("calls_per_round") or 1) for r in recs})
        if per != [1]:
            out += [f"Times are per call: each timed round ran {' / '.join(map(str, per))} calls back to back and "
                    "synchronised once, so that a call's host work overlaps the kernel before it (device time).", ""]
        out += ["Baselines measured in the same run:", "",
                baseline_table([r for r in recs if r["x"]["kind"] in ("copy", "mezo")]), ""]
        caps = [r for r in recs if r["x"]["kind"] == "capability"]
        if caps:
            out += ["The compiled CPU kernels of each CPU capability (docs/kernel-ops.md, \"CPU capabilities\": "
                    "the same bits from other instructions; the rows above ran the best one): time per call "
                    "and its share of `copy_` bandwidth in the same run:", "", capability_table(caps), ""]
        if plots_rel.get(("kernels", dev)):
            out += [f"![kernel bandwidth on {dev}]({plots_rel[('kernels', dev)]})", ""]
    return "\n".join(out)


def kernel_table(zf):
    """One row per zeroflow kernel measurement: rate, bandwidth, its share of copy's, vs MeZO."""
    def order(r):
        x = r["x"]
        return (_OP_ORDER.get(x["op"], 9), _VARIANT_ORDER.get(x["variant"], 9), x["backend"], x["dtype"], x["dist"],
                x["numel"])

    rows = []
    for r in sorted(zf, key=order):
        x = r["x"]
        rows.append((x["op"], x["variant"], x.get("backend_label") or x["backend"], x["dtype"], x["dist"],
                     fsize(x["numel"]), fms(r["t"]), fnum(r["elem_s"] / 1e9), fnum(r["gbs"]), fpct(r["copy_frac"]),
                     fx(r["vs_mezo"])))
    return table(["op", "variant", "backend", "dtype", "z", "N", "median", "G elem/s", "GB/s", "of copy BW",
                  "vs MeZO-style"], rows)


def capability_table(caps):
    """One row per CPU-capability case, a column per capability (lowest first): time and the
    share of copy bandwidth."""
    order = [c for c in ("default", "avx2", "avx512") if any(r["x"]["capability"] == c for r in caps)]
    by = {}
    for r in caps:
        x = r["x"]
        by.setdefault((_OP_ORDER.get(x["op"], 9), x["op"], x["dtype"], x["dist"], x["numel"]), {})[x["capability"]] = r
    rows = []
    for (_, op, dtype, dist, n), per in sorted(by.items()):
        cells = [f"{fms(per[c]['t'])} ({fpct(per[c]['copy_frac'])} of copy BW)" if c in per else "not measured"
                 for c in order]
        rows.append((op, dtype, dist, fsize(n), *cells))
    return table(["op", "dtype", "z", "N", *order], rows)


def baseline_table(base):
    """The copy and MeZO-recipe baselines of the kernel suite."""
    rows = []
    for r in sorted(base, key=lambda r: (r["x"]["kind"], _OP_ORDER.get(r["x"]["op"], 9), r["x"]["dtype"],
                                         r["x"]["dist"], r["x"]["numel"])):
        x = r["x"]
        what = "copy_ (dst.copy_(src))" if x["kind"] == "copy" else f"MeZO-style {x['op']}"
        rows.append((what, x["dtype"], x["dist"], fsize(x["numel"]), fms(r["t"]), fnum(r["elem_s"] / 1e9),
                     fnum(r["gbs"]), fpct(r["copy_frac"]) if x["kind"] != "copy" else "100 %"))
    return table(["baseline", "dtype", "z", "N", "median", "G elem/s", "GB/s", "of copy BW"], rows)


def optim_section(records, plots_rel):
    out = []
    for dev, recs in by_device(records, "optim"):
        out += [f"### Optimizer step on {dev}", ""]
        fo = {(r["x"]["param_set"], r["x"]["opt"]): r for r in recs if r["x"]["impl"] == "fo"}
        out += [step_table(recs, fo), ""]
        if fo:
            out += ["First-order baselines (trivial closure: `loss.backward()` writes every gradient, then the "
                    "torch optimizer):", "", fo_table(fo), ""]
        out += ["Peak extra memory is measured at q = 1 (it does not depend on q), on step 2 (state allocated). "
                "Time: median over rounds (86M CPU cases: one timed round after a warm-up).", ""]
        host = [r for r in records if r["x"].get("suite") == "optim_host" and r["x"].get("device", "cpu") == dev]
        if host:
            out += [host_table(host), ""]
        if plots_rel.get(("optim", dev)):
            out += [f"![optimizer step speedup on {dev}]({plots_rel[('optim', dev)]})", ""]
    return "\n".join(out)


def host_table(recs):
    """Host work per ZO step (test_bench_optim_step.py ``test_host_*``): the step on the ViT-B
    layout with 1-4 elements per tensor, against one ``torch._foreach_add_`` over the same list
    in the same run (``host_ref``)."""
    idx = index(recs)
    rows = []
    for r in sorted((r for r in recs if r["x"]["kind"] == "zeroflow"), key=lambda r: (r["x"]["opt"], r["x"]["dist"])):
        x, base = r["x"], idx.get(r["x"].get("host_ref"))
        rows.append((x["opt"], x["dist"], x.get("backend", "—"), fms(r["t"]), fms(base["t"]) if base else "—",
                     fx(r["t"] / base["t"]) if base else "—"))
    n = recs[0]["x"].get("n_tensors")
    return "\n".join([f"Host work per step (q = 1, the ViT-B layout: {n} tensors of 1-4 elements, so the kernels "
                      "cost ~nothing):", "",
                      table(["method", "z", "backend", "step", "one foreach_add_ over the list", "step ÷ foreach"],
                            rows)])


def step_table(recs, fo):
    """zeroflow vs the MeZO recipe per (params, method, z, q), and vs FO-Adam."""
    by = defaultdict(dict)
    for r in recs:
        x = r["x"]
        if x["impl"] != "fo":
            by[(x["param_set"], x["opt"], x["dist"], x["q"])][x["impl"]] = r
    rows = []
    for (pset, kind, dist, q) in sorted(by):
        d = by[(pset, kind, dist, q)]
        z, m = d.get("zeroflow"), d.get("mezo")
        f = fo.get((pset, "fo_adam"))
        rows.append((pset, kind, dist, q, fms(z["t"]) if z else "skipped", fms(m["t"]) if m else "skipped",
                     fx(m["t"] / z["t"]) if z and m else "—", fx(f["t"] / z["t"]) if z and f else "—",
                     fmib(z["x"].get("peak_extra_bytes")) if z else "—",
                     fmib(m["x"].get("peak_extra_bytes")) if m else "—"))
    return table(["params", "method", "z", "q", "zeroflow / step", "MeZO-style / step", "speedup vs MeZO",
                  "speedup vs FO-Adam", "zeroflow peak extra", "MeZO peak extra"], rows)


def fo_table(fo):
    rows = []
    for (pset, name), r in sorted(fo.items()):
        x = r["x"]
        rows.append((pset, name, fms(r["t"]), fmib(x.get("peak_extra_bytes")), fmib(x.get("state_bytes")),
                     fmib(x.get("params_bytes"))))
    return table(["params", "method", "time / step", "peak extra (grads, temporaries)", "state", "params"], rows)


def e2e_section(records, plots_rel):
    out = []
    for dev, recs in by_device(records, "e2e"):
        x0 = recs[0]["x"]
        out += [f"### One training iteration on {dev}: `{x0['model']}`, batch {x0['batch']}, {x0['img']} px, "
                f"{x0['numel'] / 1e6:.2f}M trained parameters", ""]
        idx = {r["x"]["method"]: r for r in recs}
        fo_sgd = idx.get("fo_sgd")
        rows = []
        for r in sorted(recs, key=lambda r: (r["x"]["method"].startswith("fo_"), r["x"]["method"])):
            x = r["x"]
            tot = x.get("peak_total_bytes")
            rows.append((x["method"], x.get("forwards_per_step") or "—", fms(r["t"]),
                         fx(r["t"] / fo_sgd["t"]) if fo_sgd else "—", fmib(x.get("peak_extra_bytes")),
                         fmib(tot), fx(tot / fo_sgd["x"]["peak_total_bytes"]) if fo_sgd and tot and
                         fo_sgd["x"].get("peak_total_bytes") else "—"))
        out += [table(["method", "forwards / step", "time / iter", "time vs FO-SGD", "peak extra",
                       "peak total", "memory vs FO-SGD"], rows), ""]
        out += ["Peak total = parameters + optimizer state + the iteration's peak extra memory (activations, "
                "gradients, temporaries); on CUDA `max_memory_allocated`. The paper's Table 2 (ViT-B/16, GPU): "
                "ZO-SGD 2.41 GB vs FO-SGD 12.08 GB, ~50 % less time per iteration.", ""]
        notes = sorted({f"{r['x']['method']}: {r['x']['note']}" for r in recs if r["x"].get("note")})
        if notes:
            out += ["Notes: " + "; ".join(notes), ""]
        if plots_rel.get(("e2e", dev)):
            out += [f"![end-to-end on {dev}]({plots_rel[('e2e', dev)]})", ""]
    return "\n".join(out)


def distributed_section(records):
    """Data-parallel ZO (scalars only) vs DDP with FO gradients: bytes and time per step."""
    recs = [r for r in records if r["x"].get("suite") == "distributed"]
    if not recs:
        return ""
    idx = {r["x"]["key"]: r for r in recs}
    x0 = recs[0]["x"]
    rows = []
    for r in sorted(recs, key=lambda r: (r["x"]["world"], r["x"]["method"] != "zo_sgd", r["x"]["q"])):
        x = r["x"]
        ddp = idx.get(x.get("ddp_ref"))
        one = idx.get(x["key"].rsplit("/w", 1)[0] + "/w1")
        name = "DataParallelZO zo_sgd" + (f" q={x['q']}" if x["q"] else "") if x["method"] == "zo_sgd" \
            else "DDP + FO-SGD (gradient all-reduce)"
        rows.append((name, x["world"], f"{x['comm_bytes_per_step']:,.0f} B", f"{x['comm_calls_per_step']:g}",
                     f"{ddp['x']['comm_bytes_per_step'] / x['comm_bytes_per_step']:,.0f}×"
                     if ddp and x["method"] == "zo_sgd" and x["comm_bytes_per_step"] else "—",
                     fms(r["t"]), fx(one["t"] / r["t"]) if one and x["world"] > 1 else "—"))
    return "\n".join([
        f"### Data-parallel steps (gloo, CPU): MLP with {x0['params'] / 1e6:.2f}M parameters, global batch "
        f"{x0['global_batch']}", "",
        table(["method", "ranks", "bytes sent / step / rank", "collectives / step", "DDP bytes ÷ these",
               "time / step (rank 0)", "speed-up vs 1 rank"], rows), "",
        "Bytes are the payload handed to the collectives per rank per step (counted in "
        "`zeroflow.distributed.Comm` and in a DDP comm hook). Both ranks share this machine's 2 cores "
        "(1 torch thread each), so the 2-rank times show the protocol's overhead, not a scaling result. "
        "See docs/distributed.md.", ""])


def sweep_section(sweep, plots_rel):
    if not sweep:
        return ""
    extra = " ".join(sweep.get("extra_args") or [])
    out = ["## Query sweep (Figure 5 analogue)", "",
           f"Avg / Last / Fgt (%) of one continual run per point ({sweep.get('dataset', 'the embedded default')}"
           f"{', extra arguments `' + extra + '`' if extra else ''}; one seed) vs the number of queries q per "
           f"step, and the wall time of each run (forward passes grow as 2q). Run {sweep.get('date', '')}.", ""]
    rows = []
    res = sweep.get("results", [])
    qs = sorted({r["q"] for r in res})
    opts = sorted({r["optimizer"] for r in res})
    look = {(r["optimizer"], r["q"]): r for r in res}
    for o in opts:
        cells = []
        for q in qs:
            r = look.get((o, q))
            cells.append("—" if r is None or r.get("avg") is None else
                         f"{r['avg']:.2f} / {r['last']:.2f} / {r['fgt']:.2f}" if r.get("last") is not None
                         else f"{r['avg']:.2f}")
        rows.append([o] + cells)
        rows.append([f"{o} wall time"] + ["—" if look.get((o, q)) is None or look[(o, q)].get("wall_s") is None
                                          else f"{look[(o, q)]['wall_s']:.0f} s" for q in qs])
    out += [table(["optimizer"] + [f"q={q}" for q in qs], rows), ""]
    if sweep.get("stopped"):       # bench_query_sweep.py cut short: the missing points were not run
        out += [f"The sweep was {sweep['stopped']}: the points not in the table were not run.", ""]
    if plots_rel.get(("sweep", "")):
        out += [f"![query sweep]({plots_rel[('sweep', '')]})", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots
def make_plots(records, sweep, plots_dir, out_md):
    """PNG plots; returns {(section, device): path relative to the markdown file}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        print(f"report: matplotlib unavailable ({exc}); no plots", file=sys.stderr)
        return {}
    os.makedirs(plots_dir, exist_ok=True)
    rel = {}
    md_dir = os.path.dirname(os.path.abspath(out_md)) if out_md else os.getcwd()

    def save(fig, name, k):
        path = os.path.join(plots_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        rel[k] = os.path.relpath(os.path.abspath(path), md_dir)

    for dev, recs in by_device(records):
        name = dev.replace(":", "")
        kern = [r for r in recs if r["x"].get("suite") == "kernels"]
        if kern:
            save(plot_kernels(plt, dev, kern), f"kernels_{name}.png", ("kernels", dev))
        opt = [r for r in recs if r["x"].get("suite") == "optim" and r["x"].get("impl") == "zeroflow"
               and r.get("vs_mezo")]
        if opt:
            save(plot_optim(plt, dev, opt), f"optim_{name}.png", ("optim", dev))
        e2e = [r for r in recs if r["x"].get("suite") == "e2e"]
        if e2e:
            save(plot_e2e(plt, dev, e2e), f"e2e_{name}.png", ("e2e", dev))
    if sweep and sweep.get("results"):
        save(plot_sweep(plt, sweep), "query_sweep.png", ("sweep", ""))
    return rel


def plot_kernels(plt, dev, kern):
    """Effective GB/s of the plain fp32 kernels and the MeZO recipe at the largest size, with
    the copy bandwidth as a line."""
    n = max(r["x"]["numel"] for r in kern)
    sel = [r for r in kern if r["x"]["numel"] == n and r["x"]["dtype"] == "fp32"
           and r["x"]["variant"] in ("plain", "mezo") and r["x"]["kind"] != "capability"]
    labels, vals, colors = [], [], []
    for r in sorted(sel, key=lambda r: (r["x"]["op"], r["x"]["dist"], r["x"]["kind"], r["x"]["backend"])):
        x = r["x"]
        labels.append(f"{x['op']} {x['dist'][:5]} {'MeZO' if x['kind'] == 'mezo' else x['backend']}")
        vals.append(r["gbs"] or 0)
        colors.append("tab:gray" if x["kind"] == "mezo" else "tab:blue")
    copy = next((r for r in kern if r["x"]["kind"] == "copy" and r["x"]["numel"] == n
                 and r["x"]["dtype"] == "fp32"), None)
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) + 1.5))
    ax.barh(range(len(labels)), vals, color=colors)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    if copy:
        ax.axvline(copy["gbs"], color="tab:red", ls="--", label=f"copy_ {copy['gbs']:.1f} GB/s")
        ax.legend(fontsize=7)
    ax.set_xlabel("effective GB/s (bytes read + written)")
    ax.set_title(f"Kernels, fp32, N={fsize(n)}, {dev}", fontsize=9)
    return fig


def plot_optim(plt, dev, opt):
    """Step speedup vs the MeZO recipe against q, one line per (params, method, z)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    series = defaultdict(list)
    for r in opt:
        x = r["x"]
        series[(x["param_set"], x["opt"], x["dist"])].append((x["q"], r["vs_mezo"]))
    for k, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=" ".join(k))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("queries q")
    ax.set_ylabel("step speedup vs MeZO-style")
    ax.axhline(1, color="k", lw=0.5)
    ax.legend(fontsize=6)
    ax.set_title(f"Optimizer step, {dev}", fontsize=9)
    return fig


def plot_e2e(plt, dev, e2e):
    """Time and peak memory of one training iteration per method (FO methods last)."""
    e2e = sorted(e2e, key=lambda r: (r["x"]["method"].startswith("fo_"), r["x"]["method"]))
    names = [r["x"]["method"] for r in e2e]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    col = ["tab:orange" if n.startswith("fo_") else "tab:blue" for n in names]
    a1.barh(names, [r["t"] for r in e2e], color=col)
    a1.set_xlabel("s / iteration")
    a1.invert_yaxis()
    a2.barh(names, [(r["x"].get("peak_total_bytes") or 0) / MiB for r in e2e], color=col)
    a2.set_xlabel("peak memory, MiB")
    a2.invert_yaxis()
    a2.set_yticks([])
    fig.suptitle(f"One iteration, {e2e[0]['x']['model']} batch {e2e[0]['x']['batch']}, {dev}", fontsize=9)
    return fig


def plot_sweep(plt, sweep):
    """Avg accuracy against q, one line per optimizer."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    by = defaultdict(list)
    for r in sweep["results"]:
        if r.get("avg") is not None:
            by[r["optimizer"]].append((r["q"], r["avg"]))
    for o, pts in sorted(by.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=o)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("queries q")
    ax.set_ylabel("Avg accuracy")
    ax.legend()
    ax.set_title("Query sweep", fontsize=9)
    return fig


# ----------------------------------------------------------------------------- main
def render(paths, out, plots_dir=None, sweep_path=None, notes_path=None, title=None, targets_json=None) -> str:
    """The page (written to ``out``, if given) from the benchmark JSONs ``paths``; with
    ``plots_dir``, the plots too. The page is written once without the plots first: the plots
    take the most time (matplotlib's first import on a fresh machine builds its font cache),
    and gpu_check.sh runs the report under a limit (REPORT_LIMIT_S), which, reached while
    plotting, left no page at all."""
    records, machines = load(paths)
    derive(records)
    sweep = None
    if sweep_path and os.path.exists(sweep_path):
        with open(sweep_path) as f:
            sweep = json.load(f)
    if plots_dir and out:
        _page(records, machines, sweep, {}, paths, out, notes_path, title, targets_json)
    plots_rel = make_plots(records, sweep, plots_dir, out) if plots_dir else {}
    return _page(records, machines, sweep, plots_rel, paths, out, notes_path, title, targets_json)


def _page(records, machines, sweep, plots_rel, paths, out, notes_path, title, targets_json) -> str:
    """The page's text from the loaded records (plots linked from ``plots_rel``), written to
    ``out`` and its targets to ``targets_json`` where given."""
    fast = any(r["x"].get("fast") for r in records)
    parts = [f"# {title or 'zeroflow performance'}", "",
             "<!-- generated by `python -m benchmarks.report`; edit benchmarks/report.py or the notes file, "
             "not this page -->", ""]
    if fast:
        parts += ["> **FAST MODE results** (tiny sizes, one round, busy-machine tolerant): smoke output of the "
                  "suites, not performance numbers. Regenerate with `make bench` on a quiet machine.", ""]
    parts += ["How to reproduce: `make bench` (CPU suite, JSON in `results/`, then this page); "
              "`bash benchmarks/gpu_check.sh` on a CUDA machine (GPU subset, JSON + report in `$OUT`); "
              "`make bench-sweep` (query sweep). Times are medians; GB/s counts the bytes an op must read and "
              "write (z and the mask are regenerated in registers and cost no bytes); ratios compare against "
              "baselines measured in the same run.", ""]
    parts += [machine_section(machines), ""]
    trows = targets(records)
    if targets_json:
        with open(targets_json, "w") as f:
            json.dump([dict(zip(("device", "target", "measured", "status", "detail"), r)) for r in trows], f, indent=1)
    if trows:
        parts += ["## Targets (issue 5; reported, not asserted)", "",
                  table(["device", "target", "measured", "status", "where / detail"], trows), ""]
    if notes_path and os.path.exists(notes_path):
        with open(notes_path) as f:
            parts += ["## Analysis", "", f.read().strip(), ""]
    elif any("missed" in r[3] for r in trows):
        parts += ["> Missed targets are not analysed yet: profile them and write the findings (why, and what "
                  "would close the gap) to `benchmarks/notes.md`; `make bench-report` adds it here.", ""]
    body = [kernel_section(records, plots_rel), optim_section(records, plots_rel), e2e_section(records, plots_rel),
            llm_section(records), distributed_section(records)]
    if any(body):
        parts += ["## Results", ""] + [b for b in body if b]
    sw = sweep_section(sweep, plots_rel)
    if sw:
        parts += [sw]
    skipped = _skips(paths, {m["_path"] for m in machines})
    if skipped:
        parts += ["## Not measured in this run", "", *[f"- {s}" for s in skipped], ""]
    text = "\n".join(parts).rstrip() + "\n"
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
    return text


def _skips(paths, read):
    """What a run did not measure: benchmark JSONs without results (empty or unreadable: not
    among ``read``, the paths :func:`load` read), and the skipped, failed and erroring cases
    recorded next to a JSON (``<json>.skips.txt``, written by the Makefile / gpu_check.sh from
    pytest's -rfEs summary), if any."""
    out = []
    for p in paths:
        if p not in read:
            size = os.path.getsize(p) if os.path.exists(p) else None
            out.append(f"{os.path.basename(p)}: no results ("
                       + ("missing" if size is None else "empty: every case skipped or deselected" if size == 0
                          else "not a benchmark JSON") + ")")
        sp = p + ".skips.txt"
        if os.path.exists(sp):
            with open(sp) as f:
                for line in f:
                    line = line.strip()
                    if line.startswith(("SKIPPED", "FAILED", "ERROR")):
                        out.append(line)
    return list(OrderedDict.fromkeys(out))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    ap.add_argument("--out", default="docs/performance.md", help="markdown to write (default docs/performance.md)")
    ap.add_argument("--plots", default=None, help="folder for PNG plots (default: none)")
    ap.add_argument("--sweep", default=None, help="query sweep JSON (benchmarks/bench_query_sweep.py)")
    ap.add_argument("--notes", default=None, help="markdown appended as the Analysis section")
    ap.add_argument("--title", default=None)
    ap.add_argument("--targets-json", default=None, help="also write the targets table as JSON (gpu_check.sh)")
    a = ap.parse_args(argv)
    missing = [p for p in a.json if not os.path.exists(p)]
    for p in missing:
        print(f"report: {p} not found, ignored", file=sys.stderr)
    if len(missing) == len(a.json):
        ap.error("no JSON file found")
    try:        # the missing ones too: the page names them under "Not measured in this run"
        render(a.json, a.out, a.plots, a.sweep, a.notes, a.title, a.targets_json)
    except MixedRuns as e:          # refused by load(), before anything is written
        ap.error(str(e))
    print(f"report: wrote {a.out}" + (f" and plots in {a.plots}" if a.plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
