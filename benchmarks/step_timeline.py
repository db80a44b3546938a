"""Where a ZO optimizer step's time goes (issue 13 item 2): a profiler timeline of back-to-back
steps on the ViT-B/16 parameter list, split into the device's busy time (per launching op) and
its idle time, and the idle time into what the host was doing meanwhile.

The ZO-SGD step on that list measured 1.61x its 3-pass roofline on the H200 (0.81 ms against
0.50 ms, notes.md). Its kernels alone account for ~0.56 ms; the rest was *inferred* to be the
two ``loss.item()`` synchronisations and the host work that follows each. This script measures
it: a torch.profiler trace (CPU + CUDA activity) of ``--steps`` steps, each step's period (from
its start to the next step's start, so the update's tail overlapping the next step's host work
counts once), the union of device activity in it (kernels, copies, memsets), and each idle
stretch attributed to one host category, in this order of precedence:

  loss read   ``aten::item`` / ``aten::_local_scalar_dense``: waiting for the loss (the sync)
  runtime     CUDA runtime / driver calls (launches, copies issued)
  zf op       the host side of a ``zfkernels::`` op call (binding, checks, tables; on the CPU
              backend the kernel itself, which runs inside the call)
  torch ops   any other torch op (the closure's forward, the optimizer's tensor calls)
  python      covered by no op: the optimizer's Python, torch.optim's step wrapper

and, per loss read, the host's time from its return to the start of the next ``zfkernels::``
op (``read_to_op_us``, one entry per read of a step, in order): on a GPU the device idles
through it, as the op it waits for is the next launch; here it is the optimizer's Python that
follows a read.

The same run times ``copy_`` of one flat buffer of the list's size (the pass at copy
bandwidth) and the steps without the profiler, which adds host work of its own to every op
(on this repository's CPU: 320 -> 336 us per tiny-layout ZO-SGD step, counted as Python).

    python -m benchmarks.step_timeline [--device cuda] [--layout vit_b] [--steps 10]
        [--cases zo_sgd-rademacher,...] [--backend auto] [--json FILE] [--trace-dir DIR]

On the CPU it runs too (CI keeps it from rotting): there is no asynchronous device, so a step
is all idle time and the breakdown is the host's.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import statistics
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import zfkernels
from zeroflow.optim import create, train_step

from benchmarks import _common as C
from benchmarks._common import write_json
from benchmarks.profile_kernels import median_ms as cuda_median_ms

STEP_MARK, END_MARK = "zf_timeline_step", "zf_timeline_end"
DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
RUNTIME_CATS = {"cuda_runtime", "cuda_driver"}
LOSS_READ_OPS = {"aten::item", "aten::_local_scalar_dense"}
CATEGORIES = ("loss read", "runtime", "zf op", "torch ops", "python")
# Parameter passes at copy bandwidth per step (q = 1; notes.md "Optimizer step"): ZO-SGD
# perturb +eps, perturb -2eps, the update with the restore fused (3 reads + 3 writes of theta);
# ZO-Adam the same two perturbs plus an update that reads and writes theta, m and v (3 passes).
PASSES = {"zo_sgd": 3, "zo_adam": 5}
LR, EPS = 1e-6, 1e-3
LAYOUTS = ("vit_b", "vit_b_tiny")


# ------------------------------------------------------------------------- interval arithmetic
# Lists of disjoint, sorted (start, end) pairs; times in microseconds as the trace gives them.
def union(spans) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def intersect(xs, ys) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(xs, ys) -> list[tuple[float, float]]:
    """xs minus ys (both unions)."""
    out = []
    for a, b in xs:
        cur = a
        for c, d in ys:
            if d <= cur or c >= b:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return out


def length(spans) -> float:
    return sum(b - a for a, b in spans)


# ------------------------------------------------------------------------------------ analysis
def read_trace(path: str) -> list[dict]:
    """The complete ('X') events of a Chrome trace written by ``torch.profiler``."""
    with open(path) as f:
        doc = json.load(f)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    return [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]


def short_kernel_name(name: str) -> str:
    """``void ns::multi_tensor_kernel<ns::SgdFunctor<float, 1>, 4>(Common, Args)`` ->
    ``multi_tensor_kernel<SgdFunctor>``: the function and its first template argument."""
    head = re.sub(r"^void ", "", name).split("(")[0]
    if "<" not in head:
        return head.split("::")[-1]
    fn, rest = head.split("<", 1)
    first = re.split(r"[<,>]", rest)[0].strip().split("::")[-1]
    return f"{fn.split('::')[-1]}<{first}>"


def _launcher_labels(events: list[dict]) -> dict[int, str]:
    """Correlation id -> the innermost host op around the runtime call that launched it."""
    ops = [e for e in events if e.get("cat", "").lower() == "cpu_op"]
    labels = {}
    for e in events:
        corr = (e.get("args") or {}).get("correlation")
        if e.get("cat", "").lower() not in RUNTIME_CATS or corr is None:
            continue
        t, tid = e["ts"], e.get("tid")
        around = [o for o in ops if o.get("tid") == tid and o["ts"] <= t <= o["ts"] + o["dur"]]
        if around:
            labels[corr] = max(around, key=lambda o: o["ts"])["name"]
    return labels


def analyse(events: list[dict]) -> dict:
    """Per step: period, device busy (by launching op) and idle (by host category), in us.

    A step's period runs from its ``STEP_MARK`` annotation's start to the next one's (the last
    to the ``END_MARK``'s start, recorded after a device synchronisation)."""
    marks = sorted(e["ts"] for e in events if e["name"] == STEP_MARK and e.get("cat", "").lower() == "user_annotation")
    ends = [e["ts"] for e in events if e["name"] == END_MARK and e.get("cat", "").lower() == "user_annotation"]
    if not marks or not ends:
        raise ValueError(f"the trace has no '{STEP_MARK}' / '{END_MARK}' annotations: not a step_timeline trace")
    bounds = marks + [max(ends)]
    labels = _launcher_labels(events)
    device = [e for e in events if e.get("cat", "").lower() in DEVICE_CATS]
    host = {cat: [] for cat in CATEGORIES[:-1]}
    for e in events:
        cat, span = e.get("cat", "").lower(), (e["ts"], e["ts"] + e["dur"])
        if cat == "cpu_op" and e["name"] in LOSS_READ_OPS:
            host["loss read"].append(span)
        elif cat in RUNTIME_CATS:
            host["runtime"].append(span)
        elif cat == "cpu_op" and e["name"].startswith("zfkernels::"):
            host["zf op"].append(span)
        elif cat == "cpu_op":
            host["torch ops"].append(span)
    host = {k: union(v) for k, v in host.items()}
    device_busy = union((e["ts"], e["ts"] + e["dur"]) for e in device)
    zf_starts = sorted(e["ts"] for e in events
                       if e.get("cat", "").lower() == "cpu_op" and e["name"].startswith("zfkernels::"))
    steps = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        period = [(a, b)]
        busy_by: dict[str, list[float]] = {}
        for e in device:
            clipped = length(intersect([(e["ts"], e["ts"] + e["dur"])], period))
            if clipped > 0:
                label = labels.get((e.get("args") or {}).get("correlation"), short_kernel_name(e["name"]))
                busy_by.setdefault(label, []).append(clipped)
        busy = intersect(device_busy, period)
        idle = subtract(period, busy)
        idle_by, left = {}, idle
        for cat in CATEGORIES[:-1]:
            covered = intersect(left, host[cat])
            idle_by[cat] = length(covered)
            left = subtract(left, covered)
        idle_by["python"] = length(left)
        steps.append({"period_us": b - a, "busy_us": length(busy), "idle_us": length(idle), "idle_by_us": idle_by,
                      "busy_by": {k: {"us": sum(v), "launches": len(v)} for k, v in busy_by.items()},
                      "read_to_op_us": read_to_op(host["loss read"], zf_starts, a, b)})
    return {"steps": steps, "median": _median_step(steps)}


