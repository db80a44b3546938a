"""Resource census of the CUDA backend's kernels, read offline from the built extension: no GPU needed.

Why: the H200 profiles of issue 13 (benchmarks/notes.md) put the bf16 update rows at 54–56 % of
copy bandwidth with local-memory spills and 8-byte accesses, where the fp32 rows reach 90 %.
Both show in the machine code the build already holds, per template instantiation of
``multi_tensor_kernel<Functor, storage, dist>`` (csrc/multi_tensor_apply.cuh): registers per
thread, stack bytes (local memory: the spills), and the width of every global load and store.
This reads them from the extension's sm_90 cubin with ``cuobjdump``, so that a change of
csrc/zo_functors.cuh or csrc/multi_tensor_apply.cuh can be judged before a device is lent
(does the bf16 update still spill? does it load 16 bytes a lane?) and the device time goes to
timing it. benchmarks/sass_census.py does the same for the Triton kernels.

    python -m benchmarks.cuda_census [--so zfkernels/_C_cuda....so] [--arch sm_90] [--json out.json]

Reading the counts: they are static (instructions in the code, not issued), over every path of
the kernel: the bounds-free path of whole aligned tasks, the bounded path of tails and
unaligned tensors (its element-wise accesses), the tensor lookup (64-bit loads of the launch
table: ``LDG.E.64`` counts table fields). Loads and stores are split into global ones
(``LDG``/``STG``) and generic-address ones (``LD``/``ST``), which the compiler emits where it
cannot prove a pointer global. ``STL``/``LDL`` are the spill stores and reloads. Registers
are those of the sm_90 build the device runs: the image's cpython-312 extension, or this
machine's build (its TORCH_CUDA_ARCH_LIST holds 9.0).
"""
from __future__ import annotations

import argparse
import importlib.machinery
import os
import re
import subprocess
import sys
from collections import Counter

from benchmarks._common import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = 256                 # csrc/multi_tensor_apply.cuh kThreads
REGS_PER_SM = 65536           # sm_90 register file per SM
OPS = {"Perturb": "perturb", "Sgd": "sgd", "Adam": "adam"}
STORAGE = {"f": "fp32", "13__nv_bfloat16": "bf16", "6__half": "fp16"}
DISTS = {"0": "gaussian", "1": "rademacher"}   # csrc/philox.h DIST_GAUSSIAN, DIST_RADEMACHER
# multi_tensor_kernel<zf_cuda::SgdFunctor, __nv_bfloat16, 1>, as the Itanium ABI mangles it
_KERNEL = re.compile(r"multi_tensor_kernelINS_\d+(Perturb|Sgd|Adam)FunctorE(f|13__nv_bfloat16|6__half)Li([01])E")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SASS_FUNC = re.compile(r"^\s*Function : (\S+)")
_RES_FUNC = re.compile(r"^\s*Function (\S+?):\s*$")
# an instruction line of cuobjdump -sass: /*0190*/  @!P0 LDG.E.64 R2, desc[UR4][R4.64] ;
_INSTR = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def extension_path() -> str:
    """The CUDA extension of the running interpreter in zfkernels/ (built or not)."""
    return os.path.join(ROOT, "zfkernels", "_C_cuda" + importlib.machinery.EXTENSION_SUFFIXES[0])


def cuobjdump() -> str:
    """cuobjdump: the CUDA toolkit's, else the one Triton's NVIDIA backend ships."""
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if os.path.exists(c):
            return c
    raise RuntimeError(f"cuobjdump not found (looked at {', '.join(cands)}): install the CUDA toolkit or Triton")


def kernel_of(mangled: str) -> tuple[str, str, str] | None:
    """(op, storage, dist) of a multi_tensor_kernel instantiation's symbol, None for another kernel."""
    m = _KERNEL.search(mangled)
    return (OPS[m.group(1)], STORAGE[m.group(2)], DISTS[m.group(3)]) if m else None


def parse_resources(text: str) -> dict[str, dict]:
    """``cuobjdump -res-usage`` output -> symbol -> registers, stack, shared and local bytes."""
    out, name = {}, None
    for line in text.splitlines():
        f = _RES_FUNC.match(line)
        if f:
            name = f.group(1)
            continue
        m = _RES.search(line)
        if m and name is not None:
            out[name] = {"regs": int(m.group(1)), "stack_bytes": int(m.group(2)),
                         "shared_bytes": int(m.group(3)), "local_bytes": int(m.group(4))}
            name = None
    return out


