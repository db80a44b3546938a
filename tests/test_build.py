"""The compiled extensions as built: registered for every dispatch key, exporting nothing but
their module init, linked against the process's shared libstdc++ (never a private static
copy: issue 9's crash), and the loader's message.

The last test rebuilds the CPU extension with a compiler driver that links libstdc++
statically, as the GPU image's /opt/gcc/bin/g++ does, and checks that an error message with
integers in it still comes out whole (with a private libstdc++ it was truncated here and
crashed the process there)."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch
from conftest import child_env

from zfkernels import _compiled
from zfkernels._sources import SOURCE_SUFFIXES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dt_needed(path: str) -> list[str]:
    """DT_NEEDED entries of an ELF64 little-endian shared object (no binutils needed)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not an ELF64 LE file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    out = []
    for sh in sections:
        if sh[1] != 6:                       # SHT_DYNAMIC
            continue
        strtab = sections[sh[6]]             # sh_link: the dynamic string table
        for off in range(sh[4], sh[4] + sh[5], 16):
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == 0:
                break
            if tag == 1:                     # DT_NEEDED
                start = strtab[4] + val
                out.append(data[start:data.index(b"\0", start)].decode())
    return out


def _built_objects():
    out = []
    for mod in ("_C", "_C_cuda"):
        try:
            m = __import__(f"zfkernels.{mod}", fromlist=["_"])
        except ImportError:
            continue
        out.append((mod, m.__file__))
    return out


def test_extensions_link_the_shared_libstdcxx():
    objs = _built_objects()
    assert objs, _compiled.missing_reason("cpu")
    for mod, path in objs:
        needed = dt_needed(path)
        assert any(n.startswith("libstdc++.so") for n in needed), (
            f"{mod} does not load the shared libstdc++ (DT_NEEDED: {needed}): a private static copy "
            "breaks error messages (setup.py: _process_libstdcxx)")
        nm = shutil.which("nm")
        if nm:
            out = subprocess.run([nm, "-C", "--defined-only", path], capture_output=True, text=True).stdout
            assert "std::locale::" not in out, f"{mod} defines libstdc++'s locale internals itself"


def _nvcc_present() -> bool:
    import shutil

    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return (os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None) and bool(
        torch.version.cuda)


@pytest.mark.skipif(not _nvcc_present(), reason="no nvcc / CPU-only torch: the CUDA extension is not built here")
@pytest.mark.skipif(os.environ.get("ZEROFLOW_BUILD_CUDA") == "0", reason="ZEROFLOW_BUILD_CUDA=0")
def test_cuda_extension_built_and_registered():
    assert _compiled.cuda_built(), _compiled.missing_reason("cuda")
    for name in ("philox4x32_10", "perturb_", "zo_sgd_update_", "zo_adam_update_"):
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"zfkernels::{name}", key), (name, key)


