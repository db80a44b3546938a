"""The kernel suite's cases (benchmarks/test_bench_kernels.py), without torch: the report
lists every target row they give on a GPU, measured or not, so that a case the run skipped,
failed or cut off is shown as not measured instead of missing."""
from __future__ import annotations

# (op, variant); variants beyond "plain" run in fp32 only, to fit the budget.
CASES = [
    ("perturb", "plain"), ("perturb", "sparse"),
    ("sgd", "plain"), ("sgd", "sign"), ("sgd", "sparse"), ("sgd", "history"), ("sgd", "momentum"),
    ("adam", "plain"), ("adam", "sign"), ("adam", "sparse"), ("adam", "history"),
]
DTYPES = ("fp32", "bf16", "fp16")        # the keys of benchmarks/_common.py DTYPES
DISTS = ("gaussian", "rademacher")
# Dtypes measured at the suite's largest size only, where the targets read them (report.py
# _largest), to fit the GPU kernel phase's share (gpu_check.sh: 90 s, 75 before these). The
# phase took 55 s on the H200 (2026-12-04 lease), before f4058f0's constexpr Triton kernels
# (~8 more compiles of 0.3-0.7 s); fp16 adds ~9-11 s at 256M (bf16's cases there: 6.3 s timed,
# plus 5 Triton compiles and each case's set-up) and would add ~3 s more at 64M (bf16's: 1.9 s
# timed), too close to the share.
LARGEST_SIZE_ONLY = ("fp16",)


def rows():
    """``(op, variant, dtype, dist)`` of every case the suite runs per backend, at the sizes of
    :func:`sizes`."""
    for op, variant in CASES:
        for dname in DTYPES:
            if variant != "plain" and dname != "fp32":
                continue
            for dist in DISTS:
                yield op, variant, dname, dist


def sizes(dname: str, suite_sizes) -> list:
    """The sizes dtype ``dname`` runs at, of the suite's ascending ``suite_sizes``: its kernel
    cases, its ``copy_`` and its MeZO baselines alike (a kernel row needs both at its size)."""
    suite_sizes = list(suite_sizes)
    return suite_sizes[-1:] if dname in LARGEST_SIZE_ONLY else suite_sizes
