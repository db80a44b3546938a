"""What the Triton kernels share besides the stream: the pointer table that lets one launch
cover a whole list of tensors (built here on the host, read by :func:`load_row` in the
kernels), input validation (docs/kernel-ops.md, "Errors"), and the scalar arguments as the
kernels take them (keys as int32 bits, options rounded to fp32)."""
from __future__ import annotations

import contextlib
import math
import struct
import threading
from typing import Sequence

import torch
import triton
import triton.language as tl

from .._overlap import check_no_overlap
from ..opspec import check_writable
from ..stream import MASK32, MASK_ONE, TENSOR_ID_LIMIT, check_seed, dist_code

FLOAT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# ----------------------------------------------------------------------------- pointer table
# One int64 row per tensor: [slot 0, slot 1, slot 2, slot 3, numel, tensor_id, first_tile, 0].
# The slots hold data pointers: the param, then the op's buffers in schema order (SGD:
# momentum, history; Adam: m, v, history; docs/kernel-ops.md, "Schemas"). first_tile is the
# index of the tensor's first program within its launch. (constexpr: readable in @jit code.)
ROW = tl.constexpr(8)
COL_NUMEL = tl.constexpr(4)
COL_TID = tl.constexpr(5)
COL_START = tl.constexpr(6)


def interpreted(kernel) -> bool:
    """True when ``kernel`` runs in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def interpreting() -> bool:
    """True when this package's kernels run in Triton's CPU interpreter: Triton decided it when
    it decorated them, at import, from TRITON_INTERPRET ("1", "true", "on", ...)."""
    return interpreted(_runtime_loop_probe)


@triton.jit
def _runtime_loop_probe(out_ptr, n):
    acc = 0
    for _ in range(0, n):
        acc += 1
    tl.store(out_ptr, acc)


def check_interpreter(probe=_runtime_loop_probe) -> None:
    """Under ``TRITON_INTERPRET=1``: raise a ``RuntimeError`` that says what to change if the
    interpreter cannot loop over a runtime integer argument, as every update kernel's query
    loop does (``for j in range(0, q)``). Triton 3.6's interpreter passes such an argument as
    a 1-element array and calls ``int()`` on it, which numpy >= 2.4 refuses (Triton 3.8
    squeezes it first); without this check each update op failed deep in the interpreter
    (77 test failures under the device image's Triton 3.6 and numpy 2.5.2)."""
    if not interpreted(probe):
        return
    out = torch.zeros(1, dtype=torch.int32)
    try:
        probe[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - the interpreter wraps the numpy TypeError in its own errors
        why = f"{type(exc).__name__}: {exc}"
    else:
        why = None if int(out[0]) == 3 else f"a loop of 3 iterations counted {int(out[0])}"
    if why is not None:
        import numpy

        raise RuntimeError(
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot loop over a runtime integer "
            f"with numpy {numpy.__version__} ({why}); install numpy<2.4 or a Triton whose interpreter can "
            "(3.8 can), or use a compiled backend (backend='cpu')"
        )


def to_i32(word: int) -> int:
    """A uint32 word as the int32 with the same bits (kernels bitcast it back): keeps
    every key argument a 32-bit scalar so one compile serves all seeds."""
    word &= MASK32
    return word - (1 << 32) if word >= 1 << 31 else word


def f32_bits(x: float) -> int:
    """Bits of ``float32(x)`` (round-to-nearest-even from the Python double)."""
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


def device_ok(op: str, name: str, t: torch.Tensor, interp: bool) -> None:
    """Compiled kernels run GPU tensors, the interpreter CPU tensors only. The
    interpreter copies a launch's tensor *arguments* to the host and back, but perturb_ and
    the updates reach their tensors through the raw addresses of the pointer table, which it
    cannot see: with CUDA tensors it read device addresses on the host (a crash), with meta
    tensors it failed inside Triton ("Cannot copy out of meta tensor")."""
    if interp and t.device.type != "cpu":
        raise ValueError(
            f"{op}: {name} is on {t.device}; Triton's interpreter (TRITON_INTERPRET=1) runs these kernels on CPU "
            "tensors only: move the tensors to the CPU, or unset TRITON_INTERPRET before zfkernels.triton is "
            "imported to run the compiled Triton kernels on the GPU"
        )
    if not interp and t.device.type == "cpu":     # (meta tensors pass: benchmarks/sass_census.py records launches)
        raise ValueError(
            f"{op}: {name} is on the CPU; the Triton kernels need GPU tensors "
            "(or TRITON_INTERPRET=1 set before zfkernels.triton is imported)"
        )


# Triton's CPU interpreter patches triton.language module-wide for the length of a launch and
# undoes it at the end: two threads launching at once (two optimizers stepped in two threads)
# made the other launch fail mid-grid ("Did you forget to add @triton.jit ?"), with some of
# its tiles written. Interpreted launches of these kernels run one at a time.
_INTERPRETER_LOCK = threading.RLock()


def launch_scope(device: torch.device | None, interp: bool):
    """The context the kernel launches of one op call run in.

    On a GPU: the tensors' device made the current one. Triton launches on the *current* CUDA
    device and its current stream (``JITFunction.run``: ``driver.active.get_current_device()``),
    not on the device of the tensors it is given, so params on cuda:1 while cuda:0 is current
    (``--device cuda:1``, a model split over GPUs, whose param groups the optimizers call once
    per device) ran cuda:0's kernel on cuda:1's memory, on cuda:0's stream (unordered with the
    work that made the params). The compiled CUDA ops enter the params' device the same way
    (csrc/ops_cuda.cu, ``CudaLauncher``: ``CUDAGuard``).
    In the interpreter: the process-wide lock (see ``_INTERPRETER_LOCK``), and the device
    as above where its tensors are on a GPU."""
    if device is None or device.type != "cuda":
        return _INTERPRETER_LOCK if interp else contextlib.nullcontext()
    if not interp:
        return torch.cuda.device(device)
    both = contextlib.ExitStack()
    both.enter_context(_INTERPRETER_LOCK)
    try:
        both.enter_context(torch.cuda.device(device))
    except BaseException:
        both.close()              # the lock is not left held
        raise
    return both


def check_params(op: str, params: Sequence[torch.Tensor], interp: bool, name: str = "params") -> torch.device | None:
    if not isinstance(params, (list, tuple)):
        raise ValueError(f"{op}: {name} must be a list of tensors, got {type(params).__name__}")
    device = None
    for k, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"{op}: {name}[{k}] must be a torch.Tensor, got {type(p).__name__}")
        if p.layout != torch.strided:
            raise ValueError(f"{op}: {name}[{k}] must be a dense (strided) tensor, got layout {p.layout}")
        if p.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{op}: {name}[{k}] has dtype {p.dtype}; only float32, bfloat16 and float16 are supported"
            )
        if not p.is_contiguous():
            raise ValueError(f"{op}: {name}[{k}] must be contiguous")
        if device is None:
            device = p.device
        elif p.device != device:
            raise ValueError(f"{op}: {name}[{k}] is on {p.device} but {name}[0] is on {device}; use one device")
        device_ok(op, f"{name}[{k}]", p, interp)
    return device


