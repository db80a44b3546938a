"""Instruction census of the Triton kernels, compiled offline for an H200 (sm_90): no GPU needed.

Why: the fused kernels are bound by instruction issue as much as by memory (benchmarks/notes.md,
issue 13: ncu counted 21 issued instructions per element for the CUDA Rademacher perturb, 78
for the Gaussian one). A kernel that issues I instructions per element cannot exceed
``issue_rate / I`` elements per second, whatever its memory does; the H200 issues 33.4 T lane
instructions per second (4 schedulers x 132 SMs x 1.98 GHz x 32 lanes). This script gives I
for each Triton kernel on the CPU, from the machine code Triton itself produces, so that a
change of the Triton kernels can be judged before a device is lent and the device time goes
to confirming it.

How: each case of benchmarks/profile_kernels.py is run through the real Triton op
(``zfkernels.call_op("triton", ...)``) on ``meta`` tensors with the kernel object replaced by
a recorder, so the launch arguments are exactly the ones the op computes. The recorded
launch is compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` twice:
  * as launched (the JIT's own specialization of the launch: the update kernels' ``DIST``,
    ``RESTORE``, ``SPARSE`` and ``ONE_QUERY`` are constexprs, their other options and all of
    perturb's runtime scalars): registers, local memory (spills), total SASS instructions;
  * with every option of the case (``dist``, ``q``, ``T``, ``has_wd``, ...) a constant as well,
    which leaves the case's own path: its SASS instructions divided by the
    elements one thread handles (``BLOCK / (32 * num_warps)``) is the census' estimate of
    the instructions issued per element (the path is straight-line code: the tile is fully
    unrolled; the table lookup's binary search adds ~log2(rows) x 10 per program).
SASS comes from ``cuobjdump`` (the CUDA toolkit's, else the one Triton ships: as
benchmarks/cuda_census.py finds it). The census also counts the Philox calls per element
(``mul.hi.u32`` in the PTX: two per round, 20 per call), the global memory instructions and
their widths (``LDG.E.128`` moves 16 bytes per lane, ``LDG.E`` 4) and the shared-memory round
trips of layout conversions (``STS``/``LDS``/``BAR``).

    python -m benchmarks.sass_census [--cases all] [--json out.json]
    python -m benchmarks.sass_census --time [--cases ...] [--numel 67108864]   # on a GPU

``--time`` (GPU; gpu_check.sh runs it with ``TRITON_VARIANTS``) answers on the device what
the census can only suggest: each case's launch compiled as launched, with ``dist``, ``T``,
``q`` constant (and the pending restore: the update kernels' RESTORE is one as launched), and
with every option constant, each checked bit for bit
against the real op from the same start, then timed against ``copy_`` of the same arrays.

The counts depend on the Triton version, and much (benchmarks/notes.md): census with the
device image's, e.g. a venv of ``torch==2.11.0`` (it brings Triton 3.6) and
``make census CENSUS_PY=that/venv/bin/python``; the output names the version.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import NamedTuple

import torch

from benchmarks._common import StopSignals, write_json
from benchmarks.cuda_census import cuobjdump, parse_resources, parse_sass
from benchmarks.profile_kernels import ADAM_STEP, CASES, COEFF, EPS, LR, SEED, median_ms

ISSUE_RATE = 33.4e12          # H200 lane instructions per second (benchmarks/notes.md)
COPY_ELEMS = {torch.float32: 518e9, torch.bfloat16: 1003e9}   # copy_ elements/s on the H200, same notes
# Arrays an op reads and writes per element (the cases have no momentum/history buffers):
# its rate at copy bandwidth is COPY_ELEMS / arrays.
ARRAYS = {"perturb": 1, "sgd": 1, "adam": 3}
# Kernel arguments that are options of the case: constants in the path compile. (The update
# kernels' DIST, RESTORE, SPARSE and ONE_QUERY are constexprs: constants in every compile.)
OPTION_ARGS = ("q", "T", "dist", "has_wd", "has_mom", "nesterov", "momentum_init", "sign",
               "has_hist", "history_init", "stochastic_rounding", "decoupled")
_MODULE = {"perturb": ("perturb", "_perturb_kernel"), "sgd": ("sgd_update", "_sgd_kernel"),
           "adam": ("adam_update", "_adam_kernel")}
_OP = {"perturb": "perturb_", "sgd": "zo_sgd_update_", "adam": "zo_adam_update_"}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((grid, args, kw))


@contextlib.contextmanager
def _recording(module, name):
    real = getattr(module, name)
    rec = _Recorder(real)
    setattr(module, name, rec)
    try:
        yield rec
    finally:
        setattr(module, name, real)


def _op_args(op, dtype, dist, opts, numel, device="meta"):
    """The op's arguments for one case: on ``meta`` tensors (no memory, pointers are 0) for
    the census, on real ones (parameters ~N(0, 0.02^2), Adam moments 0) for ``--time``."""
    from zfkernels.stream import dist_code, mask_threshold

    p = torch.empty(numel, dtype=dtype, device=device)
    if device != "meta":
        p.normal_(0.0, 0.02)
    stream = {"dist": dist_code(dist), "mask_seed": opts.get("mask_seed", 0),
              "mask_threshold": mask_threshold(opts.get("sparsity", 0.0))}
    if op == "perturb":
        return {"params": [p], "tensor_ids": [0], "seed": SEED, "scale": EPS, **stream}
    upd = {"params": [p], "tensor_ids": [0], "seeds": [SEED], "coeffs": [COEFF], "lr": LR, "restore_seed": SEED,
           "restore_scale": -EPS, **stream}
    if op == "sgd":
        return upd
    zeros = torch.zeros if device != "meta" else torch.empty
    return {**upd, "exp_avgs": [zeros(numel, dtype=dtype, device=device)],
            "exp_avg_sqs": [zeros(numel, dtype=dtype, device=device)], "step": ADAM_STEP}


def _require_compiler():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 makes every @triton.jit an interpreted function that cannot be "
                           "compiled; run the census without it (unset TRITON_INTERPRET)")


class Launch(NamedTuple):
    fn: object        # the @triton.jit function
    grid: tuple       # (x, y, z)
    args: tuple       # positional arguments, as the op passed them
    kw: dict          # constexprs and compile options


def record_launch(op, dtype, dist, opts, numel=1 << 20, op_args=None) -> Launch:
    """The case's one launch (with ``op_args``: the op called on those arguments instead of
    meta tensors; the launch then points at them)."""
    import importlib

    _require_compiler()
    import zfkernels

    mod_name, kname = _MODULE[op]
    module = importlib.import_module(f"zfkernels.triton.{mod_name}")
    with _recording(module, kname) as rec:
        zfkernels.call_op("triton", _OP[op], **(op_args or _op_args(op, dtype, dist, opts, numel)))
    if len(rec.launches) != 1:
        raise RuntimeError(f"{op}: expected one launch, recorded {len(rec.launches)}")
    grid, args, kw = rec.launches[0]
    return Launch(rec.fn, tuple(grid) + (1,) * (3 - len(grid)), args, kw)


def compile_launch(fn, args, kw, *, specialize=(), target=None):
    """``triton.compile`` of a recorded launch for ``target`` (default sm_90), specialized as
    the JIT specializes that launch (Triton's own ``native_specialize_impl``: 16-byte aligned
    pointers and integers marked divisible by 16, integers equal to 1 made constants, except
    the kernel's ``do_not_specialize`` ones), plus the arguments named in ``specialize``
    (``True``: every option of OPTION_ARGS) as constants. Returns ``(kernel, options)``."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    _require_compiler()
    target = target or GPUTarget("cuda", 90, 32)
    specialize = OPTION_ARGS if specialize is True else tuple(specialize)
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, v) in enumerate(zip(fn.params, args)):
        name = param.name
        # T > 0 stays a runtime value: the kernels convert it (T.to(...)), a constant has no .to
        if name in specialize and not (name == "T" and v):
            signature[name], constexprs[name] = "constexpr", v
            continue
        ty, attr = native_specialize_impl(CUDABackend, v, param.is_constexpr, not param.do_not_specialize,
                                          not param.do_not_specialize_on_alignment)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = v
        elif attr:
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    options = {}
    for k, v in kw.items():
        if k in fn.arg_names:
            signature[k], constexprs[k] = "constexpr", v
        else:
            options[k] = v
    missing = [n for n in fn.arg_names if n not in signature]
    if missing:
        raise RuntimeError(f"{fn.__name__}: no value recorded for {missing}")
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options=options), options


