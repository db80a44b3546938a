"""Loader of the compiled extensions (placeholder until the build lands)."""
BUILD_COMMAND = "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e ."
_errors: dict[str, str] = {}
try:
    from . import _C  # noqa: F401
except Exception as exc:  # noqa: BLE001
    _errors["cpu"] = f"{type(exc).__name__}: {exc}"
try:
    from . import _C_cuda  # noqa: F401
except Exception as exc:  # noqa: BLE001
    _errors["cuda"] = f"{type(exc).__name__}: {exc}"


def cpu_available() -> bool:
    return "cpu" not in _errors


def cuda_built() -> bool:
    return "cuda" not in _errors


def cuda_available() -> bool:
    import torch

    return cuda_built() and torch.cuda.is_available()


def missing_reason(backend: str) -> str:
    return f"{_errors.get(backend, 'no GPU')}; build it with: {BUILD_COMMAND}"
