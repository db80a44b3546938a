"""benchmarks/sass_census.py: the offline instruction census of the Triton kernels (no GPU).

The counts are checked where they are known independently of the census: the Philox kernel
of the ``philox4x32_10`` op computes exactly ``BLOCK / threads`` calls per thread, so its
code holds that many calls; the recorded launch is the op's own (its arguments are the ones
the op computes); the census of a real case reports the facts its columns claim.
The census compiles real Triton kernels, which the interpreter mode of this test session
(TRITON_INTERPRET=1, tests/conftest.py) cannot: each check runs in a child process without it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import child_env

triton = pytest.importorskip("triton", reason="Triton is not installed: nothing to compile")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
if not os.path.exists(CUOBJDUMP):
    pytest.skip(f"Triton's NVIDIA backend ships no cuobjdump here ({CUOBJDUMP})", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> dict:
    """Run ``code`` (it prints one JSON object last) in a compiling (not interpreting) child."""
    env = child_env(without=("TRITON_INTERPRET",))
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_philox_calls_counted_exactly():
    """``_philox_kernel`` maps one counter row to one Philox call, and 128 threads share a
    tile of ``BLOCK`` rows: the code of one thread holds ``BLOCK / 128`` calls."""
    out = _run("""
        import json, torch
        from benchmarks import sass_census as S
        from zfkernels.triton.philox import _philox_kernel
        cnt = torch.empty(4096, 4, dtype=torch.int64, device="meta")
        res = {}
        for block in (128, 512):
            k, _ = S.compile_launch(_philox_kernel, (cnt, torch.empty_like(cnt), 4096, 1, 2),
                                    {"BLOCK": block, "num_warps": 4})
            ops = S.sass_opcodes(k.asm["cubin"])
            res[block] = {"calls": S.philox_calls(k.asm["ptx"]), **S.resources(k.asm["cubin"]),
                          "ldg": sum(n for o, n in ops.items() if o.startswith("LDG")),
                          "stg": sum(n for o, n in ops.items() if o.startswith("STG"))}
        print(json.dumps(res))
    """)
    for block, per_thread in (("128", 1), ("512", 4)):
        r = out[block]
        assert r["calls"] == per_thread, r
        # 4 counter words in and 4 output words out per row, whatever the access width
        assert r["ldg"] >= per_thread and r["stg"] >= per_thread, r
        assert 0 < r["regs"] <= 255 and r["local_bytes"] >= 0, r


def test_recorded_launch_and_census_of_a_case():
    """The recorder captures the one launch the real op makes, with the scalars the op
    derives; the census of that case reports what its columns claim."""
    out = _run("""
        import json, torch, triton
        from benchmarks import sass_census as S
        from zfkernels.stream import split_seed
        from zfkernels.triton._common import to_i32
        import zfkernels.triton.perturb as P
        real = P._perturb_kernel
        fn, grid, args, kw = S.record_launch("perturb", torch.float32, "rademacher", {}, numel=3000)
        named = dict(zip(fn.arg_names, args))
        k0, k1 = split_seed(S.SEED)
        c = S.census("perturb", torch.float32, "rademacher", {})
        print(json.dumps({"same_fn": fn is real, "restored": P._perturb_kernel is real,
                          "keys_ok": (named["key0"], named["key1"]) == (to_i32(k0), to_i32(k1)),
                          "dist": named["dist"], "T": named["T"], "n_rows": named["n_rows"], "grid": grid,
                          "scale": named["scale"], "fp32": kw["P_DTYPE"] == triton.language.float32,
                          "fusion": kw["enable_fp_fusion"], "census": c, "eps": S.EPS,
                          "issue_rate": S.ISSUE_RATE}))
    """)
    assert out["same_fn"] and out["restored"] and out["keys_ok"] and out["fp32"]
    assert (out["dist"], out["T"], out["n_rows"], out["fusion"]) == (1, 0, 1, False)
    assert out["grid"] == [3, 1, 1]            # 3000 elements: 3 tiles of the default BLOCK (1024)
    assert out["scale"] == pytest.approx(out["eps"], rel=1e-7)
    c = out["census"]
    assert c["elems_per_thread"] == c["block"] // (32 * c["num_warps"])
    assert c["instr_per_elem"] == pytest.approx(c["path_instr"] / c["elems_per_thread"])
    # the path (options constant) never needs more registers or code than the kernel as launched
    assert c["path_regs"] <= c["regs"] and c["path_instr"] <= c["sass_total_as_launched"]
    # Rademacher: at least one Philox call per 128 elements, at most one per element
    assert 1 / 128 <= c["philox_per_elem"] <= 1
    assert any(o.startswith("LDG") for o in c["global_mem_ops"]) and any(
        o.startswith("STG") for o in c["global_mem_ops"])
    assert c["issue_cap_elems_per_s"] == pytest.approx(out["issue_rate"] / c["instr_per_elem"])


def fake_timing(monkeypatch, time_variants) -> None:
    """``--time`` on this CPU: a GPU that says it is there, and ``time_variants`` in place of
    the compiles and launches (what is checked is what --time does with the timings)."""
    import torch

    from benchmarks import sass_census as sc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a test GPU")
    monkeypatch.setattr(sc, "time_variants", time_variants)


def test_time_fails_when_a_variant_differs_and_keeps_each_timed_case(tmp_path, monkeypatch, capsys):
    """``--time`` (gpu_check.sh, TRITON_VARIANTS): a variant whose bits differ from the op printed
    BITS DIFFER and exited 0, so the profile phase read "ok"; and its JSON was written after the
    last case only, so a run cut at its limit kept none of the cases it had timed."""

    from benchmarks import sass_census as sc

    def variants(same):
        return {"copy_ms": 1.0, "variants": {label: {"regs": 32, "compile_s": 0.1, "bit_identical": same[i],
                                                     "ms": 1.0, "of_copy": 1.0}
                                             for i, label in enumerate(sc.VARIANTS)}}

    timed = []

    def time_variants(name, numel):
        timed.append(name)
        if name == "sgd-fp32-gaussian":
            raise KeyboardInterrupt        # gpu_check.sh's SIGINT at the limit
        return variants([True, name != "perturb-fp32-gaussian", True])

    fake_timing(monkeypatch, time_variants)
    out = tmp_path / "new" / "variants.json"        # its folder is made (it failed after the cases)
    cases = "perturb-fp32-rademacher,perturb-fp32-gaussian"
    assert sc.main(["--time", "--cases", cases, "--json", str(out)]) == 1
    assert "FAILED: bits differ from the op for perturb-fp32-gaussian (dist,T,q,restore constant)" in \
        capsys.readouterr().err
    assert sorted(json.loads(out.read_text())["cases"]) == sorted(cases.split(","))
    assert sc.main(["--time", "--cases", "perturb-fp32-rademacher", "--json", str(out)]) == 0
    assert sc.main(["--time", "--cases", "perturb-fp32-rademacher,sgd-fp32-gaussian", "--json", str(out)]) == 130
    assert list(json.loads(out.read_text())["cases"]) == ["perturb-fp32-rademacher"]
    assert "stopped (SIGINT) after 1 of 2 cases" in capsys.readouterr().err


def test_time_stopped_by_sigterm_keeps_each_timed_case(tmp_path, monkeypatch, capsys):
    """A SIGTERM (a plain ``timeout``, a lease's limit) ended ``--time`` at once; it is taken as
    a SIGINT is: the cases timed are in the JSON, the exit status is 143, the handler is restored."""
    import signal


    from benchmarks import sass_census as sc

    before = signal.getsignal(signal.SIGTERM)

    def time_variants(name, numel):
        if name == "sgd-fp32-gaussian":
            if signal.getsignal(signal.SIGTERM) == before:
                pytest.fail("no SIGTERM handler: the signal would end the process with no report")
            os.kill(os.getpid(), signal.SIGTERM)
        return {"copy_ms": 1.0, "variants": {label: {"regs": 32, "compile_s": 0.1, "bit_identical": True,
                                                     "ms": 1.0, "of_copy": 1.0} for label in sc.VARIANTS}}

    fake_timing(monkeypatch, time_variants)
    out = tmp_path / "variants.json"
    assert sc.main(["--time", "--cases", "perturb-fp32-rademacher,sgd-fp32-gaussian", "--json", str(out)]) == 143
    assert list(json.loads(out.read_text())["cases"]) == ["perturb-fp32-rademacher"]
    assert "stopped (SIGTERM) after 1 of 2 cases" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before


def test_time_stopped_while_its_json_is_rewritten_keeps_the_file_whole(tmp_path, monkeypatch, capsys):
    """The JSON is rewritten after every timed case: a SIGTERM while it was written (opened "w",
    half the text in it) left a truncated file, which lost the cases written before as well. It
    is written atomically now. The signal comes from inside the encoding of the second case."""
    import signal


    from benchmarks import sass_census as sc

    class Stop:      # a value whose encoding sends the SIGTERM: the write is under way by then
        def __format__(self, spec):     # its row printed before the write
            return "stop"

    def default(self, o):
        if isinstance(o, Stop):
            os.kill(os.getpid(), signal.SIGTERM)
            return 0
        raise TypeError(o)

    def time_variants(name, numel):
        ms = Stop() if name == "sgd-fp32-gaussian" else 1.0
        return {"copy_ms": 1.0, "variants": {label: {"regs": 32, "compile_s": 0.1, "bit_identical": True,
                                                     "ms": ms, "of_copy": 1.0} for label in sc.VARIANTS}}

    monkeypatch.setattr(json.JSONEncoder, "default", default)
    fake_timing(monkeypatch, time_variants)
    out = tmp_path / "variants.json"
    assert sc.main(["--time", "--cases", "perturb-fp32-rademacher,sgd-fp32-gaussian", "--json", str(out)]) == 143
    assert list(json.loads(out.read_text())["cases"]) == ["perturb-fp32-rademacher"]
    assert os.listdir(tmp_path) == ["variants.json"]        # no temporary file left


def test_time_refuses_a_bad_numel_before_any_launch(capsys):
    """--time --numel 0 failed inside the op's launch (or a ZeroDivisionError of the copy_
    timing) after the device was set up; the parser refuses it."""
    from benchmarks import sass_census as sc

    with pytest.raises(SystemExit) as e:
        sc.main(["--time", "--numel", "0"])
    assert e.value.code == 2 and "--numel must be at least 1 (got 0)" in capsys.readouterr().err


def test_time_run_as_a_script_exits_with_mains_status(tmp_path):
    """``python benchmarks/sass_census.py --time`` (as gpu_check.sh runs it) ends with main's
    status: a SIGTERM in the first case exits 143, not 0 ("ok"). The device is faked: the first
    CUDA tensor asked for sends the SIGTERM."""
    import subprocess
    import sys
    import textwrap

    from conftest import ROOT, child_env

    code = textwrap.dedent("""
        import os, runpy, signal, sys, torch
        torch.cuda.is_available = lambda: True
        torch.cuda.get_device_name = lambda *a: "a test GPU"
        real_empty = torch.empty
        def empty(*a, device=None, **k):
            if device == "cuda":
                os.kill(os.getpid(), signal.SIGTERM)
            return real_empty(*a, **k)
        torch.empty = empty
        sys.argv = ["sass_census.py", "--time", "--cases", "perturb-fp32-rademacher"]
        runpy.run_path("benchmarks/sass_census.py", run_name="__main__")
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 143, (p.returncode, p.stderr[-2000:])
    assert "sass_census --time: stopped (SIGTERM) after 0 of 1 cases" in p.stderr


