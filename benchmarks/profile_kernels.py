"""One launch of each profiled kernel, for ``ncu`` (benchmarks/gpu_check.sh, phase "profile").

Why a separate script: the pytest-benchmark suite launches every kernel hundreds of times; ncu
replays each profiled launch several times to collect its sections, so the profile runs a short,
fixed list of cases. Under ncu (``--no-timing``) each case is launched exactly once: ncu profiles
every launch that its ``-k`` matches, so a warm-up launch doubled the profile's time, and none is
needed (the CUDA kernels have no JIT and their lazy state is on the host; a Triton case compiles
on the host before it launches). Without ``--no-timing`` it prints each case's bandwidth
(:func:`median_ms`) next to ``copy_`` of the same dtype, so the profile and the fraction of copy
bandwidth come from one process.

    python -m benchmarks.profile_kernels [--numel 268435456] [--backend cuda] [--cases all]
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

import zfkernels as zk
from benchmarks._common import StopSignals

SEED = 0x5EED_1234
EPS = 1e-3
COEFF, LR, ADAM_STEP = 0.37, 1e-6, 10    # the updates' one query coefficient, lr and Adam step count

SPARSE = {"mask_seed": 77, "sparsity": 0.5}   # the sparse cases' mask

# name: (op, dtype, dist, variant options)
CASES = {
    "perturb-fp32-rademacher": ("perturb", torch.float32, "rademacher", {}),
    "perturb-fp32-gaussian": ("perturb", torch.float32, "gaussian", {}),
    "sgd-fp32-rademacher": ("sgd", torch.float32, "rademacher", {}),
    "sgd-fp32-gaussian": ("sgd", torch.float32, "gaussian", {}),
    "sgd-bf16-rademacher": ("sgd", torch.bfloat16, "rademacher", {}),
    "sgd-bf16-gaussian": ("sgd", torch.bfloat16, "gaussian", {}),
    "sgd-fp32-rademacher-sparse": ("sgd", torch.float32, "rademacher", SPARSE),
    "adam-fp32-rademacher": ("adam", torch.float32, "rademacher", {}),
    "adam-fp32-gaussian": ("adam", torch.float32, "gaussian", {}),
    # the two misses of the 2026-12-04 lease that no profile covered yet (benchmarks/notes.md):
    # Adam sparse at 55 % of copy against 89 % plain, Adam with bf16 storage at 55 %
    "adam-fp32-rademacher-sparse": ("adam", torch.float32, "rademacher", SPARSE),
    "adam-bf16-rademacher": ("adam", torch.bfloat16, "rademacher", {}),
}


def make_call(op, p, dist, opts, backend):
    kw = dict(opts, dist=dist, backend=backend)
    if op == "perturb":
        return lambda: zk.perturb_([p], SEED, EPS, **kw)
    if op == "sgd":
        return lambda: zk.zo_sgd_update_([p], [SEED], [COEFF], lr=LR, restore_seed=SEED, restore_scale=-EPS, **kw)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    return lambda: zk.zo_adam_update_([p], [m], [v], [SEED], [COEFF], lr=LR, step=ADAM_STEP, restore_seed=SEED,
                                      restore_scale=-EPS, **kw)


def bytes_moved(op, n, s):
    return 2 * n * s + (4 * n * s if op == "adam" else 0)


def median_ms(fn, reps=20, back_to_back=5):
    """Milliseconds per call of ``fn``: the median over ``reps`` groups of ``back_to_back`` calls,
    each group between two CUDA events. Back to back, a call's host work (argument checks and
    launch: 33-41 us for a zfkernels op, 1.7 us for ``copy_``, measured on the CPU) overlaps the
    kernel before it; one call on an idle stream counted it as device time, 3-6 % of a 256M fp32
    pass and four times that at 64M, against the kernels alone. What is left is the first
    call's host work over ``back_to_back`` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(back_to_back):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / back_to_back)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=1 << 28)
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--cases", default="all", help="comma-separated case names (default: all)")
    ap.add_argument("--no-timing", action="store_true", help="launch each case once only (under ncu)")
    a = ap.parse_args(argv)
    names = list(CASES) if a.cases == "all" else [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:      # before any launch: a typo in PROFILE_TRITON used to end the run mid-way
        ap.error(f"--cases: unknown case(s) {', '.join(unknown)}; valid: {', '.join(CASES)}")
    if a.numel < 1:
        ap.error(f"--numel must be at least 1 (got {a.numel})")
    # A SIGTERM (a plain timeout, a lease's limit) is taken as a SIGINT is, and each row is
    # flushed as it is measured: killed with its stdout in a pipe's buffer, the run lost every row.
    with StopSignals() as signals:
        try:
            _profile(names, a)
        except KeyboardInterrupt:
            print(f"profile_kernels: stopped ({signals.name}); the cases not listed were not measured",
                  file=sys.stderr)
            return signals.exit_status
    return 0


def _profile(names, a):
    n = a.numel
    copy_ms = {}
    print(f"{'case':34s} {'ms':>8s} {'GB/s':>8s} {'of copy':>8s}", flush=True)
    for name in names:
        op, dtype, dist, opts = CASES[name]
        p = torch.randn(n, device="cuda").mul_(0.02).to(dtype)
        fn = make_call(op, p, dist, opts, a.backend)
        fn()
        torch.cuda.synchronize()
        if a.no_timing:     # the one launch ncu profiles
            continue
        fn()                # timing: one more warm call first
        if dtype not in copy_ms:
            src, dst = torch.randn(n, device="cuda").to(dtype), torch.empty(n, device="cuda", dtype=dtype)
            dst.copy_(src)
            copy_ms[dtype] = median_ms(lambda: dst.copy_(src))
            del src, dst
        ms = median_ms(fn)
        s = p.element_size()
        gbs = bytes_moved(op, n, s) / ms / 1e6
        copy_gbs = 2 * n * s / copy_ms[dtype] / 1e6
        print(f"{name:34s} {ms:8.3f} {gbs:8.0f} {gbs / copy_gbs:8.1%}", flush=True)
        del p, fn
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