def check_buffers(op: str, name: str, bufs: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> None:
    if not isinstance(bufs, (list, tuple)):
        raise ValueError(f"{op}: {name} must be a list of tensors, got {type(bufs).__name__}")
    if len(bufs) == 0:
        return
    if len(bufs) != len(params):
        raise ValueError(f"{op}: {name} has {len(bufs)} tensors but params has {len(params)} (use [] to disable)")
    for k, (b, p) in enumerate(zip(bufs, params)):
        if not isinstance(b, torch.Tensor):
            raise ValueError(f"{op}: {name}[{k}] must be a torch.Tensor, got {type(b).__name__}")
        if b.layout != torch.strided:
            raise ValueError(f"{op}: {name}[{k}] must be a dense (strided) tensor")
        if b.dtype not in (p.dtype, torch.float32):
            raise ValueError(f"{op}: {name}[{k}] has dtype {b.dtype}; it must be {p.dtype} (the param's) or float32")
        if b.shape != p.shape:
            raise ValueError(f"{op}: {name}[{k}] has shape {tuple(b.shape)} but params[{k}] has {tuple(p.shape)}")
        if b.device != p.device:
            raise ValueError(f"{op}: {name}[{k}] is on {b.device} but params[{k}] is on {p.device}")
        if not b.is_contiguous():
            raise ValueError(f"{op}: {name}[{k}] must be contiguous")


def check_ids(op: str, tensor_ids: Sequence[int], n: int) -> list[int]:
    if not isinstance(tensor_ids, (list, tuple)):
        raise ValueError(f"{op}: tensor_ids must be a list of ints")
    if len(tensor_ids) != n:
        raise ValueError(f"{op}: tensor_ids has {len(tensor_ids)} entries but params has {n}")
    out = []
    for k, t in enumerate(tensor_ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < TENSOR_ID_LIMIT:
            raise ValueError(f"{op}: tensor_ids[{k}]={t!r} must be an int in [0, 2**32)")
        out.append(int(t))
    return out


def check_seed_arg(op: str, name: str, seed: int) -> int:
    try:
        return check_seed(seed, name)
    except TypeError as e:
        raise ValueError(f"{op}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{op}: {e}") from None


def check_dist(op: str, dist) -> int:
    try:
        return dist_code(dist)
    except ValueError as e:
        raise ValueError(f"{op}: {e}") from None


def check_threshold(op: str, mask_threshold: int) -> int:
    if isinstance(mask_threshold, bool) or not isinstance(mask_threshold, int) or not 0 <= mask_threshold <= MASK_ONE:
        raise ValueError(f"{op}: mask_threshold={mask_threshold!r} must be an int in [0, 2**24]")
    return int(mask_threshold)


def check_block(op: str, block: int, least: int = 128) -> int:
    """``block_size``: a power of two from ``least`` (the update tiles are ``[BLOCK // 128, 32,
    4]``) to Triton's largest block (2^20 elements); a larger one failed in the launch, after
    the version counters were bumped, with Triton's "exceeds triton maximum tensor numel"."""
    most = getattr(tl, "TRITON_MAX_TENSOR_NUMEL", 1 << 20)     # 2^20 in every Triton release since 2.1
    if isinstance(block, bool) or not isinstance(block, int) or not least <= block <= most or block & (block - 1):
        raise ValueError(f"{op}: block_size={block!r} must be a power of two from {least} to {most}")
    return block


def build_groups(params, buffer_lists, tensor_ids, block: int):
    """Split the non-empty tensors into groups of equal dtype signature (param dtype,
    buffer dtypes) and build one pointer table per group (one launch each).

    Returns a list of ``(dtypes, rows, n_rows, n_tiles)``: the Triton dtype of each slot,
    the table as a flat list of ints (ROW per tensor, see above; an absent buffer's slot
    keeps its position and holds the param's pointer, never read), its number of rows and
    of tiles (programs)."""
    groups: dict = {}
    for k, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        bufs = [bl[k] if len(bl) else p for bl in buffer_lists]  # absent: placeholder
        key = (p.dtype,) + tuple(b.dtype for b in bufs)
        g = groups.setdefault(key, [[], 0])
        ptrs = [p.data_ptr()] + [b.data_ptr() for b in bufs]
        ptrs += [p.data_ptr()] * (4 - len(ptrs))
        g[0].extend(ptrs + [n, tensor_ids[k], g[1], 0])
        g[1] += triton.cdiv(n, block)
    out = []
    for key, (rows, tiles) in groups.items():
        dtypes = [FLOAT_DTYPES[d] for d in key] + [FLOAT_DTYPES[key[0]]] * (4 - len(key))
        out.append((dtypes, rows, len(rows) // ROW.value, tiles))
    return out


def prepare_update(op, interp, params, buffer_lists, tensor_ids, seeds, coeffs, dist,
                   mask_seed, mask_threshold, restore_seed, block_size):
    """Validate the arguments the fused update ops share; returns ``(dist, T, block,
    groups)`` where each group is ``(dtypes, meta, n_rows, seed_off, tiles)``: ``meta``
    is the pointer table followed by the q seeds, then the fp32 bits of the q coefficients
    (seeds from ``seed_off``), on the params' device."""
    check_params(op, params, interp)
    for name, bl in buffer_lists:
        check_buffers(op, name, bl, params)
    check_no_overlap([("params", params), *buffer_lists], f"{op}: ")
    ids = check_ids(op, tensor_ids, len(params))
    if not isinstance(seeds, (list, tuple)) or not isinstance(coeffs, (list, tuple)):
        raise ValueError(f"{op}: seeds and coeffs must be lists")
    if len(seeds) != len(coeffs):
        raise ValueError(f"{op}: seeds has {len(seeds)} entries but coeffs has {len(coeffs)}")
    seeds = [check_seed_arg(op, f"seeds[{j}]", s) for j, s in enumerate(seeds)]
    # Rounded to fp32 like every scalar (a finite value beyond fp32's range becomes inf, as on
    # every backend), then passed as bits.
    cbits = [f32_bits(f32(c, f"coeffs[{j}]", op)) for j, c in enumerate(coeffs)]
    d = check_dist(op, dist)
    T = check_threshold(op, mask_threshold)
    check_seed_arg(op, "mask_seed", mask_seed)
    check_seed_arg(op, "restore_seed", restore_seed)
    block = check_block(op, block_size or (8192 if interp else 1024))
    groups = []
    if params:
        dev = params[0].device
        for dtypes, rows, n_rows, tiles in build_groups(params, [bl for _, bl in buffer_lists], ids, block):
            meta = torch.tensor(rows + seeds + cbits, dtype=torch.int64).to(dev, non_blocking=True)
            groups.append((dtypes, meta, n_rows, len(rows), tiles))
    return d, T, block, groups


def mark_written(op: str, lists: Sequence[tuple[str, Sequence[torch.Tensor]]]) -> None:
    """Before a launch: autograd's version counter of every tensor it writes (``lists``:
    ``(name, tensors)`` pairs) is bumped. The kernels write through data pointers, which
    autograd cannot see, so a backward over a graph that saved one of these tensors would run
    on the new values without complaint; torch's in-place ops and the compiled ops (their
    ADInplaceOrView kernels, csrc/ops.cpp) bump it. As they do, an inference tensor is refused
    outside inference mode (``increment_version`` skips it silently), and with grad mode on a
    tensor that requires grad (the kernels wrote such a leaf: opspec.check_writable)."""
    check_writable(op, lists, f"{op}: ")
    torch.autograd.graph.increment_version([t for _, ts in lists for t in ts])


# ----------------------------------------------------------------------------- scalars
def round32(x: float) -> float:
    """``float32(x)`` as a Python float (round-to-nearest-even; overflow gives inf)."""
    x = float(x)
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def f32(x: float, name: str, op: str) -> float:
    """A scalar argument rounded to float32, as the kernels (and the reference) use it."""
    try:
        return round32(x)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: {name}={x!r} must be a float") from None


def fp32_arg(x: float, interp: bool):
    """A fp32 scalar kernel argument that keeps the sign of a zero. Triton's interpreter passes
    a Python float argument through as a constant, and its ``scalar_constant`` makes every
    ``value == 0`` the null value +0.0: ``scale=-0.0`` ran as +0.0 there (perturb_ of a -0.0
    weight stored -0.0 where every other backend stores +0.0, docs/kernel-ops.md "perturb_"). A
    -0.0 goes to the interpreter as a fp32 scalar tensor instead; compiled kernels take the
    float as a fp32 parameter, which keeps it."""
    if interp and x == 0.0 and math.copysign(1.0, x) < 0.0:
        import numpy as np
        from triton.runtime.interpreter import TensorHandle

        return tl.tensor(TensorHandle(np.array([x], dtype=np.float32), tl.float32), tl.float32)
    return x


# ----------------------------------------------------------------------------- @jit: the table
@triton.jit
def tile_offsets(base, BLOCK: tl.constexpr):
    """int64 element indices ``[R, 32, 4]`` of the tile starting at ``base`` (int64), in
    the tile layout of zfkernels/triton/philox.py (``R = BLOCK // 128``)."""
    R: tl.constexpr = BLOCK // 128
    r = tl.arange(0, R).to(tl.int64)[:, None, None]
    q = tl.arange(0, 32)[None, :, None]
    lane = tl.arange(0, 4)[None, None, :]
    return base + r * 128 + (q * 4 + lane)


@triton.jit
def find_row(meta_ptr, n_rows, pid):
    """Binary search over the pointer table: the last row whose first tile is ``<= pid``,
    and ``pid``'s tile index within that row's tensor."""
    lo = n_rows * 0
    hi = n_rows - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        st = tl.load(meta_ptr + mid.to(tl.int64) * ROW + COL_START)
        ok = st <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    start = tl.load(meta_ptr + lo.to(tl.int64) * ROW + COL_START)
    return lo.to(tl.int64), pid - start


@triton.jit
def load_row(meta_ptr, n_rows, BLOCK: tl.constexpr):
    """This program's place in the table: ``(row, base, offs, inb, tid)`` -- the address of
    its tensor's row (pass it to :func:`slot_ptr`), the first element of its tile, the
    tile's element indices and which of them lie inside the tensor, and the tensor id."""
    row_index, tile = find_row(meta_ptr, n_rows, tl.program_id(0).to(tl.int64))
    row = meta_ptr + row_index * ROW
    numel = tl.load(row + COL_NUMEL)
    tid = tl.load(row + COL_TID).to(tl.uint32)
    base = tile * BLOCK
    offs = tile_offsets(base, BLOCK)
    return row, base, offs, offs < numel, tid


@triton.jit
def slot_ptr(row, slot: tl.constexpr, DTYPE: tl.constexpr):
    """The data pointer in ``slot`` of a table row, typed ``DTYPE``."""
    return tl.load(row + slot).to(tl.pointer_type(DTYPE))
