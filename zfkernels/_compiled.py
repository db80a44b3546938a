"""Loader of the compiled extensions.

``zfkernels._C`` defines the ``torch.ops.zfkernels`` schema and the CPU (and Meta) kernels;
``zfkernels._C_cuda`` adds the CUDA kernels (built only where nvcc and a CUDA torch exist).
Importing this module fails only for a ZEROFLOW_CPU_CAPABILITY this machine cannot honour; a
missing extension is recorded with the reason and the command that builds it, and the callers
fall back or raise with that text. In a source
checkout, an extension built from other sources than the csrc/ beside the package (edited
since the build) is named with a warning at import (:func:`stale`).
"""
from __future__ import annotations

import os
import sys
import warnings

from ._sources import digest

BUILD_COMMAND = "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e ."
# The C++/CUDA sources of a source checkout (absent from an installed wheel).
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
MODULES = {"cpu": "_C", "cuda": "_C_cuda"}

_errors: dict[str, str] = {}


def _try_import(backend: str, module: str) -> None:
    try:
        __import__(f"{__package__ or 'zfkernels'}.{module}")
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError (bad .so), undefined symbols
        _errors[backend] = f"{type(exc).__name__}: {exc}"


def stale(csrc: str = CSRC) -> dict[str, tuple[str, str]]:
    """The loaded extensions built from other sources than ``csrc``: ``{module: (digest
    compiled in, digest of csrc)}``; empty where csrc/ is not zfkernels' (an installed wheel
    ships none; a ``csrc`` of another package beside it has no module_init.h)."""
    if not os.path.isfile(os.path.join(csrc, "module_init.h")):
        return {}
    now = digest(csrc)
    out = {}
    for module in MODULES.values():
        m = sys.modules.get(f"{__package__ or 'zfkernels'}.{module}")
        if m is None:                      # not built or not loadable: missing_reason() says so
            continue
        built = getattr(m, "sources_digest", None)
        if built != now:
            out[module] = (str(built), now)
    return out


# The compiled CPU kernels exist for several instruction sets (csrc/ops.cpp, "CPU
# capabilities"); all give the same bits. This variable lowers the one in force, as
# ATEN_CPU_CAPABILITY does for torch's kernels (to time or test another variant, or to run
# where the best one misbehaves).
CPU_CAPABILITY_ENV = "ZEROFLOW_CPU_CAPABILITY"
CPU_CAPABILITIES = ("default", "avx2", "avx512")


def _cpu_module():
    m = sys.modules.get(f"{__package__ or 'zfkernels'}.{MODULES['cpu']}")
    if m is None:
        raise RuntimeError(f"the CPU capability needs the compiled CPU kernels: {missing_reason('cpu')}")
    if not hasattr(m, "set_cpu_capability"):      # a build older than the capabilities (stale())
        raise RuntimeError(f"zfkernels._C was built before CPU capabilities existed; rebuild it with: {BUILD_COMMAND}")
    return m


def cpu_capabilities() -> tuple[str, ...]:
    """The CPU capabilities whose kernels can run here, lowest first (``"default"`` is
    baseline x86-64, or the only one of a non-x86 build)."""
    return tuple(_cpu_module().cpu_capabilities())


def cpu_capability() -> str:
    """The CPU capability whose kernels the compiled CPU ops run: the best of
    :func:`cpu_capabilities` unless set (:func:`set_cpu_capability`, ``ZEROFLOW_CPU_CAPABILITY``)."""
    return _cpu_module().cpu_capability()


def set_cpu_capability(name: str) -> str:
    """Runs the compiled CPU ops with the kernels of ``name`` (one of :func:`cpu_capabilities`)
    from the next op call on; returns the one in force before. Results do not change (every
    capability computes the same bits); speed does."""
    if name not in CPU_CAPABILITIES:
        raise ValueError(f"unknown CPU capability {name!r}; use one of {', '.join(CPU_CAPABILITIES)}")
    if name not in cpu_capabilities():
        raise ValueError(f"CPU capability {name!r} is not available on this machine (it has "
                         f"{', '.join(cpu_capabilities())}); use one of those")
    before = cpu_capability()
    _cpu_module().set_cpu_capability(name)
    return before


def _apply_capability_env() -> None:
    name = os.environ.get(CPU_CAPABILITY_ENV, "").strip().lower()
    if not name:
        return
    try:
        set_cpu_capability(name)
    except ValueError as exc:
        # A capability asked for and not given would be a silent change of what runs.
        raise ValueError(f"{CPU_CAPABILITY_ENV}={os.environ[CPU_CAPABILITY_ENV]!r}: {exc}, or unset "
                         f"{CPU_CAPABILITY_ENV} to run the best one") from None


_try_import("cpu", MODULES["cpu"])
if "cpu" not in _errors:
    _apply_capability_env()
if "cpu" in _errors:
    # The CUDA extension only registers kernels for ops that _C defines.
    _errors["cuda"] = f"zfkernels._C (the op schema) is missing: {_errors['cpu']}"
else:
    _try_import("cuda", MODULES["cuda"])
_stale = stale()
if _stale:
    warnings.warn(
        f"zfkernels: {' and '.join(f'zfkernels.{m}' for m in _stale)} {'was' if len(_stale) == 1 else 'were'} "
        f"built from other sources than {CSRC} (edited since the build) and run the old kernels; rebuild with: "
        f"{BUILD_COMMAND}", RuntimeWarning, stacklevel=2)


def cpu_available() -> bool:
    """The compiled CPU kernels (and the op schema) were built and load."""
    return "cpu" not in _errors


def cuda_built() -> bool:
    """The compiled CUDA kernels were built and load (a GPU may still be absent)."""
    return "cuda" not in _errors


def cuda_available() -> bool:
    """The CUDA kernels are built AND torch sees a GPU."""
    if not cuda_built():
        return False
    import torch

    return torch.cuda.is_available()


def missing_reason(backend: str) -> str:
    """Why ``backend`` ("cpu" or "cuda") cannot run here, with the fix."""
    if backend not in ("cpu", "cuda"):
        return f"unknown compiled backend {backend!r}; use 'cpu' or 'cuda'"
    if backend in _errors:
        extra = (
            " (the CUDA extension is built only where nvcc and a CUDA build of torch are present;"
            " ZEROFLOW_BUILD_CUDA=1 makes its absence a build error)"
            if backend == "cuda"
            else ""
        )
        if "undefined symbol" in _errors[backend]:
            # a C++ extension links to torch's ABI: one built for another torch fails this way
            import torch

            # the build command rebuilds (pip's editable build starts from an empty build folder);
            # a non-editable reinstall (pip install --force-reinstall .) put new binaries in
            # site-packages and left the checkout's in-place ones, which a run from the checkout
            # imports first: the same error again
            extra += (f" (an undefined symbol: the extension was built against another torch than the "
                      f"running {torch.__version__}; rebuild it against this one with the build command below, "
                      f"run in the source checkout)")
        return (f"zfkernels compiled {backend} extension not importable ({_errors[backend]}){extra}; "
                f"build it with: {BUILD_COMMAND}")
    if backend == "cuda" and not cuda_available():
        return (
            "the zfkernels CUDA extension is built but torch.cuda.is_available() is False (no GPU or"
            f" driver here); on a GPU machine it is built with: {BUILD_COMMAND}"
        )
    return f"available (built with: {BUILD_COMMAND})"
