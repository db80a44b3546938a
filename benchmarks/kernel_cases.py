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
DTYPES = ("fp32", "bf16")        # the keys of benchmarks/_common.py DTYPES
DISTS = ("gaussian", "rademacher")


def rows():
    """``(op, variant, dtype, dist)`` of every case the suite runs per backend and size."""
    for op, variant in CASES:
        for dname in DTYPES:
            if variant != "plain" and dname != "fp32":
                continue
            for dist in DISTS:
                yield op, variant, dname, dist
