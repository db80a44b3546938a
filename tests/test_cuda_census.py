"""benchmarks/cuda_census.py: registers, stack and access widths of the CUDA kernels, read offline.

Checked where the answer is known independently of the census: a small CUDA file compiled
here for sm_90 whose kernels are named as the launcher's instantiations and hold a known
number of loads and stores of known widths (one 16-byte global load, one 8-byte global store;
a dynamically indexed local array, which must live on the stack); the symbols of every
functor, storage type and dist; and the extension built from csrc/, whose every
instantiation must be found with its registers inside the launch bound it was compiled
under (csrc/zo_functors.cuh kMinBlocksPerSM).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter

import pytest

from benchmarks import cuda_census as cc

NVCC = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")


def _cuobjdump_or_skip() -> str:
    try:
        return cc.cuobjdump()
    except RuntimeError as e:
        pytest.skip(str(e))


def test_symbols_of_every_instantiation_are_told_apart():
    """Each of the 18 instantiations (3 functors x 3 storage types x 2 dists) maps to its own
    (op, storage, dist); other kernels of the extension map to None."""
    seen = set()
    for functor, op in (("14PerturbFunctor", "perturb"), ("10SgdFunctor", "sgd"), ("11AdamFunctor", "adam")):
        for mangled, storage in (("f", "fp32"), ("13__nv_bfloat16", "bf16"), ("6__half", "fp16")):
            for d, dist in (("0", "gaussian"), ("1", "rademacher")):
                sym = f"_ZN7zf_cuda19multi_tensor_kernelINS_{functor}E{mangled}Li{d}EEEvNS_6CommonENT_4ArgsE"
                assert cc.kernel_of(sym) == (op, storage, dist)
                seen.add(cc.kernel_of(sym))
    assert len(seen) == 18
    assert cc.kernel_of("_Z13philox_kernelPKlPlljj") is None


def test_parsers_read_cuobjdumps_layout():
    res = cc.parse_resources(
        " Function _Zk1:\n  REG:80 STACK:72 SHARED:0 LOCAL:0 CONSTANT[0]:864 TEXTURE:0\n"
        " Function _Zk2:\n  REG:26 STACK:0 SHARED:16 LOCAL:4 CONSTANT[0]:400\n")
    assert res == {"_Zk1": {"regs": 80, "stack_bytes": 72, "shared_bytes": 0, "local_bytes": 0},
                   "_Zk2": {"regs": 26, "stack_bytes": 0, "shared_bytes": 16, "local_bytes": 4}}
    sass = cc.parse_sass(
        "\t\tFunction : _Zk1\n"
        "        /*0000*/                   LDC R1, c[0x0][0x28] ;   /* 0x00000a00ff017b82 */\n"
        "        /*0010*/               @P0 LDG.E.128 R4, desc[UR4][R2.64] ;\n"
        "        /*0020*/              @!P1 STG.E.64 desc[UR4][R2.64], R6 ;\n"
        "        /*0030*/                   NOP ;\n"
        "\t\tFunction : _Zk2\n"
        "        /*0000*/                   LD.E.U16 R3, desc[UR8][R34.64+0x2] ;\n"
        "        /*0010*/                   STL [R1+0xc], R0 ;\n")
    assert sass == {"_Zk1": Counter({"LDC": 1, "LDG.E.128": 1, "STG.E.64": 1}),
                    "_Zk2": Counter({"LD.E.U16": 1, "STL": 1})}
    ops = Counter({"LDG.E": 3, "LDG.E.64": 2, "LDG.E.128": 1, "LDG.E.CONSTANT": 1, "LD.E.U16": 4, "LDL.LU": 9,
                   "LDS": 5, "LDC": 7})
    assert cc.widths(ops, "LDG") == {4: 4, 8: 2, 16: 1}
    assert cc.widths(ops, "LD") == {2: 4}          # generic only: not LDL, LDS, LDC


KNOWN = r"""
#include <cstdint>
namespace zf_cuda {
struct Common { float* p; int n; };
struct SgdFunctor { struct Args { int k; }; };
struct AdamFunctor { struct Args { int k; }; };
template <class F, typename P, int DIST>
__global__ void multi_tensor_kernel(const __grid_constant__ Common c, const __grid_constant__ typename F::Args a);
// one 16-byte global load, one 8-byte global store
template <>
__global__ void multi_tensor_kernel<SgdFunctor, float, 1>(const __grid_constant__ Common c,
                                                          const __grid_constant__ SgdFunctor::Args a) {
  const float4 v = reinterpret_cast<const float4*>(c.p)[threadIdx.x];
  reinterpret_cast<float2*>(c.p)[threadIdx.x + 4096] = make_float2(v.x + v.y, v.z * v.w);
}
// a local array written and read at run-time indices: it lives on the stack (STL/LDL)
template <>
__global__ void multi_tensor_kernel<AdamFunctor, float, 0>(const __grid_constant__ Common c,
                                                           const __grid_constant__ AdamFunctor::Args a) {
  float t[512];   // more than the 255 registers a thread may have
  for (int i = 0; i < 512; ++i) t[i] = c.p[i * c.n + threadIdx.x];
  t[a.k & 511] += 1.0f;
  c.p[threadIdx.x] = t[(a.k >> 9) & 511];
}
}
"""


@pytest.mark.slow
def test_census_of_kernels_with_known_accesses(tmp_path, capsys):
    _cuobjdump_or_skip()
    if not os.path.exists(NVCC):
        pytest.skip(f"no nvcc at {NVCC} (set CUDA_HOME)")
    src = tmp_path / "known.cu"
    src.write_text(KNOWN)
    so = tmp_path / "known.so"
    subprocess.run([NVCC, "-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_90,code=sm_90", "-O3",
                    "-o", str(so), str(src)], check=True, capture_output=True, timeout=300)
    rows = {(r["op"], r["dist"]): r for r in cc.census(str(so))}
    assert set(rows) == {("sgd", "rademacher"), ("adam", "gaussian")}
    sgd, adam = rows["sgd", "rademacher"], rows["adam", "gaussian"]
    assert sgd["global_loads"] == {16: 1} and sgd["global_stores"] == {8: 1}
    assert sgd["stack_bytes"] == 0 and sgd["spill_stores"] == sgd["spill_loads"] == 0
    assert sgd["generic_loads"] == {} and sgd["generic_stores"] == {}
    assert adam["stack_bytes"] >= 512 * 4 and adam["spill_stores"] > 0 and adam["spill_loads"] > 0
    assert sgd["blocks_per_sm_by_regs"] == 65536 // (sgd["regs"] * 256)
    out = tmp_path / "c.json"
    assert cc.main(["--so", str(so), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["kernels"][0]["op"] == "sgd"          # sgd before adam
    assert len([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("sgd ", "adam "))]) == 2


def test_census_of_the_built_extension():
    """Every instantiation of the extension's sm_90 cubin, its registers within the bound
    csrc/zo_functors.cuh gives it (kMinBlocksPerSM blocks of 256 threads per SM), and the
    bounds-free path's 16-byte loads of fp32 parameters."""
    from zfkernels import _compiled

    if not _compiled.cuda_built():
        pytest.skip(_compiled.missing_reason("cuda"))
    _cuobjdump_or_skip()
    so = cc.extension_path()
    listed = subprocess.run([cc.cuobjdump(), "-lelf", so], capture_output=True, text=True).stdout
    if "sm_90" not in listed:
        pytest.skip(f"{so} holds no sm_90 cubin (TORCH_CUDA_ARCH_LIST without 9.0)")
    rows = cc.census(so)
    assert [(r["op"], r["storage"], r["dist"]) for r in rows] == [
        (op, s, d) for op in ("perturb", "sgd", "adam") for s in ("fp32", "bf16", "fp16")
        for d in ("gaussian", "rademacher")]
    bound = {"perturb": 4, "sgd": 3, "adam": 2}       # kMinBlocksPerSM of each functor
    for r in rows:
        assert r["regs"] <= 65536 // (256 * bound[r["op"]]), r
        assert r["blocks_per_sm_by_regs"] >= bound[r["op"]], r
        if r["storage"] == "fp32":
            assert r["global_loads"].get(16, 0) >= 4, r      # kRows = 4 rows of float4 per task


def test_a_missing_extension_is_named():
    with pytest.raises(FileNotFoundError, match="no such extension"):
        cc.census("/nonexistent/_C_cuda.so")


def test_an_extension_without_the_arch_says_how_to_build_it(tmp_path):
    _cuobjdump_or_skip()
    if not os.path.exists(cc.extension_path()):
        pytest.skip("no CUDA extension built")
    so = shutil.copy(cc.extension_path(), tmp_path / "x.so")
    with pytest.raises(RuntimeError, match="holds no multi_tensor_kernel for sm_86.*TORCH_CUDA_ARCH_LIST holding 8.6"):
        cc.census(str(so), arch="sm_86")
