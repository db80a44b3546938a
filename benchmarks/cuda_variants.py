"""Prebuilt variants of the compiled kernels timed against the build in zfkernels/, bit for bit first.

Why: a change of the CUDA kernels is prepared without a device (its bits through the CPU
emulation, tests/test_cuda_emulation.py; its registers, spills and access widths through
benchmarks/cuda_census.py), and only a lease can time it; a lease is 15 minutes a task. This
runs, in one call, the cases of benchmarks/profile_kernels.py with the extension in
zfkernels/ (the baseline) and with each variant (a folder holding its ``_C`` and ``_C_cuda``
for this python, built from the variant's sources: e.g. ``setup.py build_ext`` in a checkout
of its branch), each in its own process, so that two builds of the same ops never share one.
Every case's result (the parameters after one call from the same start) must be bit-identical
to the baseline's, else the variant computes something else and its time answers nothing
(exit status 1). The baseline runs first and again last: how far its two figures differ
says how far the device drifted during the call.

    python -m benchmarks.cuda_variants --variants DIR[,DIR...] [--cases a,b] [--numel 268435456] [--json F]

``--device cpu`` runs the same flow with the CPU backend (its tests, on machines without a GPU).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.machinery
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks._common import StopSignals, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CASES = ("sgd-bf16-rademacher", "sgd-bf16-gaussian", "adam-bf16-rademacher", "sgd-fp32-rademacher")
EXT = importlib.machinery.EXTENSION_SUFFIXES[0]
ROW = "cuda_variants row: "     # the prefix of a child's result lines (JSON after it)


def variant_files(folder: str) -> list[str]:
    """The extension files of ``folder`` for this python; refuses a folder without ``_C_cuda``
    (or, for the CPU flow's tests, ``_C``) built for it."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--variants: {folder} is no folder")
    files = sorted(glob.glob(os.path.join(folder, "_C*" + EXT)))
    if not files:
        have = ", ".join(sorted(os.path.basename(f) for f in glob.glob(os.path.join(folder, "*.so")))) or "nothing"
        raise FileNotFoundError(f"--variants: {folder} holds no _C*{EXT} for this python (it holds {have}); build "
                                f"the variant's extensions with this python (setup.py build_ext --inplace) and copy "
                                f"zfkernels/_C*{EXT} there")
    return files


def package_with(files: list[str], dest: str) -> str:
    """A copy of zfkernels/ in ``dest`` whose compiled extensions are ``files``; returns ``dest``."""
    pkg = os.path.join(dest, "zfkernels")
    shutil.copytree(os.path.join(ROOT, "zfkernels"), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for f in files:
        shutil.copy2(f, os.path.join(pkg, os.path.basename(f)))
    return dest


def _bits_digest(t) -> str:
    import torch

    flat = t.detach().contiguous().view(torch.uint8 if t.element_size() == 1 else
                                        {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return hashlib.sha256(flat.cpu().numpy().tobytes()).hexdigest()


def child(cases: list[str], numel: int, device: str) -> None:
    """Each case once from a fixed start (its result's digest), then timed against copy_ of the
    same dtype; one JSON line per case on stdout."""
    import torch

    import zfkernels
    from benchmarks.profile_kernels import CASES, bytes_moved, make_call, median_ms

    backend = "cuda" if device == "cuda" else "cpu"

    def ms_per_call(fn):
        if device == "cuda":
            return median_ms(fn)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def copy_ms_of(src):
        dst = torch.empty_like(src)
        return ms_per_call(lambda: dst.copy_(src))

    for name in cases:
        op, dtype, dist, opts = CASES[name]
        gen = torch.Generator(device=device).manual_seed(1234)
        p = torch.randn(numel, device=device, generator=gen).mul_(0.02).to(dtype)
        fn = make_call(op, p, dist, opts, backend)
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        digest = _bits_digest(p)
        copy_ms = copy_ms_of(torch.randn(numel, device=device, generator=gen).to(dtype))
        ms = ms_per_call(fn)
        s = p.element_size()
        of_copy = (bytes_moved(op, numel, s) / ms) / (2 * numel * s / copy_ms)
        print(ROW + json.dumps({"case": name, "bits": digest, "ms": ms, "copy_ms": copy_ms, "of_copy": of_copy,
                                "zfkernels": os.path.dirname(zfkernels.__file__)}), flush=True)
        del p, fn


def run_one(label: str, files: list[str] | None, cases: list[str], numel: int, device: str, timeout: float) -> dict:
    """The child run of one build (``files`` None: the baseline in zfkernels/) -> case -> row."""
    with tempfile.TemporaryDirectory(prefix="zf_variant_") as tmp:
        where = package_with(files, tmp) if files else ROOT
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([where, ROOT, os.path.join(ROOT, "python")]))
        run = subprocess.run([sys.executable, "-m", "benchmarks.cuda_variants", "--child", "--cases", ",".join(cases),
                              "--numel", str(numel), "--device", device], cwd=where, env=env, capture_output=True,
                             text=True, timeout=timeout)
        rows = {}
        for line in run.stdout.splitlines():
            if line.startswith(ROW):
                r = json.loads(line[len(ROW):])
                rows[r["case"]] = r
        if run.returncode != 0 or len(rows) != len(cases):
            raise RuntimeError(f"{label}: the child run failed (exit {run.returncode}, {len(rows)} of {len(cases)} "
                               f"cases):\n{run.stderr[-3000:]}")
        expected = os.path.join(where, "zfkernels")
        imported = rows[cases[0]]["zfkernels"]
        if os.path.realpath(imported) != os.path.realpath(expected):
            raise RuntimeError(f"{label}: the child imported zfkernels from {imported}, "
                               f"not {expected}: its PYTHONPATH did not take")
        return rows


def verdicts(results: dict[str, dict], baseline: str = "baseline") -> list[str]:
    """The (variant, case) pairs whose bits differ from the baseline's, as 'variant: case'."""
    ref = results[baseline]
    return [f"{label}: {case}" for label, rows in results.items() if label != baseline
            for case, r in rows.items() if r["bits"] != ref[case]["bits"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="", help="comma-separated folders, each with a variant's _C*.so files")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help="cases of benchmarks/profile_kernels.py")
    ap.add_argument("--numel", type=int, default=1 << 28)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--timeout", type=float, default=300, help="seconds for each build's child run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    from benchmarks.profile_kernels import CASES

    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        ap.error(f"--cases: unknown or none ({', '.join(unknown)}); valid: {', '.join(CASES)}")
    if a.numel < 1:
        ap.error(f"--numel must be at least 1 (got {a.numel})")
    if a.child:
        child(cases, a.numel, a.device)
        return 0
    folders = [v.strip() for v in a.variants.split(",") if v.strip()]
    if not folders:
        ap.error("--variants: give at least one folder of a variant's extensions")
    builds = {os.path.basename(os.path.normpath(f)) or f: variant_files(f) for f in folders}  # all refused first
    if "baseline" in builds or len(builds) != len(folders):
        ap.error("--variants: each folder needs its own name, other than 'baseline'")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda needs a CUDA device (--device cpu runs the flow on the CPU backend)")
    if a.json:      # its folder made now, before any device time: a missing one lost the JSON of every run
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    runs = [("baseline", None), *builds.items(), ("baseline again", None)]
    print(f"% of copy_ moving the same arrays, {a.numel} elements, {a.device}; "
          "bits: the parameters after one call, against the baseline's", flush=True)
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}     # build -> why its child run failed
    # Each build's rows are printed and written as it finishes, and a SIGTERM (a lease's limit,
    # gpu_check.sh's SIGINT) is taken as a SIGINT: a call cut short keeps the builds it timed.
    # A variant whose run fails (a crash, "misaligned address", its time limit) is named and
    # the others still run: one bad build does not cost the lease the others' answers.
    with StopSignals() as signals:
        try:
            for label, files in runs:
                try:
                    results[label] = run_one(label, files, cases, a.numel, a.device, a.timeout)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    if label == "baseline":
                        print(f"cuda_variants: the baseline's run failed, nothing to compare with: {e}",
                              file=sys.stderr)
                        return 1
                    failed[label] = str(e)
                    print(f"{label:22s} FAILED: {str(e).splitlines()[0]}", flush=True)
                    print(str(e)[-3000:], file=sys.stderr)
                for case, r in results.get(label, {}).items():
                    same = r["bits"] == results["baseline"][case]["bits"]
                    print(f"{label:22s} {case:26s} {100 * r['of_copy']:6.1f} %  {r['ms']:8.3f} ms"
                          f"{'' if same else '  BITS DIFFER'}", flush=True)
                if a.json:
                    write_json(a.json, {"numel": a.numel, "device": a.device, "results": results, "failed": failed})
        except KeyboardInterrupt:
            print(f"cuda_variants: stopped ({signals.name}) after {len(results) + len(failed)} of {len(runs)} runs",
                  file=sys.stderr)
            return signals.exit_status
    print(f"{'case':26s} " + " ".join(f"{label[:22]:>22s}" for label in results))
    for case in cases:
        cells = []
        for label, rows in results.items():
            same = rows[case]["bits"] == results["baseline"][case]["bits"]
            cells.append(f"{100 * rows[case]['of_copy']:.1f} %" + ("" if same else " BITS DIFFER"))
        print(f"{case:26s} " + " ".join(f"{c:>22s}" for c in cells))
    differ = verdicts(results)
    if differ:
        print(f"cuda_variants: FAILED: bits differ from the baseline's for {', '.join(differ)}", file=sys.stderr)
    if failed:
        print(f"cuda_variants: FAILED: the run of {', '.join(failed)} failed (above)", file=sys.stderr)
    return 1 if differ or failed else 0


if __name__ == "__main__":
    sys.exit(main())
