"""Build of zeroflow / zfkernels.

    CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .

Extensions:
  zfkernels._C       CPU kernels + op schema (always built)
  zfkernels._C_cuda  CUDA kernels (built when nvcc is found and torch has CUDA)

Environment:
  ZEROFLOW_BUILD_CUDA=0|1   force the CUDA extension off / on (1 fails if impossible)
  TORCH_CUDA_ARCH_LIST      GPU archs (default "8.0;9.0+PTX": machine code for A100 and H100/H200,
                            and PTX that newer GPUs (B200, RTX 50) compile at load)
  MAX_JOBS                  parallel compile jobs (default 2)
"""
import importlib.util
import os
import shutil

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:    # pip's build isolation hides the installed torch
    raise SystemExit(
        f"zeroflow compiles its kernels against the installed torch, which this build cannot import ({e}). "
        "Install torch first (pip install torch==2.14.1 torchvision==0.29.1), then build without pip's "
        "isolated environment: pip install --no-build-isolation .") from None

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"

os.environ.setdefault("MAX_JOBS", "2")


def _sources_digest() -> str:
    """zfkernels/_sources.py's digest of csrc/, loaded by path (nothing is built yet)."""
    spec = importlib.util.spec_from_file_location("_zf_sources", os.path.join(HERE, "zfkernels", "_sources.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.digest(os.path.join(HERE, CSRC))


# Compiled into both extensions (csrc/module_init.h): zfkernels._compiled names a build older
# than the sources beside it.
DIGEST_DEFINE = f"-DZF_SOURCES_DIGEST={_sources_digest()}"

# One arithmetic (docs/kernel-ops.md): no contraction into FMAs, no fast-math, IEEE
# division and sqrt. Hidden visibility: each extension keeps its own private copy of the
# inline code it shares with the other through csrc/*.h (only PyInit_* is exported).
HIDDEN = ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", DIGEST_DEFINE] + HIDDEN
NVCC_FLAGS = [
    "-O3",
    "--fmad=false",  # same float discipline as the CPU build: no contraction
    "-prec-sqrt=true",
    "-prec-div=true",
    "-ftz=false",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    DIGEST_DEFINE,
] + [f"-Xcompiler={f}" for f in HIDDEN + ["-ffp-contract=off"]]


def _process_libstdcxx() -> list[str]:
    """The libstdc++ this process runs with (torch loaded it), as an explicit link input.

    Why: on the GPU image the compiler driver (/opt/gcc/bin/g++) links libstdc++ statically
    into shared objects. The extension then carried a private copy of libstdc++ whose
    functions (bound inside the .so by -Bsymbolic-functions) ran on the process's shared
    libstdc++ data: formatting an integer into an error message looked the locale facet up
    with the copy's facet id, called a codecvt method as num_put, and the process died with
    a segmentation fault instead of raising ValueError (benchmarks/crash_probe.sh; issue 9).
    Naming the process's libstdc++.so.6 before the driver's libraries resolves every
    libstdc++ symbol there, so a static archive contributes nothing."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libstdc++.so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith("libstdc++.so"))[:1]


LIBSTDCXX = _process_libstdcxx()


def _want_cuda() -> bool:
    flag = os.environ.get("ZEROFLOW_BUILD_CUDA", "").strip()
    nvcc = None
    if CUDA_HOME:
        cand = os.path.join(CUDA_HOME, "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else None
    nvcc = nvcc or shutil.which("nvcc")
    possible = nvcc is not None and torch.version.cuda is not None
    if flag == "0":
        return False
    if flag == "1":
        if not possible:
            raise RuntimeError(
                "ZEROFLOW_BUILD_CUDA=1 but the CUDA extension cannot be built: "
                f"nvcc={'found' if nvcc else 'not found (set CUDA_HOME=/usr/local/cuda)'}, "
                f"torch.version.cuda={torch.version.cuda!r} (install a CUDA build of torch)"
            )
        return True
    return possible


ext_modules = [
    CppExtension(
        name="zfkernels._C",
        sources=[os.path.join(CSRC, "ops.cpp")],
        include_dirs=[os.path.join(HERE, CSRC)],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"] + LIBSTDCXX,
    )
]

if _want_cuda():
    # +PTX: without it a GPU newer than sm_90 (B200 sm_100, RTX 50 sm_120) has no kernel image
    # ("no kernel image is available for execution on the device"). The PTX keeps the bits:
    # under --fmad=false nvcc writes every fp32 multiply and add with an explicit rounding
    # modifier (mul.rn / add.rn), which the driver's compiler may not contract into an FMA.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    ext_modules.append(
        CUDAExtension(
            name="zfkernels._C_cuda",
            sources=[os.path.join(CSRC, "ops_cuda.cu")],
            include_dirs=[os.path.join(HERE, CSRC)],
            extra_compile_args={"cxx": ["-O3", "-ffp-contract=off", DIGEST_DEFINE] + HIDDEN, "nvcc": NVCC_FLAGS},
            extra_link_args=LIBSTDCXX,
        )
    )

try:
    import ninja  # noqa: F401

    use_ninja = True
except ImportError:
    use_ninja = shutil.which("ninja") is not None

packages = ["zfkernels", "zfkernels.triton"] + find_packages(where="python")
package_dir = {"zfkernels": "zfkernels", "zfkernels.triton": "zfkernels/triton", "": "python"}

setup(
    name="zeroflow",
    version="0.1.0",
    description="Fused zeroth-order optimizer kernels (CPU, CUDA, Triton) for PyTorch",
    packages=packages,
    package_dir=package_dir,
    # PEP 561: without the marker a type checker treats the installed packages as untyped and
    # ignores their annotations
    package_data={"zeroflow": ["py.typed"], "zfkernels": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=use_ninja)},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.17",    # continual datasets and transforms (ImageFolder allow_empty: 0.17)
        "numpy",
        "tqdm",
        "matplotlib",
        "pyyaml",
        "scikit-learn",
        "safetensors",
        "timm",
    ],
    entry_points={"console_scripts": ["zeroflow = zeroflow.cli:main"]},
    zip_safe=False,
)