def test_extensions_export_only_their_module_init():
    """The two extensions share code through headers only, compiled with hidden visibility:
    nothing of zfkernels' own (validation, kernels) is exported, so no symbol of one .so
    can interpose the other's (the hazard of the old ops_cuda.cu #include "ops.cpp")."""
    import subprocess

    import zfkernels

    nm = "nm"
    for mod in ("_C", "_C_cuda"):
        path = getattr(getattr(zfkernels, mod, None), "__file__", None)
        if path is None:
            continue
        try:
            out = subprocess.run([nm, "-D", "--defined-only", "-C", path], capture_output=True, text=True,
                                 check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            pytest.skip("nm not available")
        ours = [ln for ln in out.splitlines() if "zf_" in ln or "zf::" in ln]
        assert not ours, f"{mod} exports zfkernels internals: {ours[:5]}"
        assert f"PyInit_{mod}" in out


def test_built_extensions_match_the_sources():
    """The extensions under test were compiled from the csrc/ of this tree (csrc/module_init.h):
    fails on binaries built before an edit of csrc/, which would test the old kernels."""
    assert _compiled.stale() == {}, (
        f"built from other sources than {_compiled.CSRC} ({{module: (built, now)}}: {_compiled.stale()}); "
        f"rebuild with: {_compiled.BUILD_COMMAND}")


def test_stale_names_a_build_older_than_its_sources(tmp_path):
    """A copy of csrc/ is judged like csrc/ itself (the digest ignores where the tree lies and
    files that are not sources); one edited byte makes every loaded extension stale."""
    loaded = [m for m in _compiled.MODULES.values() if f"zfkernels.{m}" in sys.modules]
    assert "_C" in loaded
    copy = tmp_path / "csrc"
    shutil.copytree(_compiled.CSRC, copy)
    (copy / "NOTES.txt").write_text("not a source file")
    assert _compiled.stale(str(copy)) == _compiled.stale()
    header = copy / "philox.h"
    header.write_bytes(header.read_bytes() + b"\n")
    edited = _compiled.stale(str(copy))
    assert sorted(edited) == loaded
    for built, now in edited.values():
        assert now.startswith("zf") and len(now) == 34 and built != now
    assert _compiled.stale(str(tmp_path / "absent")) == {}   # an installed wheel ships no csrc/
    other = tmp_path / "other-csrc"                             # another package's csrc/ beside it
    other.mkdir()
    (other / "ops.cpp").write_text("int main() { return 0; }\n")
    assert _compiled.stale(str(other)) == {}


def test_import_warns_about_a_stale_build(tmp_path):
    """Importing zfkernels with binaries older than csrc/ warns, naming them and the rebuild:
    this package and its binaries in a scratch tree whose csrc/ has one byte more."""
    shutil.copytree(os.path.join(ROOT, "zfkernels"), tmp_path / "zfkernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(_compiled.CSRC, tmp_path / "csrc")
    code = "import warnings; warnings.simplefilter('always'); import zfkernels"
    env = child_env()
    env["PYTHONPATH"] = str(tmp_path)          # the scratch tree only, not this repository

    def run():
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=300)

    same = run()
    assert same.returncode == 0 and "built from other sources" not in same.stderr, same.stderr
    header = tmp_path / "csrc" / "update_math.h"
    header.write_bytes(header.read_bytes() + b"\n")
    edited = run()
    assert edited.returncode == 0, edited.stderr
    assert "RuntimeWarning: zfkernels: zfkernels._C" in edited.stderr, edited.stderr
    assert f"built from other sources than {tmp_path / 'csrc'}" in edited.stderr
    assert _compiled.BUILD_COMMAND in edited.stderr


def _bare_copy(tmp_path):
    """The repository without build outputs: setuptools also lists what a previous egg-info's
    SOURCES.txt named, which would hide a file that MANIFEST.in or setup.py no longer brings in."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "*.egg-info", "build", "build-cmake", "dist", "results", "runs", "*.so", "__pycache__", ".*cache",
        ".probe", ".benchmarks"))
    return src


def test_the_packages_carry_their_py_typed_marker(tmp_path):
    """PEP 561: a type checker (mypy, pyright) treats an installed package without a py.typed
    marker as untyped and ignores its annotations; neither package shipped one. What a wheel
    (and an install) holds of the packages is build_py's output: the marker must be in it."""
    src = _bare_copy(tmp_path)
    lib = tmp_path / "lib"
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=src,
                         env=child_env(ZEROFLOW_BUILD_CUDA="0"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for package in ("zeroflow", "zfkernels"):
        assert (lib / package / "py.typed").is_file(), package


def test_sdist_carries_what_the_build_needs(tmp_path):
    """The source distribution builds where it is unpacked: it holds every source of csrc/
    (setup.py names only the files it compiles, not their headers; MANIFEST.in adds them)
    and zfkernels/_sources.py (setup.py loads it by path for the sources digest)."""
    src = _bare_copy(tmp_path)
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=src,
                         env=child_env(ZEROFLOW_BUILD_CUDA="0"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    need = {f"csrc/{f}" for f in os.listdir(_compiled.CSRC) if f.endswith(SOURCE_SUFFIXES)}
    assert {"csrc/ops.cpp", "csrc/ops_cuda.cu", "csrc/philox.h"} <= need
    need |= {"setup.py", "zfkernels/_sources.py", "zfkernels/_compiled.py", "python/zeroflow/py.typed",
             "zfkernels/py.typed"}
    # and what its tests need to run there (conftest.py, the C++ and emulated-CUDA sources and
    # the configuration they read were left out: the tests in it could not run)
    need |= {"tests/conftest.py", "tests/cpp/test_philox.cpp", "tests/cuda_emu/cuda_emu.cpp", "pytest.ini",
             "CMakeLists.txt"}
    assert need <= names, f"missing from the sdist: {sorted(need - names)}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_loader_reports_build_command():
    assert "pip install --no-build-isolation -e ." in _compiled.missing_reason("cuda")
    assert _compiled.cpu_available(), _compiled.missing_reason("cpu")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_static_libstdcxx_driver_still_links_the_shared_one(tmp_path):
    """Build the CPU extension with a driver that adds -static-libstdc++ (and Ubuntu's
    -Bsymbolic-functions): setup.py must still link the shared libstdc++, and an error whose
    message formats integers must reach Python whole."""
    src = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "csrc"), src / "csrc")
    shutil.copytree(os.path.join(ROOT, "zfkernels"), src / "zfkernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(os.path.join(ROOT, "setup.py"), src / "setup.py")
    wrapper = tmp_path / "gxx-static"
    wrapper.write_text('#!/bin/sh\nexec g++ "$@" -static-libstdc++ -Wl,-Bsymbolic-functions\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, CXX=str(wrapper), ZEROFLOW_BUILD_CUDA="0", MAX_JOBS="2")
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, env=env,
                           capture_output=True, text=True)
    if build.returncode != 0 and "static" in (build.stderr + build.stdout).lower():
        pytest.skip(f"this toolchain cannot link libstdc++ statically: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-2000:]
    so = next((src / "zfkernels").glob("_C.*.so"))
    assert any(n.startswith("libstdc++.so") for n in dt_needed(str(so))), dt_needed(str(so))
    code = textwrap.dedent("""
        import torch, zfkernels
        try:
            torch.ops.zfkernels.perturb_([torch.zeros(4)], [0, 1], 1, 1.0, 0, 0, 0)
        except ValueError as e:
            print(e)
    """)
    run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], cwd=src, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(src)))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tensor_ids has 2 entries but params has 1; give one id per tensor" in run.stdout, run.stdout