def _time_killed_in(killed_case: str, cases: str) -> str:
    """stdout (a pipe) of ``sass_census --time --cases CASES`` on a faked device, SIGKILLed
    (no cleanup runs) while it times ``killed_case``."""
    import signal
    import subprocess
    import sys
    import textwrap

    from conftest import ROOT, child_env

    code = textwrap.dedent(f"""
        import os, signal, sys, torch
        from benchmarks import sass_census as sc
        torch.cuda.is_available = lambda: True
        torch.cuda.get_device_name = lambda *a: "a test GPU"
        def time_variants(name, numel):
            if name == {killed_case!r}:
                os.kill(os.getpid(), signal.SIGKILL)
            return {{"copy_ms": 1.0, "variants": {{label: {{"regs": 32, "compile_s": 0.1, "bit_identical": True,
                                                         "ms": 1.0, "of_copy": 1.0}} for label in sc.VARIANTS}}}}
        sc.time_variants = time_variants
        sys.exit(sc.main(["--time", "--cases", {cases!r}]))
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stdout, p.stderr[-2000:])
    return p.stdout


def test_time_killed_outright_keeps_the_rows_it_printed():
    """A SIGKILL (gpu_check.sh's KILL_AFTER_S after its SIGINT, a lease's limit, the OOM
    killer) runs no cleanup: with stdout in a pipe or file (block-buffered) the rows of the
    cases already timed were lost; each row is flushed as it is printed now. The device is
    faked: the second case's timing sends the SIGKILL."""
    out = _time_killed_in("sgd-fp32-gaussian", "perturb-fp32-rademacher,sgd-fp32-gaussian")
    assert "perturb-fp32-rademacher" in out and "sgd-fp32-gaussian" not in out, out


def test_time_killed_in_its_first_case_keeps_the_header_it_printed():
    """A SIGKILL while the first case is being timed (its compile can take minutes): the header
    line (Triton version, device, element count) was printed before any row, and with stdout in
    a pipe or file it is lost unless it is flushed itself; the rows' flushes come too late."""
    out = _time_killed_in("perturb-fp32-rademacher", "perturb-fp32-rademacher")
    assert "a test GPU" in out and "perturb-fp32-rademacher" not in out, out
