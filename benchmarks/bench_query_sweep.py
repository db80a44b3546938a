"""Query sweep (the ZeroFlow paper's Figure 5 analogue): Avg accuracy of the continual run on
the embedded default data set vs the number of queries q, for ZO-SGD and ZO-Adam.

    python -m benchmarks.bench_query_sweep [--qs 1,2,4,8,16,32] [--optimizers zo_sgd,zo_adam]
        [--out results/query_sweep.json] [--workdir results/sweep] [--plot docs/perf/query_sweep.png]
        [--extra "--epochs 2"] [--dry-run]

Each point is one ``zeroflow run --optimizer NAME --q Q --out DIR`` (DIR/metrics.json, key
"avg"). A point whose folder already holds a run of the same configuration (as ``zeroflow
sweep`` decides it: every option but the operational ones, ``--extra`` included) is reused when
finished and resumed when unfinished; a folder holding another configuration, a damaged run or
one in progress is refused with the reason, never reused (delete DIR or choose another
--workdir). A run's warnings are shown as they come, each with its point's folder, and kept in
its record ("warnings"). Every point is checked before the first run starts; ``--extra`` may not set what the
sweep sets per point (--optimizer, --q, --out, --resume, --force, --stop-after). The report
includes the result with ``python -m benchmarks.report ... --sweep results/query_sweep.json``.
Ctrl-C or a SIGTERM writes the points finished so far, the JSON's "stopped" saying where it
stopped (exit 130 / 143); the same command again reuses them and resumes the rest.
On 2 CPU cores a run takes 10 s (q = 1) to ~100 s (q = 32) with the backbone cached, ~7.5 min
for the full sweep of 12 runs (measured 2026-11-30): it is not part of ``make bench``
(``make bench-sweep``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time

from zeroflow.continual.errors import ZeroflowError
from zeroflow.continual.runfolder import METRICS, UNRECORDED, conflict, inspect, lock_holder, results_version


def runner_cmd() -> list[str]:
    """This interpreter's zeroflow, the one whose configuration rules decided the plan (a
    ``zeroflow`` script on PATH may belong to another environment or checkout)."""
    return [sys.executable, "-m", "zeroflow"]


def run_args(opt: str, q: int, d: str, extra: list[str]) -> list[str]:
    return ["run", "--optimizer", opt, "--q", str(q), "--out", d] + extra


# what the sweep itself sets per point, and the option of the sweep to use instead
SWEEP_SETS = {"optimizer": "--optimizers", "q": "--qs", "out": "--workdir", "resume": None, "force": None,
              "stop_after": None}


def check_extra(extra: list[str]) -> None:
    """Refuse an ``--extra`` that ``zeroflow run`` would reject, or that sets what the sweep sets
    per point: ``--extra "--q 2"`` once ran q = 2 in every point's folder and published it as
    q = 1, 2, 4, ... (the last flag wins in argparse). Raises ZeroflowError naming --extra."""
    from zeroflow.cli import build_parser

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            given = build_parser().parse_args(["run"] + extra)
    except SystemExit:     # argparse's own message, without the usage screen it comes with
        why = said.getvalue().strip().splitlines()[-1:] or ["not accepted"]
        reason = re.sub(r" \(see zeroflow( run)? --help\)$", "", re.sub(r"^zeroflow( run)?: error: ", "", why[0]))
        raise ZeroflowError(f"--extra {shlex.join(extra)!r}: {reason} "
                            "(see python -m zeroflow run --help)") from None
    for dest, instead in SWEEP_SETS.items():
        if getattr(given, dest) not in (None, False):
            flag = "--" + dest.replace("_", "-")
            fix = f"use the sweep's {instead}" if instead else "the sweep decides it per point (reuse, resume)"
            raise ZeroflowError(f"--extra may not set {flag} (it gives {flag} {getattr(given, dest)}): {fix}")


def requested_config(args: list[str]) -> dict:
    """The configuration ``zeroflow <args>`` resolves to (``zeroflow run``'s own parser and
    defaults): what a folder's saved configuration must match to be reused."""
    from zeroflow.cli import _overrides, build_parser
    from zeroflow.continual.defaults import resolve

    a = build_parser().parse_args(args)
    return resolve(_overrides(a), a.config)


