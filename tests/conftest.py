"""Test configuration shared by every suite.

The Triton interpreter must be switched on before any ``@triton.jit`` function is
defined, so this happens at import time of conftest, before the test modules load.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
