"""Host side shared by the fused update ops: validation and the meta tensor
(pointer table, then the q seeds, then the fp32 bits of the q coefficients)."""
from __future__ import annotations

import math
import struct

import torch

from ._common import (
    ROW, build_groups, check_block, check_buffers, check_dist, check_ids, check_params,
    check_seed_arg, check_threshold, f32_bits,
)


def prepare_update(op, interp, params, buffer_lists, tensor_ids, seeds, coeffs, dist,
                   mask_seed, mask_threshold, restore_seed, block_size):
    """Validate the common arguments; returns ``(dist, T, block, groups)`` where each
    group is ``(dtypes, meta, n_rows, seed_off, tiles)``."""
    check_params(op, params, interp)
    for name, bl in buffer_lists:
        check_buffers(op, name, bl, params)
    ids = check_ids(op, tensor_ids, len(params))
    if not isinstance(seeds, (list, tuple)) or not isinstance(coeffs, (list, tuple)):
        raise ValueError(f"{op}: seeds and coeffs must be lists")
    if len(seeds) != len(coeffs):
        raise ValueError(f"{op}: seeds has {len(seeds)} entries but coeffs has {len(coeffs)}")
    seeds = [check_seed_arg(op, f"seeds[{j}]", s) for j, s in enumerate(seeds)]
    cbits = []
    for j, c in enumerate(coeffs):
        try:
            cbits.append(f32_bits(c))
        except (TypeError, OverflowError, struct.error):
            raise ValueError(f"{op}: coeffs[{j}]={c!r} must be a float representable in float32") from None
    d = check_dist(op, dist)
    T = check_threshold(op, mask_threshold)
    check_seed_arg(op, "mask_seed", mask_seed)
    check_seed_arg(op, "restore_seed", restore_seed)
    block = check_block(op, block_size or (8192 if interp else 1024))
    groups = []
    if params:
        dev = params[0].device
        for dtypes, rows, tiles in build_groups(params, [bl for _, bl in buffer_lists], ids, block):
            n_rows = len(rows) // ROW
            meta = torch.tensor(rows + seeds + cbits, dtype=torch.int64).to(dev, non_blocking=True)
            groups.append((dtypes, meta, n_rows, len(rows), tiles))
    return d, T, block, groups


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