def plan_point(opt: str, q: int, workdir: str, extra: list[str]) -> dict:
    """What the point's folder holds, decided before anything runs: ``action`` is "reuse"
    (a finished run of this configuration), "resume" (an unfinished one), "run" (nothing
    there yet) or "refuse" (another configuration, a damaged run, a run in progress:
    ``error`` says which and what to do)."""
    d = os.path.join(workdir, f"{opt}_q{q}")
    point = {"optimizer": opt, "q": q, "dir": d}
    requested = requested_config(run_args(opt, q, d, extra))     # checks the options of every point
    holder = lock_holder(d)
    if holder:
        return point | {"action": "refuse", "error": f"{d} is in use by {holder}; wait until it has finished"}
    state, why = conflict(d, requested)
    if why:
        return point | {"action": "refuse", "error": f"{why}; delete {d} or choose another --workdir"}
    if state.kind == "finished":
        return point | {"action": "reuse", "metrics": state.metrics}
    return point | {"action": "resume" if state.kind == "unfinished" else "run"}


# What a child `zeroflow run` warned of, in its stderr among the progress bars: its own
# warnings (runner.warn_stderr) and Python's (the first line of each, "file:line: XWarning: ...").
_WARNING_LINE = re.compile(r"^zeroflow: warning: |^\S.*:\d+: \w*Warning: ")


def child_warnings(stderr: str) -> list[str]:
    return [line.strip() for line in (stderr or "").splitlines() if _WARNING_LINE.search(line)]


