"""Test configuration and helpers shared by every suite.

The Triton interpreter must be switched on before any ``@triton.jit`` function is
defined, so this happens at import time of conftest, before the test modules load.
Test modules import the helpers (``from conftest import make_mlp``): processes that the
tests spawn import them the same way.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


def make_mlp(n_in: int, hidden: int, n_out: int, seed: int = 0) -> torch.nn.Sequential:
    """Linear - Tanh - Linear, initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, n_out))


def make_data(n: int, n_in: int, n_out: int = 1, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Gaussian inputs and a smooth target: ``Y = sin(2 X[:, :n_out]) + X[:, n_out]``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n_in, generator=g)
    return X, torch.sin(2 * X[:, :n_out]) + X[:, n_out:n_out + 1]


def child_env(without: tuple[str, ...] = (), **overrides: str) -> dict[str, str]:
    """The environment of a child Python process that a test runs (a benchmark suite's
    pytest, a compiling census): this one, with the repository on PYTHONPATH, without the
    variables named in ``without`` and without those of an xdist worker (pytest-benchmark
    >= 5 reads PYTEST_XDIST_WORKER and then silently writes no JSON), plus ``overrides``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_") and k not in without}
    env.update(overrides)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(root, "python"), root, env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def zf_cache(tmp_path_factory):
    """A fresh ZEROFLOW_CACHE (pretrained backbones, datasets) for one test module; the
    caller's value is restored after it."""
    old = os.environ.get("ZEROFLOW_CACHE")
    os.environ["ZEROFLOW_CACHE"] = str(tmp_path_factory.mktemp("zfcache"))
    yield
    if old is None:
        os.environ.pop("ZEROFLOW_CACHE", None)
    else:
        os.environ["ZEROFLOW_CACHE"] = old