def _dump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump(), flag, f.name], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> dict:
    """Registers per thread, local memory (spills) and shared memory per block of the kernel."""
    found = list(parse_resources(_dump(cubin, "-res-usage")).values())
    if len(found) != 1:
        raise RuntimeError(f"cuobjdump -res-usage printed {len(found)} REG/LOCAL lines for one kernel")
    r = found[0]
    return {"regs": r["regs"], "local_bytes": r["local_bytes"], "shared_bytes": r["shared_bytes"]}


def sass_opcodes(cubin: bytes) -> Counter:
    """Opcode (with modifiers) -> count in the kernel's SASS (NOPs left out)."""
    return sum(parse_sass(_dump(cubin, "-sass")).values(), Counter())


def philox_calls(ptx: str) -> float:
    """Philox calls in one thread's code: each of the 10 rounds takes two ``tl.umulhi``, one
    ``mul.hi.u32`` each in the PTX (ptxas then emits ``IMAD.HI.U32`` or folds the low half in
    an ``IMAD.WIDE.U32``, so the SASS does not tell them apart from address arithmetic);
    nothing else in these kernels multiplies for a high half."""
    return len(re.findall(r"\bmul\.hi\.u32\b", ptx)) / 20


def census(op, dtype, dist, opts):
    """The census of one case (module docstring)."""
    fn, _, args, kw = record_launch(op, dtype, dist, opts)
    real, options = compile_launch(fn, args, kw)
    path, _ = compile_launch(fn, args, kw, specialize=True)
    ops = sass_opcodes(path.asm["cubin"])
    total = sum(n for o, n in ops.items() if o != "NOP")
    per_thread = kw["BLOCK"] // (32 * options.get("num_warps", 4))
    philox = philox_calls(path.asm["ptx"])
    mem = {o: n for o, n in ops.items() if o.startswith(("LDG", "STG"))}
    shared = sum(n for o, n in ops.items() if o.startswith(("STS", "LDS", "BAR")))
    i_elem = total / per_thread
    cap = ISSUE_RATE / i_elem
    at_copy = COPY_ELEMS[dtype] / ARRAYS[op] if dtype in COPY_ELEMS else None
    return {
        "block": kw["BLOCK"], "num_warps": options.get("num_warps", 4), "elems_per_thread": per_thread,
        **resources(real.asm["cubin"]), "sass_total_as_launched": sum(
            n for o, n in sass_opcodes(real.asm["cubin"]).items() if o != "NOP"),
        "path_instr": total, "instr_per_elem": i_elem, "philox_per_elem": philox / per_thread,
        "global_mem_ops": mem, "shared_ops": shared,
        "issue_cap_elems_per_s": cap, "issue_cap_of_copy": cap / at_copy if at_copy else None,
        "path_regs": resources(path.asm["cubin"])["regs"],
    }