def run_point(point: dict, extra: list[str], dry: bool, timeout: float | None) -> dict:
    """The sweep's record of one planned point: its metrics, or an ``error``."""
    d = point["dir"]
    rec = {k: point[k] for k in ("optimizer", "q", "dir")}
    if point["action"] == "refuse":
        return rec | {"error": point["error"]}
    m = point.get("metrics")
    if m is None:
        resume = ["--resume"] if point["action"] == "resume" else []
        cmd = runner_cmd() + run_args(point["optimizer"], point["q"], d, extra) + resume
        rec["cmd"] = " ".join(shlex.quote(c) for c in cmd)
        print("sweep:", rec["cmd"], flush=True)
        if dry:
            return rec
        env = dict(os.environ)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([os.path.join(here, "python"), here, env.get("PYTHONPATH", "")])
        t0 = time.time()
        try:
            p = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            rec["error"] = f"timed out after {timeout} s"
            return rec
        rec["wall_s"] = round(time.time() - t0, 1)
        said = child_warnings(p.stderr)
        if said:        # kept with the point and shown now: they qualify its numbers (were dropped)
            rec["warnings"] = said
            for w in said:
                print(f"sweep: {d}: {w}", file=sys.stderr, flush=True)
        if p.returncode != 0:
            rec["error"] = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]
            rec["error"] = rec["error"][0]
            return rec
        state = inspect(d)
        if state.kind != "finished":
            rec["error"] = state.problem or f"{d}/metrics.json was not written"
            return rec
        m = state.metrics
    else:
        unknown = results_version(m, os.path.join(d, METRICS)) is None
        print(f"sweep: reusing {d} (a finished run of the same configuration"
              f"{', whose metrics.json records ' + UNRECORDED if unknown else ''})", flush=True)
    rec["avg"] = m.get("avg")
    # metrics.json's own keys (it has no "forgetting" or "runtime_s": copying those names kept
    # nothing); "seconds", the run's training time, is the only time a reused point has
    for k in ("last", "fgt", "seconds", "forward_passes", "peak_memory_bytes"):
        if k in m:
            rec[k] = m[k]
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_query_sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--qs", default="1,2,4,8,16,32")
    ap.add_argument("--optimizers", default="zo_sgd,zo_adam")
    ap.add_argument("--out", default="results/query_sweep.json")
    ap.add_argument("--workdir", default="results/sweep")
    ap.add_argument("--plot", default=None, help="also write the PNG plot here")
    ap.add_argument("--extra", default="", help="extra arguments for `zeroflow run` (quoted string)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = ap.parse_args(argv)
    try:
        qs = [int(q) for q in a.qs.split(",") if q.strip()]
    except ValueError:
        ap.error(f"--qs takes comma-separated integers, e.g. 1,2,4 (got {a.qs!r})")
    opts = [o.strip() for o in a.optimizers.split(",") if o.strip()]
    if not qs or not opts:
        ap.error("--qs and --optimizers each need at least one value")
    # a value given twice is one folder planned twice: both planned "run" before either ran, so
    # the second ran again over the first's finished run and the results listed the point twice
    for flag, vals in (("--qs", qs), ("--optimizers", opts)):
        twice = sorted({str(v) for v in vals if vals.count(v) > 1})
        if twice:
            ap.error(f"{flag} lists {', '.join(twice)} more than once; give each value once")
    if a.timeout is not None and not a.timeout > 0:
        ap.error(f"--timeout must be > 0 seconds (got {a.timeout:g}; leave it out for no limit)")
    extra = shlex.split(a.extra)
    try:     # every point checked before the first run: a bad --extra or option costs no run
        check_extra(extra)
        plan = [plan_point(o, q, a.workdir, extra) for o in opts for q in qs]
    except ZeroflowError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    for point in plan:
        if point["action"] == "refuse":
            print(f"sweep: refusing a point: {point['error']}", file=sys.stderr, flush=True)
    # Ctrl-C, or a SIGTERM (a plain `timeout`, a lease's limit), taken as Ctrl-C: the points
    # finished so far are still written (they were all lost, the JSON written after the last
    # point), the run in progress is left resumable in its folder and resumed by the next sweep.
    # Imported here: benchmarks._common imports torch, which the plan and --help do not need.
    from benchmarks._common import StopSignals, write_json

    results, stopped = [], None
    with StopSignals() as signals:
        try:
            for point in plan:
                results.append(run_point(point, extra, a.dry_run, a.timeout))
        except KeyboardInterrupt:
            stopped = f"stopped ({signals.name}) after {len(results)} of {len(plan)} points"
            print(f"sweep: {stopped}; the next sweep with the same options resumes the rest", file=sys.stderr,
                  flush=True)
    out = {"description": "Avg accuracy (zeroflow run, embedded default data set) vs queries q.",
           "dataset": "embedded default (`zeroflow run` defaults)", "extra_args": extra,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "results": results}
    if stopped:
        out["stopped"] = stopped        # the report says so under the table
    if a.dry_run:
        return signals.exit_status if stopped else 1 if any(r.get("error") for r in results) else 0
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    write_json(a.out, out)
    print(f"sweep: wrote {a.out}")
    for r in results:
        error = f"  ERROR {r['error']}" if r.get("error") else ""
        print(f"  {r['optimizer']:8s} q={r['q']:<3d} avg={r.get('avg')}{error}")
    if a.plot:
        from benchmarks.report import make_plots

        d = os.path.dirname(os.path.abspath(a.plot))
        rel = make_plots([], out, d, None)
        src = os.path.join(d, "query_sweep.png")
        if os.path.abspath(src) != os.path.abspath(a.plot) and os.path.exists(src):
            os.replace(src, a.plot)
        print(f"sweep: plot {a.plot}" if rel else "sweep: no plot (matplotlib missing)")
    if stopped:
        return signals.exit_status
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
