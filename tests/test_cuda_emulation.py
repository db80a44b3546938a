"""The CUDA backend's kernels, run on the CPU, through the parity suite.

No GPU is at hand here, and a device lease is a few minutes a task, so the CUDA kernels'
own logic is run on the CPU: tests/cuda_emu/cuda_emu.cpp compiles csrc/multi_tensor_apply.cuh,
csrc/zo_functors.cuh and the op functions of csrc/multi_tensor_ops.h with the host compiler,
emulates each warp with 32 threads that meet at every ``__shfl_sync``, and replaces the CPU
kernels of the update ops with it in a child pytest (tests/conftest.py,
``ZF_EMULATE_CUDA_KERNELS``). The "cpu" cases of test_parity.py (z, every update option,
mixed dtypes, misaligned views, q > 16 seeds in a buffer, signed zeros and NaN, stochastic
rounding, optimizer trajectories, bad inputs, opcheck), test_optim_layout.py and
test_stochastic_rounding.py then check it bit for bit against the reference.

What this covers: the work decomposition (warp tasks, the bounds-free and bounded paths, the
tensor lookup, the grid-stride loop over a 2-block grid), the Rademacher words handed out by
shuffles, the restore's reuse of a query's z, buffer slots and dtypes, the rounding stores,
the argument checks and scalars. What it cannot: device intrinsics (the host paths of
csrc/philox.h and of cuda_bf16.h / cuda_fp16.h run instead), the memory model, occupancy and
speed, which the GPU run of benchmarks/gpu_check.sh checks.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import CUDA_INCLUDE, ROOT, child_env

from zfkernels import _compiled

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_bf16.h")),
                       reason=f"no CUDA headers at {CUDA_INCLUDE} (set CUDA_HOME): the emulation compiles them"),
    pytest.mark.skipif(not _compiled.cpu_available(), reason="the compiled CPU extension (the op schema) is missing"),
]

# The suites of the "cpu" backend that the emulated kernels take over, and how many of their
# tests must pass (a selection that quietly shrank would otherwise still pass).
SUITES = ["tests/test_parity.py", "tests/test_optim_layout.py", "tests/test_stochastic_rounding.py"]
SELECT = "cpu or not test_parity"   # test_parity: its "cpu" cases; the other suites: all
MIN_PASSED = 110


def test_parity_suite_on_the_emulated_cuda_kernels(tmp_path):
    report = tmp_path / "launches"
    env = child_env(ZF_EMULATE_CUDA_KERNELS=str(tmp_path / "build"), ZF_EMULATION_REPORT=str(report))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "-k", SELECT,
                          *SUITES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    passed = int(re.search(r"(\d+) passed", out).group(1))
    assert passed >= MIN_PASSED, f"only {passed} tests ran on the emulated kernels:\n{out[-3000:]}"
    launches = int(report.read_text())
    assert launches > 500, f"{launches} emulated launches: the CPU kernels were not replaced"


FAILED_UPLOAD = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import load_cuda_emulation
load_cuda_emulation({build!r})
ops = torch.ops.zfkernels
for dtypes in ((torch.float32, torch.bfloat16), (torch.float16, torch.float32, torch.bfloat16)):
    params = [torch.zeros(1000, dtype=d) for d in dtypes]
    momentum = [torch.zeros_like(p) for p in params]
    for op, args in (("perturb_", (params, [0, 1, 2][:len(params)], 7, 1.0, 1, 0, 0)),
                     ("zo_sgd_update_", (params, momentum, [], [0, 1, 2][:len(params)], [7], [1.0], 1, 0, 0, 0, 0.0,
                                         0.1, 0.0, 0.9, 0.0, False, False, False, 0.0, False, False, 0))):
        torch.ops.zf_cuda_emu.fail_table(len(dtypes))        # the last dtype's table upload fails
        try:
            getattr(ops, op)(*args)
            print(op, "raised nothing")
        except RuntimeError as e:
            assert "injected failure" in str(e), e
        written = [k for k, t in enumerate(params + momentum) if bool((t != 0).any())]
        print(op, [str(d) for d in dtypes], "written:", written)
"""


def test_a_failed_table_upload_leaves_every_tensor_unwritten(tmp_path):
    """One launch per parameter dtype: the tables of all of them are uploaded before the first
    launch, so an upload that fails (cudaMalloc out of memory on the device; injected here by
    the emulator) raises with nothing written. The launches used to be interleaved with the
    uploads: the fp32 params were updated, the bf16 ones not, and a caller that retried the
    step (an out-of-memory handler shrinking the batch) updated the fp32 ones twice."""
    script = FAILED_UPLOAD.format(tests=os.path.join(ROOT, "tests"), build=str(tmp_path / "build"))
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                         timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    lines = [ln for ln in run.stdout.splitlines() if "written:" in ln or "raised nothing" in ln]
    assert len(lines) == 4, out[-4000:]
    for ln in lines:
        assert ln.endswith("written: []"), f"a refused call wrote tensors: {ln}"