def read_to_op(reads, op_starts, a: float, b: float) -> list[float]:
    """For each loss read (``reads``: their union) that starts in the step ``[a, b)``, the time
    from its end to the start of the next zfkernels op (``op_starts``: sorted) in the step;
    none for a read that no op follows there."""
    out = []
    for start, end in reads:
        if a <= start < b:
            k = bisect.bisect_left(op_starts, end)
            if k < len(op_starts) and op_starts[k] < b:
                out.append(op_starts[k] - end)
    return out


def median_per_read(per_step: list[list[float]]) -> list[float]:
    """Per read of a step, in order, the median over the steps that have that many reads
    (``per_step``: each step's values, one per read)."""
    n = max(map(len, per_step), default=0)
    return [statistics.median(v[k] for v in per_step if len(v) > k) for k in range(n)]


def _median_step(steps: list[dict]) -> dict:
    med = statistics.median
    labels = sorted({k for s in steps for k in s["busy_by"]})
    return {
        "period_us": med(s["period_us"] for s in steps),
        "busy_us": med(s["busy_us"] for s in steps),
        "idle_us": med(s["idle_us"] for s in steps),
        "idle_by_us": {c: med(s["idle_by_us"][c] for s in steps) for c in CATEGORIES},
        "read_to_op_us": median_per_read([s["read_to_op_us"] for s in steps]),
        "busy_by": {k: {"us": med(s["busy_by"].get(k, {"us": 0.0})["us"] for s in steps),
                        "launches": med(s["busy_by"].get(k, {"launches": 0})["launches"] for s in steps)}
                    for k in labels},
    }


