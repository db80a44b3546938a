"""zeroflow performance suites (pytest-benchmark) and the report generator.

Run:  ``make bench`` (CPU suite + docs/performance.md), ``make bench-fast`` (CI smoke mode),
``bash benchmarks/gpu_check.sh`` (GPU subset). See docs/performance.md for the results.
"""
