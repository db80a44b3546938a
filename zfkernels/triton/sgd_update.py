"""``zo_sgd_update_``: fused ZO-SGD step (restore, q-seed estimate, history, sign,
weight decay, momentum/Nesterov) in one pass over theta and its buffers
(docs/kernel-ops.md)."""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..opspec import check_scalars
from ..stream import split_seed
from ._common import (
    check_seed_arg, f32, fp32_arg, interpreted, load_row, mark_written, launch_scope, prepare_update, round32,
    slot_ptr, to_i32,
)
from ._update import load_f32, restored_estimate, update_constants
from .philox import store_param, store_rne

__all__ = ["zo_sgd_update_"]


@triton.jit(do_not_specialize=["n_rows", "seed_off", "q", "rkey0", "rkey1", "mkey0", "mkey1", "T",
                             "has_wd", "has_mom", "nesterov", "momentum_init", "sign",
                             "has_hist", "history_init", "stochastic_rounding", "skey0", "skey1"])
def _sgd_kernel(meta_ptr, n_rows, seed_off, q, rkey0, rkey1, restore_scale, mkey0, mkey1, T,
                lr, weight_decay, momentum, one_minus_dampening, history_alpha, one_minus_alpha,
                has_wd, has_mom, nesterov, momentum_init, sign, has_hist, history_init,
                stochastic_rounding, skey0, skey1,
                DIST: tl.constexpr, RESTORE: tl.constexpr, SPARSE: tl.constexpr, ONE_QUERY: tl.constexpr,
                P_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, H_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    row, base, offs, inb, tid = load_row(meta_ptr, n_rows, BLOCK)
    p_ptr = slot_ptr(row, 0, P_DTYPE)                  # slots: param, momentum, history
    b_ptr = slot_ptr(row, 1, B_DTYPE)
    h_ptr = slot_ptr(row, 2, H_DTYPE)
    theta = load_f32(p_ptr + offs, inb)
    p, g = restored_estimate(meta_ptr, seed_off, q, base, tid, theta,
                             rkey0, rkey1, restore_scale, mkey0, mkey1, T,
                             h_ptr + offs, inb, history_alpha, one_minus_alpha,
                             has_hist, history_init, sign, DIST, RESTORE, SPARSE, ONE_QUERY, BLOCK)
    if has_wd != 0:
        g = g + p * weight_decay
    if has_mom != 0:
        if momentum_init != 0:
            buf = g
        else:
            buf = load_f32(b_ptr + offs, inb) * momentum + g * one_minus_dampening
        buf = store_rne(b_ptr + offs, buf, inb)     # later steps read the stored buf
        if nesterov != 0:
            g = g + buf * momentum
        else:
            g = buf
    store_param(p_ptr + offs, p - g * lr, inb, base, tid, skey0.to(tl.uint32, bitcast=True),
                skey1.to(tl.uint32, bitcast=True), stochastic_rounding, BLOCK)


def zo_sgd_update_(
    params: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    history_buffers: Sequence[torch.Tensor],
    tensor_ids: Sequence[int],
    seeds: Sequence[int],
    coeffs: Sequence[float],
    dist: int,
    mask_seed: int,
    mask_threshold: int,
    restore_seed: int,
    restore_scale: float,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    momentum_init: bool,
    sign: bool,
    history_alpha: float,
    history_init: bool,
    stochastic_rounding: bool,
    round_seed: int,
    *,
    block_size: int | None = None,
) -> None:
    """Fused ZO-SGD step, in place, one pass per tensor (docs/kernel-ops.md)::

        p   = theta + restore_scale * m * z(restore_seed)      (skipped if restore_scale == 0)
        g   = sum_j coeffs[j] * m * z(seeds[j])
        h   = g if history_init else a*h + (1-a)*g ; g = h     (if history_buffers)
        g   = sign(g)                                          (if sign)
        g   = g + weight_decay * p
        buf = g if momentum_init else momentum*buf + (1-dampening)*g   (if momentum_buffers)
        g   = g + momentum*buf if nesterov else buf
        theta = p - lr * g

    Args:
        params: contiguous float32/bfloat16/float16 tensors on one device.
        momentum_buffers, history_buffers: ``[]`` (feature off) or one per param, same
            shape/device, dtype = the param's or float32.
        tensor_ids: stream id per tensor in ``[0, 2^32)``.
        seeds, coeffs: the q query seeds (``[0, 2^63)``) and coefficients ``g_j / q``.
        dist: 0 Gaussian, 1 Rademacher. mask_seed / mask_threshold: sparse mask (T=0: off).
        restore_seed, restore_scale: pending perturbation to undo first.
        lr, weight_decay, momentum, dampening, nesterov, momentum_init: as torch.optim.SGD.
        sign: replace g by sign(g) (sign(0) = 0). history_alpha, history_init: EMA of g.
        block_size: elements per program (power of two >= 128); results do not depend on it.
    """
    op = "zo_sgd_update_"
    interp = interpreted(_sgd_kernel)
    written = [("params", params), ("momentum_buffers", momentum_buffers), ("history_buffers", history_buffers)]
    d, T, block, groups = prepare_update(op, interp, params, written[1:], tensor_ids, seeds, coeffs, dist,
                                         mask_seed, mask_threshold, restore_seed, block_size)
    # Scalars rounded to fp32; derived ones (1 - dampening, 1 - alpha) in fp64 from the
    # unrounded arguments, then rounded once, as torch.optim.SGD does (docs/kernel-ops.md).
    raw = dict(restore_scale=restore_scale, lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening,
               history_alpha=history_alpha, momentum_buffers=momentum_buffers, history_buffers=history_buffers)
    one_minus_damp, one_minus_alpha = round32(1.0 - float(dampening)), round32(1.0 - float(history_alpha))
    restore_scale = f32(restore_scale, "restore_scale", op)
    lr = f32(lr, "lr", op)
    weight_decay = f32(weight_decay, "weight_decay", op)
    momentum = f32(momentum, "momentum", op)
    dampening = f32(dampening, "dampening", op)
    history_alpha = f32(history_alpha, "history_alpha", op)
    sk0, sk1 = split_seed(check_seed_arg(op, "round_seed", round_seed))
    check_scalars(op, raw, f"{op}: ")      # the unrounded values, as the compiled ops see them
    rk0, rk1 = split_seed(restore_seed)
    mk0, mk1 = split_seed(mask_seed)
    mark_written(op, written)
    with launch_scope(params[0].device if len(params) else None, interp):   # Triton launches on the current device
        for dtypes, meta, n_rows, seed_off, tiles in groups:
            f = [fp32_arg(x, interp) for x in (restore_scale, lr, weight_decay, momentum, one_minus_damp,
                                                 history_alpha, one_minus_alpha)]
            _sgd_kernel[(tiles,)](
                meta, n_rows, seed_off, len(seeds), to_i32(rk0), to_i32(rk1), f[0],
                to_i32(mk0), to_i32(mk1), T, *f[1:],
                int(weight_decay != 0.0), int(len(momentum_buffers) > 0),
                int(bool(nesterov)), int(bool(momentum_init)), int(bool(sign)), int(len(history_buffers) > 0),
                int(bool(history_init)), int(bool(stochastic_rounding)), to_i32(sk0), to_i32(sk1),
                **update_constants(d, restore_scale, T, seeds),
                P_DTYPE=dtypes[0], B_DTYPE=dtypes[1], H_DTYPE=dtypes[2], BLOCK=block, num_warps=4,
                enable_fp_fusion=False,   # one arithmetic: no FMA contraction (docs/kernel-ops.md)
            )