# --------------------------------------------------------------------------------- measurement
def _shapes(layout: str) -> list[tuple[int, ...]]:
    """vit_b: timm vit_base_patch16_224's 152 tensors; vit_b_tiny: the same layout with 1-4
    elements a tensor (host work alone)."""
    return C.vit_b_shapes() if layout == "vit_b" else C.vit_b_layout_tiny_shapes()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median_ms(fn, dev: torch.device, reps: int, back_to_back: int = 5) -> float:
    """Median wall time of ``fn``; on CUDA profile_kernels' CUDA-event timing of ``back_to_back``
    calls, so that neither the host's wait for the device nor the launch of the first call
    counts against a 0.2 ms copy_."""
    if dev.type == "cuda":
        return cuda_median_ms(fn, reps, back_to_back)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class _ReadNoted(torch.Tensor):
    """A loss whose ``.item()`` notes the time it returned (:func:`read_to_op_unprofiled`)."""
    __torch_function__ = torch._C._disabled_torch_function_impl
    notes: list | None = None

    def item(self):
        v = torch.Tensor.item(self)
        _ReadNoted.notes.append(("read", time.perf_counter_ns()))
        return v


def read_to_op_unprofiled(opt, closure, steps: int) -> list[float]:
    """``read_to_op_us`` without the profiler, which adds its own host work to both ends of the
    stretch (~10 us a read on this CPU): per read of a step, the median wall time in us from the
    read's return to the entry of the next compiled zfkernels op (the cpu and cuda backends';
    none for triton and torch), over ``steps`` steps. The closure's loss notes its read, and the
    ops are wrapped in the ``torch.ops.zfkernels`` namespace for these steps only."""
    ns, notes = torch.ops.zfkernels, []
    real = {op: getattr(ns, op) for op in ("perturb_", "zo_sgd_update_", "zo_adam_update_")}

    def wrap(fn):
        def entry(*args):
            notes.append(("op", time.perf_counter_ns()))
            return fn(*args)
        return entry

    for op, fn in real.items():
        setattr(ns, op, wrap(fn))
    _ReadNoted.notes = notes
    gaps: list[list[float]] = []
    try:
        for _ in range(steps):
            notes.clear()
            train_step(opt, lambda: closure().as_subclass(_ReadNoted))
            gaps.append([(notes[k + 1][1] - t) / 1e3 for k, (what, t) in enumerate(notes)
                         if what == "read" and k + 1 < len(notes) and notes[k + 1][0] == "op"])
    finally:
        for op, fn in real.items():
            setattr(ns, op, fn)
        _ReadNoted.notes = None
    return median_per_read(gaps)


