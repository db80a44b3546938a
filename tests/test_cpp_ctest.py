"""Runs the standalone C++ unit tests (CMakeLists.txt + ctest) from pytest, so that the one
test command covers them: csrc/philox.h (Random123 known-answer vectors, the stream mapping,
Rademacher/mask/uniform layout and the Gaussian bound in plain C++) and csrc/table_cache.h
(the CUDA launch-table cache over host memory: LRU, held tables, failed uploads, capture)."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake not installed")
def test_ctest_suite_passes(tmp_path):
    build = tmp_path / "build"
    for cmd in (
        ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
        ["cmake", "--build", str(build), "-j", "2"],
        ["ctest", "--test-dir", str(build), "--output-on-failure"],
    ):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    # ctest prints "100% tests passed, 0 tests failed out of N" (older) or "100% tests passed out of N"
    assert "100% tests passed" in res.stdout, res.stdout
