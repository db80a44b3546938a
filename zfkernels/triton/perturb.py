"""``perturb_``: theta <- theta + scale * m * z(seed), one pass, in place (docs/kernel-ops.md)."""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .._overlap import check_no_overlap
from ..opspec import check_scalars
from ..stream import split_seed
from ._common import (
    build_groups, check_block, check_dist, check_ids, check_params, check_seed_arg, check_threshold, f32, fp32_arg,
    interpreted, load_row, mark_written, launch_scope, slot_ptr, to_i32,
)
from ._update import load_f32
from .philox import mask_tile, store_rne, z_tile

__all__ = ["perturb_"]


@triton.jit(do_not_specialize=["n_rows", "key0", "key1", "mkey0", "mkey1", "T", "dist"])
def _perturb_kernel(meta_ptr, n_rows, key0, key1, mkey0, mkey1, T, dist, scale,
                    P_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    row, base, offs, inb, tid = load_row(meta_ptr, n_rows, BLOCK)
    p_ptr = slot_ptr(row, 0, P_DTYPE)
    x = load_f32(p_ptr + offs, inb)                # bf16 by its bits (load_f32)
    z = z_tile(base, tid, key0.to(tl.uint32, bitcast=True), key1.to(tl.uint32, bitcast=True), dist, BLOCK)
    if T > 0:                                   # x + (z * m) * scale
        z = z * mask_tile(base, tid, mkey0.to(tl.uint32, bitcast=True), mkey1.to(tl.uint32, bitcast=True),
                          T.to(tl.uint32), BLOCK)
    store_rne(p_ptr + offs, x + z * scale, inb)


def perturb_(
    params: Sequence[torch.Tensor],
    tensor_ids: Sequence[int],
    seed: int,
    scale: float,
    dist: int,
    mask_seed: int,
    mask_threshold: int,
    *,
    block_size: int | None = None,
) -> None:
    """In place ``theta_i <- theta_i + scale * m_i * z(seed)_i`` for every tensor.

    Args:
        params: contiguous float32/bfloat16/float16 tensors on one device (modified).
        tensor_ids: stream id of each tensor, ints in ``[0, 2^32)`` (§2).
        seed: perturbation seed in ``[0, 2^63)``.
        scale: multiplier of ``z`` (fp32).
        dist: 0 = Gaussian (§5), 1 = Rademacher (§4) (``"gaussian"``/``"rademacher"`` accepted).
        mask_seed: seed of the sparse mask stream (§6), in ``[0, 2^63)``.
        mask_threshold: ``T`` in ``[0, 2^24]``; 0 = no mask.
        block_size: elements per program (power of two >= 128; default 1024, 8192 in
            the interpreter). Results do not depend on it.
    """
    op = "perturb_"
    interp = interpreted(_perturb_kernel)
    check_params(op, params, interp)
    check_no_overlap([("params", params)], f"{op}: ")
    ids = check_ids(op, tensor_ids, len(params))
    seed = check_seed_arg(op, "seed", seed)
    mask_seed = check_seed_arg(op, "mask_seed", mask_seed)
    d = check_dist(op, dist)
    T = check_threshold(op, mask_threshold)
    block = check_block(op, block_size or (8192 if interp else 1024))
    scale_raw, scale = scale, f32(scale, "scale", op)
    check_scalars(op, {"scale": scale_raw}, f"{op}: ")      # the unrounded value, as the compiled ops see it
    if not params:
        return
    k0, k1 = split_seed(seed)
    m0, m1 = split_seed(mask_seed)
    dev = params[0].device
    mark_written(op, [("params", params)])
    with launch_scope(dev, interp):      # Triton launches on the current device and stream: the params' ones
        for dtypes, rows, n_rows, tiles in build_groups(params, [], ids, block):
            meta = torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True)
            _perturb_kernel[(tiles,)](
                meta, n_rows, to_i32(k0), to_i32(k1), to_i32(m0), to_i32(m1), T, d, fp32_arg(scale, interp),
                P_DTYPE=dtypes[0], BLOCK=block, num_warps=4,
                enable_fp_fusion=False,   # one arithmetic: no FMA contraction (docs/kernel-ops.md)
            )