def run_case(opt_name: str, dist: str, dev: torch.device, layout: str, steps: int, backend: str,
             trace_dir: str) -> dict:
    params = C.make_params(_shapes(layout), dev=dev, requires_grad=True)
    closure = C.trivial_closure(params, grad=False)
    opt = create(opt_name, params, lr=LR, q=1, perturbation=dist, zo_eps=EPS, backend=backend, seed=1234)
    for _ in range(3):   # warm-up: Adam's moments, the launch-table cache, Triton's compiles
        train_step(opt, closure)

    def run(k):
        for _ in range(k):
            train_step(opt, closure)

    unprofiled_ms = _median_ms(lambda: run(steps), dev, reps=3, back_to_back=1) / steps   # steps: back to back
    read_to_op_us = read_to_op_unprofiled(opt, closure, max(steps, 20))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    _sync(dev)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP_MARK):
                train_step(opt, closure)
        _sync(dev)
        with record_function(END_MARK):
            pass
    path = os.path.join(trace_dir, f"{opt_name}-{dist}.json")
    prof.export_chrome_trace(path)
    result = analyse(read_trace(path))
    result.update(read_to_op_unprofiled_us=read_to_op_us)
    result.update(case=f"{opt_name}-{dist}", opt=opt_name, dist=dist, unprofiled_step_us=unprofiled_ms * 1e3,
                  backend=zfkernels.resolve_backend(backend, dev), trace=path)
    return result


def copy_pass_us(numel: int, dtype: torch.dtype, dev: torch.device) -> float:
    src = torch.randn(numel, device=dev).to(dtype)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return _median_ms(lambda: dst.copy_(src), dev, reps=20) * 1e3


def render_header(h: dict) -> str:
    """The report's first lines: the run's setup and the table's column heads."""
    return (f"step timeline: {h['device_name']}, layout {h['layout']} ({h['numel'] / 1e6:.1f}M fp32 parameters in "
            f"{h['n_tensors']} tensors), backend {h['backend']}, q = 1, {h['steps']} steps profiled; copy_ of one "
            f"pass: {h['copy_pass_us']:.1f} us\n"
            f"{'case':22s} {'step us':>8s} {'unprof':>8s} {'roofline':>8s} {'ratio':>6s} | {'busy':>7s} {'idle':>7s}"
            " | idle: " + "  ".join(f"{c:>9s}" for c in CATEGORIES) + "\n")


def render_case(r: dict) -> str:
    """One case's lines of the table."""
    m = r["median"]
    lines = [f"{r['case']:22s} {m['period_us']:8.1f} {r['unprofiled_step_us']:8.1f} {r['roofline_us']:8.1f} "
             f"{r['ratio']:5.2f}x | {m['busy_us']:7.1f} {m['idle_us']:7.1f} |       "
             + "  ".join(f"{m['idle_by_us'][c]:9.1f}" for c in CATEGORIES)]
    if m.get("read_to_op_us"):
        unprof = r.get("read_to_op_unprofiled_us")
        lines.append("    host from each loss read's return to the next zfkernels op: "
                     + ", ".join(f"{v:.1f}" for v in m["read_to_op_us"]) + " us"
                     + (" (unprofiled " + ", ".join(f"{v:.1f}" for v in unprof) + " us)" if unprof else ""))
    busy = sorted(m["busy_by"].items(), key=lambda kv: -kv[1]["us"])
    if busy:
        lines.append("    busy by launching op: " + ", ".join(
            f"{k} {v['us']:.1f} us ({v['launches']:g}x)" for k, v in busy))
    else:
        lines.append("    no device activity recorded (no asynchronous device: every op ran on the host)")
    return "\n".join(lines) + "\n"