# ----------------------------------------------------------------------------- --time (GPU)
# The register question of benchmarks/notes.md, answered on a device without touching the
# kernels: the same launch compiled with some options constant, timed against the kernel as
# launched, each variant checked bit for bit against the real op first. The update kernels
# take dist and the restore as constexprs (DIST, RESTORE; measured with this table on an H200,
# 2026-12-04: sgd fp32 Rademacher 165 -> 40 registers, 26.8 -> 63.6 % of copy_), so for them
# the middle variant adds q and T only; perturb keeps dist and T runtime (80 -> 32 registers
# constant, but 72.7 -> 40.8 % of copy_).
VARIANTS = {"as launched": (), "dist,T,q,restore constant": ("dist", "T", "q"), "path": True}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _gpu_ms(fn, reps: int) -> float:
    """Milliseconds per call after one warm call: ``reps`` back-to-back calls between two CUDA
    events (profile_kernels' timing, one group)."""
    fn()
    return median_ms(fn, reps=1, back_to_back=reps)


def time_variants(name: str, numel: int, reps: int = 20) -> dict:
    """Each VARIANTS compile of case ``name``'s launch on ``numel`` elements: registers,
    compile seconds, bit-identical to the op (params and moments after one launch from the
    same start), ms per launch and % of ``copy_`` moving the same arrays."""
    import time

    import triton

    import zfkernels

    op, dtype, dist, opts = CASES[name]
    op_args = _op_args(op, dtype, dist, opts, numel, device="cuda")
    state = op_args["params"] + op_args.get("exp_avgs", []) + op_args.get("exp_avg_sqs", [])
    start = [t.clone() for t in state]
    fn, grid, args, kw = record_launch(op, dtype, dist, opts, op_args=op_args)
    zfkernels.call_op("triton", _OP[op], **op_args)          # the op itself, as the JIT compiles it
    torch.cuda.synchronize()
    ref = [_bits(t).clone() for t in state]
    names = fn.arg_names
    full_args = list(args) + [kw[n] for n in names[len(args):]]   # a launcher takes every argument
    target = triton.runtime.driver.active.get_current_target()
    src, dst = torch.empty(numel, dtype=dtype, device="cuda").normal_(), torch.empty(numel, dtype=dtype, device="cuda")
    copy_ms = _gpu_ms(lambda: dst.copy_(src), reps) * ARRAYS[op]
    out = {"copy_ms": copy_ms, "variants": {}}
    for label, spec in VARIANTS.items():
        t0 = time.perf_counter()
        k, _ = compile_launch(fn, args, kw, specialize=spec, target=target)
        secs = time.perf_counter() - t0
        launch = k[grid]
        for t, s0 in zip(state, start):
            t.copy_(s0)
        launch(*full_args)
        torch.cuda.synchronize()
        same = all(torch.equal(_bits(t), r) for t, r in zip(state, ref))
        ms = _gpu_ms(lambda: launch(*full_args), reps)
        out["variants"][label] = {"regs": resources(k.asm["cubin"])["regs"], "compile_s": secs,
                                  "bit_identical": same, "ms": ms, "of_copy": copy_ms / ms}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="all", help="comma-separated case names of benchmarks/profile_kernels.py")
    ap.add_argument("--json", help="write the census here")
    ap.add_argument("--time", action="store_true",
                    help="GPU: time each case compiled with options constant against the kernel as launched")
    ap.add_argument("--numel", type=int, default=1 << 26, help="elements per case with --time (default 64M)")
    a = ap.parse_args(argv)
    import triton

    names = list(CASES) if a.cases == "all" else [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    if a.numel < 1:
        ap.error(f"--numel must be at least 1 (got {a.numel})")
    if a.json:      # its folder made now: a missing one lost the JSON after the cases had run
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    if a.time:
        if not torch.cuda.is_available():
            sys.exit("--time needs a CUDA device (the census itself does not: drop --time)")
        # each line flushed as printed: a SIGKILL (KILL_AFTER_S after gpu_check.sh's SIGINT, a
        # lease's limit) flushes nothing, and stdout in a pipe or file lost the rows already timed
        print(f"Triton {triton.__version__}, {torch.cuda.get_device_name(0)}, {a.numel} elements; "
              "% of copy_ moving the same arrays", flush=True)
        res, differ = {}, []
        # a SIGTERM (a plain timeout, a lease's limit) is taken as a SIGINT is: the cases timed so
        # far are in the JSON, and the run ends with the one line that says where it stopped
        with StopSignals() as signals:
            try:
                for name in names:
                    res[name] = r = time_variants(name, a.numel)
                    for label, v in r["variants"].items():
                        print(f"{name:30s} {label:28s} regs {v['regs']:3d}  compile {v['compile_s']:5.1f} s  "
                              f"{'bit-identical' if v['bit_identical'] else 'BITS DIFFER'}  {v['ms']:7.3f} ms  "
                              f"{100 * v['of_copy']:5.1f} %", flush=True)
                        if not v["bit_identical"]:
                            differ.append(f"{name} ({label})")
                    # after every case: a run cut at its limit (gpu_check.sh's SIGINT) keeps the cases
                    # it timed (the JSON used to be written after the last case only)
                    # (atomically: a stop while it was rewritten left a truncated file, losing the
                    # cases written before too)
                    if a.json:
                        write_json(a.json, {"triton": triton.__version__, "numel": a.numel, "cases": res})
            except KeyboardInterrupt:
                print(f"sass_census --time: stopped ({signals.name}) after {len(res)} of {len(names)} cases",
                      file=sys.stderr)
                return signals.exit_status
        if differ:
            # a variant that computes other bits times another kernel: its row is no answer, and
            # the exit status is what gpu_check.sh's profile phase goes by (it was 0: "ok")
            print(f"sass_census --time: FAILED: bits differ from the op for {', '.join(differ)}", file=sys.stderr)
            return 1
        return 0
    print(f"Triton {triton.__version__}, target sm_90; I = SASS instructions per element on the case's path")
    print(f"{'case':30s} {'regs':>4s} {'path':>4s} {'local':>5s} {'I':>6s} {'philox/el':>9s} {'shared':>6s} "
          f"{'cap % copy':>10s}  global memory ops")
    out = {"triton": triton.__version__, "target": "sm_90", "issue_rate": ISSUE_RATE, "cases": {}}
    for name in names:
        op, dtype, dist, opts = CASES[name]
        c = census(op, dtype, dist, opts)
        out["cases"][name] = c
        cap = f"{100 * c['issue_cap_of_copy']:.0f}" if c["issue_cap_of_copy"] else "-"
        mem = " ".join(f"{k}x{v}" for k, v in sorted(c["global_mem_ops"].items()))
        print(f"{name:30s} {c['regs']:4d} {c['path_regs']:4d} {c['local_bytes']:5d} {c['instr_per_elem']:6.1f} "
              f"{c['philox_per_elem']:9.3f} {c['shared_ops']:6d} {cap:>10s}  {mem}")
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