def test_crash_probe_script_on_this_build(tmp_path):
    """benchmarks/crash_probe.sh, which gpu_check.sh runs first on every lease: on this build
    its CPU probes raise the ValueError with the integers in its message, and the CUDA probe
    says why it is skipped without a GPU (a broken probe would cost a lease its first minutes)."""
    built = dict(_built_objects())
    if "_C" not in built:
        pytest.skip("the CPU extension is not built")
    (tmp_path / "build" / "zfkernels").mkdir(parents=True)
    for path in built.values():
        shutil.copy(path, tmp_path / "build" / "zfkernels")
    log = tmp_path / "log"
    script = os.path.join(ROOT, "benchmarks", "crash_probe.sh")
    res = subprocess.run(["bash", script, str(tmp_path / "build"), str(log)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout + res.stderr
    lines = (log / "summary.txt").read_text().splitlines()
    want_ok = "OK, raised ValueError zfkernels: tensor_ids has 2 entries but params has 1; give one id per tensor"
    assert lines[0] == "probe torch_internal: OK, raised RuntimeError"
    assert lines[1] == f"probe cpu_op_C_only: {want_ok}"
    if "_C_cuda" in built:
        assert lines[2] == f"probe cpu_op_both: {want_ok}"
    if not torch.cuda.is_available():
        assert lines[-1] in ("probe cuda_op_both: skipped (no GPU)", "probe cuda_op_both: skipped (no _C_cuda built)")


def test_cuda_device_allocations_retry_after_freeing_torchs_cached_blocks():
    """The CUDA extension's own device allocations (the launch-table cache of csrc/ops_cuda.cu)
    go around torch's caching allocator with cudaMalloc. In a run near the device's capacity
    (an LLM fine-tuning run) torch has reserved nearly all memory as cached blocks, so a
    cudaMalloc of a few hundred bytes fails with cudaErrorMemoryAllocation where torch's own
    allocations free cached blocks and retry: the first update of a new parameter layout
    raised "CUDA error: out of memory" with gigabytes free in torch's cache. Each cudaMalloc
    must be retried once after CUDACachingAllocator::emptyCache(). The retry is
    csrc/table_cache.h's (tests/cpp/test_table_cache.cpp's oom case runs it over host memory);
    here a source check of the CUDA policy, no GPU being at hand: every cudaMalloc is in a
    try_allocate that answers cudaErrorMemoryAllocation with nullptr (the cache's signal to
    retry), and the policy's release_cached_memory is torch's emptyCache."""
    import re

    csrc = os.path.join(ROOT, "csrc")
    found = 0
    for name in sorted(os.listdir(csrc)):
        if not name.endswith(SOURCE_SUFFIXES):
            continue
        with open(os.path.join(csrc, name)) as f:
            code = re.sub(r"//[^\n]*", "", f.read())          # comments name cudaMalloc too
        for m in re.finditer(r"\bcudaMalloc\s*\(", code):
            found += 1
            fn = code.rfind("try_allocate(", 0, m.start())
            body = code[fn:code.find("\n  }", m.start())] if fn >= 0 else ""
            assert fn >= 0 and "cudaErrorMemoryAllocation" in body and "return nullptr" in body, (
                f"csrc/{name}: a cudaMalloc outside a try_allocate that answers cudaErrorMemoryAllocation "
                f"with nullptr (csrc/table_cache.h then empties torch's cache and retries):\n"
                f"{code[m.start():m.start() + 300]}")
            assert re.search(r"void release_cached_memory\(\)\s*\{\s*c10::cuda::CUDACachingAllocator::emptyCache\(\);",
                             code), f"csrc/{name}: the policy's release_cached_memory is not torch's emptyCache"
    assert found, "no cudaMalloc in csrc/: the table cache moved; follow it here"
    with open(os.path.join(csrc, "table_cache.h")) as f:
        cache = f.read()
    assert re.search(r"if \(!p\) \{\s*memory_\.release_cached_memory\(\);\s*p = memory_\.try_allocate\(bytes\);",
                     cache), "csrc/table_cache.h no longer retries after release_cached_memory; follow it here"


def test_the_cuda_build_ships_ptx_for_newer_gpus_by_default():
    """setup.py's default TORCH_CUDA_ARCH_LIST was "8.0;9.0": machine code only, so a GPU newer
    than sm_90 (B200 sm_100, RTX 50 sm_120) had no kernel image ("no kernel image is available
    for execution on the device") for every op of a pip-installed zeroflow. +PTX adds PTX that
    the driver compiles for such a GPU at load (bits: the next test)."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup = f.read()
    assert 'os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")' in setup


def test_the_shipped_ptx_keeps_the_one_arithmetic():
    """The PTX a newer GPU compiles at load must give the bits of every other backend: no fused
    multiply-add (docs/kernel-ops.md, "Arithmetic"). Under --fmad=false nvcc writes every fp32
    multiply and add with an explicit rounding modifier (mul.rn / add.rn), which the driver's
    compiler may not contract, and division and sqrt correctly rounded (div.rn / sqrt.rn):
    checked in the PTX the CUDA extension embeds (one NUL-separated text per arch)."""
    import re

    built = dict(_built_objects())
    if "_C_cuda" not in built:
        pytest.skip("no CUDA extension built")
    with open(built["_C_cuda"], "rb") as f:
        data = f.read()
    targets = re.findall(rb"\.target (sm_\d+)", data)
    if not targets:
        pytest.skip("built without PTX (a TORCH_CUDA_ARCH_LIST without +PTX, as gpu_check.sh's 9.0)")
    fp32 = {m.decode() for m in re.findall(
        rb"[\0\n]\s*((?:fma|mad|mul|add|sub|div|sqrt|rcp|rsqrt)(?:\.[a-z0-9]+)*\.f32)\b", data)}
    unrounded = sorted(op for op in fp32 if not re.search(r"\.(rn|rz|rm|rp)\b", op) or op.startswith(("fma", "mad")))
    assert fp32 and not unrounded, f"PTX for {targets}: fp32 instructions a compiler may contract or " \
                                   f"approximate: {unrounded} (of {sorted(fp32)})"