def render_footer(h: dict) -> str:
    """The report's last lines: where it stopped, what the columns mean."""
    lines = [f"{h['stopped']}: the cases not listed were not measured"] if h.get("stopped") else []
    lines.append("us per step, medians over the profiled steps; 'unprof' and 'ratio': the same steps without the "
                 f"profiler, against {'/'.join(f'{k} {v}' for k, v in PASSES.items())} passes at copy_ bandwidth")
    return "\n".join(lines) + "\n"


def render(report: dict) -> str:
    return (render_header(report["header"]) + "".join(render_case(r) for r in report["cases"])
            + render_footer(report["header"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_timeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layout", choices=LAYOUTS, default="vit_b")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cases", default="zo_sgd-rademacher,zo_sgd-gaussian,zo_adam-rademacher,zo_adam-gaussian",
                    help="comma-separated <optimizer>-<dist>, optimizer in " + ", ".join(PASSES))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json", help="also write the report (every step's numbers) here")
    ap.add_argument("--trace-dir", help="keep the Chrome traces here (default: a temporary folder, removed)")
    a = ap.parse_args(argv)
    cases = [c.split("-", 1) for c in a.cases.split(",")]
    for c in cases:
        if len(c) != 2 or c[0] not in PASSES or c[1] not in C.DISTS:
            ap.error(f"--cases: '{'-'.join(c)}' is not <optimizer>-<dist> with optimizer in {sorted(PASSES)} "
                     f"and dist in {sorted(C.DISTS)}")
    if a.steps < 2:
        ap.error("--steps must be at least 2 (the median of one step is that step)")
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device; use --device cpu")
    if a.json:      # its folder made now: a missing one lost the JSON after every case had run
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    shapes = _shapes(a.layout)
    numel = sum(torch.Size(s).numel() for s in shapes)
    results, stopped = [], None
    report = {"header": {"device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                         "layout": a.layout, "numel": numel, "n_tensors": len(shapes), "steps": a.steps},
              "cases": results}
    header = report["header"]
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = a.trace_dir or tmp
        os.makedirs(trace_dir, exist_ok=True)
        # gpu_check.sh stops a run at its limit with SIGINT: the cases done so far are still
        # reported (they were all lost, the text and the JSON written only after the last case).
        # The copy_ pass is timed first: timed after the cases, a SIGINT during it lost them all,
        # and after a stop the report needs no more device work.
        # A SIGTERM (a plain `timeout`, a lease's limit) is taken as a SIGINT is.
        # Each case is written as it finishes (its lines flushed to stdout, the JSON replaced
        # whole): a SIGKILL (a lease's hard limit, the OOM killer) lost every case measured.
        with C.StopSignals() as signals:
            try:
                copy_us = copy_pass_us(numel, torch.float32, dev)
                header["copy_pass_us"] = copy_us
                for k, (o, d) in enumerate(cases):
                    r = run_case(o, d, dev, a.layout, a.steps, a.backend, trace_dir)
                    r["roofline_us"] = PASSES[r["opt"]] * copy_us
                    r["ratio"] = r["unprofiled_step_us"] / r["roofline_us"]
                    if not a.trace_dir:
                        del r["trace"]     # removed with the temporary folder
                    results.append(r)
                    if k == 0:
                        header["backend"] = r["backend"]
                        _say(render_header(header))
                    _say(render_case(r))
                    if a.json:
                        # what a run killed outright says of itself; replaced by the last write
                        header["stopped"] = (f"unfinished after {len(results)} of {len(cases)} cases (the run was "
                                             f"killed, or is still running)") if len(results) < len(cases) else None
                        write_json(a.json, {**report, "header": {k2: v for k2, v in header.items() if v is not None}})
            except KeyboardInterrupt:
                stopped = f"stopped ({signals.name}) after {len(results)} of {len(cases)} cases"
                print(f"step timeline, layout {a.layout}: {stopped}", file=sys.stderr)
    header["stopped"] = stopped
    if not results:
        return signals.exit_status
    report["header"] = {k: v for k, v in header.items() if v is not None}
    _say(render_footer(report["header"]))
    if a.json:
        write_json(a.json, report)
    return signals.exit_status if stopped else 0


def _say(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
