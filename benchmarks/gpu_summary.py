"""The one-screen summary of benchmarks/gpu_check.sh: tests passed / failed / crashed with
their names, the crash probe, each target with its measured value, and where the minutes
went. Writes ``summary.json`` (machine-readable) and ``summary.txt`` (what it prints).

    python -m benchmarks.gpu_summary --work DIR --out-json F --out-text F

DIR is gpu_check.sh's work folder: ``tests*.xml`` (pytest --junitxml), ``targets.json``
(benchmarks.report --targets-json), ``phases.tsv`` (phase, seconds, status), ``env.json``
and ``logs/crash_probe/summary.txt``. Import-light: no torch.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

# A process killed by a signal: "exit code -11" (Python's), "exit code 139" (a shell's 128 + 11).
# "exit code 1" is a process that failed, as the distributed suite's rank-1 helper reports it.
CRASH = re.compile(r"(worker '?gw\d+'? crashed|node down|Fatal Python error|Segmentation fault"
                   r"|exit code (-\d+|129|1[3-5]\d)\b)", re.IGNORECASE)


def read_junit(paths: list[str]) -> dict:
    """Test outcomes from junit XML files: counts and the names of the non-passing tests."""
    out = {"passed": 0, "failed": [], "crashed": [], "errors": [], "skipped": 0}
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as exc:
            out["errors"].append({"name": os.path.basename(path), "message": f"unreadable junit XML: {exc}"})
            continue
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            if bad is not None:
                msg = (bad.get("message") or bad.text or "").strip().splitlines()
                first = msg[0][:240] if msg else ""
                kind = "crashed" if CRASH.search(bad.get("message") or "") or CRASH.search(bad.text or "") else (
                    "failed" if bad.tag == "failure" else "errors")
                out[kind].append({"name": name, "message": first})
            elif case.find("skipped") is not None:
                out["skipped"] += 1
            else:
                out["passed"] += 1
    return out


def _load(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _lines(path) -> list:
    """The lines of a text file, or [] when there is none."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().splitlines()


def summarize(work: str) -> dict:
    phases = []
    if os.path.exists(os.path.join(work, "phases.tsv")):
        with open(os.path.join(work, "phases.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    phases.append({"phase": parts[0], "seconds": int(parts[1]), "status": parts[2]})
    probe = os.path.join(work, "logs", "crash_probe", "summary.txt")
    return {
        "env": _load(os.path.join(work, "env.json"), {}),
        "phases": phases,
        "total_seconds": sum(p["seconds"] for p in phases),
        "tests": read_junit(sorted(glob.glob(os.path.join(work, "tests*.xml")))),
        "crash_probe": _lines(probe),
        "targets": _load(os.path.join(work, "targets.json"), []),
        "timelines": [_load(p, {}) for p in sorted(glob.glob(os.path.join(work, "bench", "step_timeline_*.json")))],
    }


def render(s: dict) -> str:
    e = s["env"]
    t = s["tests"]
    lines = [f"zeroflow GPU check: {e.get('gpu', '?')} | torch {e.get('torch', '?')} | triton {e.get('triton', '?')}"
             f" | numpy {e.get('numpy', '?')} | commit {e.get('commit', '?')}",
             "phases: " + ", ".join(f"{p['phase']} {p['seconds']} s ({p['status']})" for p in s["phases"])
             + f" | total {s['total_seconds']} s",
             f"tests: {t['passed']} passed, {len(t['failed'])} failed, {len(t['crashed'])} crashed, "
             f"{len(t['errors'])} errors, {t['skipped']} skipped"]
    for kind in ("crashed", "failed", "errors"):
        for item in t[kind][:25]:
            lines.append(f"  {kind.upper()} {item['name']}: {item['message']}")
        if len(t[kind]) > 25:
            lines.append(f"  ... and {len(t[kind]) - 25} more {kind} (gpu_logs.tar.gz: tests.log)")
    if s["crash_probe"]:
        lines.append("crash probe (this build):")
        lines += [f"  {ln}" for ln in s["crash_probe"] if ln.startswith("probe ")]
    if s["targets"]:
        lines.append("targets:")
        for r in s["targets"]:
            lines.append(f"  [{r['status']}] {r['target']}: {r['measured']} ({r['detail']})")
    timelines = [t for t in s.get("timelines", []) if t.get("cases")]
    if timelines:
        lines.append("step timelines (us per step, medians; benchmarks/step_timeline.py):")
        for t in timelines:
            if t["header"].get("stopped"):    # a run cut at its limit: the cases it finished
                lines.append(f"  {t['header']['layout']}: {t['header']['stopped']}")
            for c in t["cases"]:
                m = c["median"]
                idle = ", ".join(f"{k} {v:.0f}" for k, v in m["idle_by_us"].items())
                reads = m.get("read_to_op_us")      # absent from a timeline made before it was measured
                lines.append(f"  {t['header']['layout']} {c['case']}: {c['unprofiled_step_us']:.0f} = "
                             f"{c['ratio']:.2f}x its passes at copy_ ({c['roofline_us']:.0f}); "
                             f"profiled {m['period_us']:.0f} = busy {m['busy_us']:.0f} + idle {m['idle_us']:.0f} "
                             f"[{idle}]" + (f"; loss read -> next zfkernels op {' / '.join(f'{v:.0f}' for v in reads)}"
                                            if reads else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--out-text", required=True)
    a = ap.parse_args(argv)
    s = summarize(a.work)
    text = render(s)
    with open(a.out_json, "w") as f:
        json.dump(s, f, indent=1)
    with open(a.out_text, "w") as f:
        f.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