def parse_sass(text: str) -> dict[str, Counter]:
    """``cuobjdump -sass`` output -> symbol -> opcode (with modifiers) -> count (NOPs left out)."""
    out, cur = {}, None
    for line in text.splitlines():
        f = _SASS_FUNC.match(line)
        if f:
            cur = out.setdefault(f.group(1), Counter())
            continue
        m = _INSTR.match(line)
        if m and cur is not None and m.group(1) != "NOP":
            cur[m.group(1)] += 1
    return out


def access_bytes(opcode: str) -> int:
    """Bytes one lane moves with a global load/store opcode: LDG.E 4, .64 8, .128 16, .U16 2, .U8 1."""
    mods = opcode.split(".")[1:]
    for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mod in mods:
            return size
    return 4


def widths(ops: Counter, family: str) -> dict[int, int]:
    """Bytes per lane -> how many instructions of ``family`` (LDG, STG: global; LD, ST: generic
    addresses, which the compiler emits where it cannot prove a pointer global) move that many."""
    out: Counter = Counter()
    for op, n in ops.items():
        if op.split(".")[0] == family:
            out[access_bytes(op)] += n
    return dict(sorted(out.items()))


def census(so: str, arch: str = "sm_90") -> list[dict]:
    """One row per multi_tensor_kernel instantiation in ``so``'s ``arch`` cubin, in op, storage,
    dist order."""
    if not os.path.exists(so):
        raise FileNotFoundError(f"{so}: no such extension; build it (setup.py build_ext --inplace with "
                                f"ZEROFLOW_BUILD_CUDA=1) or pass --so")
    tool = cuobjdump()

    def dump(flag):
        run = subprocess.run([tool, "-arch", arch, flag, so], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{tool} -arch {arch} {flag} {so} failed: {run.stderr.strip()[-500:]}")
        return run.stdout

    res, sass = parse_resources(dump("-res-usage")), parse_sass(dump("-sass"))
    rows = []
    for name, r in res.items():
        which = kernel_of(name)
        if which is None:
            continue
        ops = sass.get(name)
        if ops is None:
            raise RuntimeError(f"{name}: in -res-usage but no SASS printed for it")
        rows.append({"op": which[0], "storage": which[1], "dist": which[2], **r,
                     "blocks_per_sm_by_regs": REGS_PER_SM // (r["regs"] * THREADS) if r["regs"] else None,
                     "sass_instructions": sum(ops.values()),
                     "global_loads": widths(ops, "LDG"), "global_stores": widths(ops, "STG"),
                     "generic_loads": widths(ops, "LD"), "generic_stores": widths(ops, "ST"),
                     "spill_stores": sum(n for o, n in ops.items() if o.split(".")[0] == "STL"),
                     "spill_loads": sum(n for o, n in ops.items() if o.split(".")[0] == "LDL")})
    if not rows:
        raise RuntimeError(f"{so} holds no multi_tensor_kernel for {arch} (cuobjdump -lelf lists its cubins; "
                           f"build with TORCH_CUDA_ARCH_LIST holding {arch[3:4]}.{arch[4:]})")
    order = (list(OPS.values()), list(STORAGE.values()), list(DISTS.values()))
    rows.sort(key=lambda r: (order[0].index(r["op"]), order[1].index(r["storage"]), order[2].index(r["dist"])))
    return rows


def _fmt(w: dict[int, int]) -> str:
    return " ".join(f"{b}Bx{n}" for b, n in w.items()) or "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--so", default=extension_path(), help="the CUDA extension (default: this interpreter's)")
    ap.add_argument("--arch", default="sm_90", help="the cubin to read (default sm_90, the H200's)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    rows = census(a.so, a.arch)
    print(f"{os.path.relpath(a.so, ROOT)}, {a.arch}: static counts over every path (module docstring)")
    print(f"{'op':8s} {'storage':7s} {'dist':10s} {'regs':>4s} {'stack':>5s} {'blk/SM':>6s} {'STL':>4s} {'LDL':>4s} "
          f"{'SASS':>6s}  loads: global; generic (bytes/lane x instructions) | stores: global; generic")
    for r in rows:
        print(f"{r['op']:8s} {r['storage']:7s} {r['dist']:10s} {r['regs']:4d} {r['stack_bytes']:5d} "
              f"{r['blocks_per_sm_by_regs']:6d} {r['spill_stores']:4d} {r['spill_loads']:4d} "
              f"{r['sass_instructions']:6d}  {_fmt(r['global_loads'])}; {_fmt(r['generic_loads'])} | "
              f"{_fmt(r['global_stores'])}; {_fmt(r['generic_stores'])}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        write_json(a.json, {"so": a.so, "arch": a.arch, "kernels": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
