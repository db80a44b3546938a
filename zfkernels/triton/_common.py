"""Host-side helpers of the Triton backend: input validation (docs/kernel-ops.md,
"Errors"), key splitting, and the pointer tables that let one launch cover a whole list
of tensors."""
from __future__ import annotations

import struct
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..stream import MASK32, MASK_ONE, TENSOR_ID_LIMIT, check_seed, dist_code

FLOAT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Pointer-table row: [ptr0, ptr1, ptr2, ptr3, numel, tensor_id, first_tile, 0] (int64).
ROW = 8
COL_NUMEL = 4
COL_TID = 5
COL_START = 6


def interpreted(kernel) -> bool:
    """True when ``kernel`` runs in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def to_i32(word: int) -> int:
    """A uint32 word as the int32 with the same bits (kernels bitcast it back): keeps
    every key argument a 32-bit scalar so one compile serves all seeds."""
    word &= MASK32
    return word - (1 << 32) if word >= 1 << 31 else word


def f32_bits(x: float) -> int:
    """Bits of ``float32(x)`` (round-to-nearest-even from the Python double)."""
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


def device_ok(op: str, name: str, t: torch.Tensor, interp: bool) -> None:
    if t.device.type == "cpu" and not interp:
        raise ValueError(
            f"{op}: {name} is on the CPU; the Triton kernels need GPU tensors "
            "(or TRITON_INTERPRET=1 set before zfkernels.triton is imported)"
        )


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


def check_block(op: str, block: int) -> int:
    if not isinstance(block, int) or block < 128 or block & (block - 1):
        raise ValueError(f"{op}: block_size={block!r} must be a power of two >= 128")
    return block


def build_groups(params, buffer_lists, tensor_ids, block: int):
    """Split the non-empty tensors into groups of equal dtype signature (param dtype,
    buffer dtypes) and build one pointer-table per group.

    Returns a list of ``(dtypes, rows, n_tiles)``; ``rows`` is a flat list of ints, ROW per
    tensor: the data pointers (param, then buffers; the param's pointer repeats for
    absent buffers, whose slot keeps its position), numel, tensor id and the group-local index of its first tile."""
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
        out.append((dtypes, rows, tiles))
    return out
