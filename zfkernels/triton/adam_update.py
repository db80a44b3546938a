"""``zo_adam_update_``: fused ZO-Adam/AdamW step (restore, q-seed estimate, history,
sign, weight decay, moments, bias-corrected update) in one pass (docs/kernel-ops.md)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..opspec import check_adam_scalars, check_betas, check_scalars
from .. import stream as S
from ..stream import split_seed
from ._common import (
    check_seed_arg, f32, fp32_arg, interpreted, load_row, mark_written, launch_scope, prepare_update, round32,
    slot_ptr, to_i32,
)
from ._update import load_f32, restored_estimate, update_constants
from .philox import store_param, store_rne

__all__ = ["zo_adam_update_"]


@triton.jit(do_not_specialize=["n_rows", "seed_off", "q", "rkey0", "rkey1", "mkey0", "mkey1", "T",
                             "has_wd", "decoupled", "sign", "has_hist", "history_init",
                             "stochastic_rounding", "skey0", "skey1"])
def _adam_kernel(meta_ptr, n_rows, seed_off, q, rkey0, rkey1, restore_scale, mkey0, mkey1, T,
                 weight_decay, decay_factor, one_minus_beta1, beta2, one_minus_beta2, eps,
                 step_size, bc2_sqrt, history_alpha, one_minus_alpha,
                 has_wd, decoupled, sign, has_hist, history_init, stochastic_rounding, skey0, skey1,
                 DIST: tl.constexpr, RESTORE: tl.constexpr, SPARSE: tl.constexpr, ONE_QUERY: tl.constexpr,
                 P_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr,
                 H_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    row, base, offs, inb, tid = load_row(meta_ptr, n_rows, BLOCK)
    p_ptr = slot_ptr(row, 0, P_DTYPE)                  # slots: param, m, v, history
    m_ptr = slot_ptr(row, 1, M_DTYPE)
    v_ptr = slot_ptr(row, 2, V_DTYPE)
    h_ptr = slot_ptr(row, 3, H_DTYPE)
    theta = load_f32(p_ptr + offs, inb)
    p, g = restored_estimate(meta_ptr, seed_off, q, base, tid, theta,
                             rkey0, rkey1, restore_scale, mkey0, mkey1, T,
                             h_ptr + offs, inb, history_alpha, one_minus_alpha,
                             has_hist, history_init, sign, DIST, RESTORE, SPARSE, ONE_QUERY, BLOCK)
    if decoupled != 0:
        p = p * decay_factor                           # AdamW: p * (1 - lr*wd)
    elif has_wd != 0:
        g = g + p * weight_decay                       # Adam: L2
    m = load_f32(m_ptr + offs, inb)
    m = m + (g - m) * one_minus_beta1                  # torch's lerp form (weight < 0.5)
    v = load_f32(v_ptr + offs, inb) * beta2 + (g * g) * one_minus_beta2
    m = store_rne(m_ptr + offs, m, inb)                # later steps read the stored m, v
    v = store_rne(v_ptr + offs, v, inb)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    store_param(p_ptr + offs, p - tl.div_rn(m, denom) * step_size, inb, base, tid,
                skey0.to(tl.uint32, bitcast=True), skey1.to(tl.uint32, bitcast=True), stochastic_rounding, BLOCK)


def zo_adam_update_(
    params: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
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
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    step: int,
    sign: bool,
    history_alpha: float,
    history_init: bool,
    stochastic_rounding: bool,
    round_seed: int,
    *,
    block_size: int | None = None,
) -> None:
    """Fused ZO-Adam / AdamW step, in place (docs/kernel-ops.md)::

        p, g as in zo_sgd_update_ (restore, estimate, history, sign)
        p = p * (1 - lr*wd)  if decoupled_weight_decay  else  g = g + wd * p
        m = lerp(m, g, 1 - beta1) ; v = beta2*v + (1-beta2)*g*g
        theta = p - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)

    with ``bc1 = 1 - beta1**step``, ``bc2 = 1 - beta2**step`` in float64 on the host: this
    is ``torch.optim.Adam``/``AdamW`` (non-amsgrad) fed ``.grad = g``.

    Args:
        params: contiguous float32/bfloat16/float16 tensors on one device.
        exp_avgs, exp_avg_sqs: one per param (same shape/device, dtype = param's or float32).
        history_buffers: ``[]`` (off) or one per param.
        tensor_ids, seeds, coeffs, dist, mask_seed, mask_threshold, restore_seed,
            restore_scale, sign, history_alpha, history_init: as in ``zo_sgd_update_``.
        lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay: as torch.optim.Adam(W).
        step: the step count after this update, ``>= 1``.
        block_size: elements per program (power of two >= 128); results do not depend on it.
    """
    op = "zo_adam_update_"
    interp = interpreted(_adam_kernel)
    if len(params) and (len(exp_avgs) != len(params) or len(exp_avg_sqs) != len(params)):
        raise ValueError(
            f"{op}: exp_avgs ({len(exp_avgs)}) and exp_avg_sqs ({len(exp_avg_sqs)}) need one "
            f"tensor per param ({len(params)})"
        )
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{op}: step={step!r} must be an int >= 1 and < 2**63")
    S.check_adam_step(step, f"{op}: ")
    written = [("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
               ("history_buffers", history_buffers)]
    d, T, block, groups = prepare_update(op, interp, params, written[1:], tensor_ids, seeds, coeffs, dist,
                                         mask_seed, mask_threshold, restore_seed, block_size)
    weight_decay_raw, history_alpha_raw, restore_scale_raw, eps_raw = weight_decay, history_alpha, restore_scale, eps
    restore_scale = f32(restore_scale, "restore_scale", op)
    f32(lr, "lr", op)          # checked like every scalar; the kernel takes lr/bc1 and 1 - beta1
    f32(beta1, "beta1", op)
    b2 = f32(beta2, "beta2", op)
    check_betas(beta1, beta2, f"{op}: ")
    check_adam_scalars(lr, beta1, step, weight_decay, decoupled_weight_decay, f"{op}: ")
    eps = f32(eps, "eps", op)
    weight_decay = f32(weight_decay, "weight_decay", op)
    history_alpha = f32(history_alpha, "history_alpha", op)
    check_scalars(op, dict(restore_scale=restore_scale_raw, lr=lr, eps=eps_raw, weight_decay=weight_decay_raw,
                           history_alpha=history_alpha_raw, history_buffers=history_buffers), f"{op}: ")
    # Bias corrections and the derived scalars (1 - beta, 1 - lr*wd, 1 - alpha) in fp64 from
    # the unrounded arguments, then rounded once to fp32: what torch.optim.Adam(W) passes
    # to its kernels (docs/kernel-ops.md).
    bc1 = 1.0 - float(beta1) ** step
    bc2 = 1.0 - float(beta2) ** step
    step_size = round32(float(lr) / bc1)
    bc2_sqrt = round32(math.sqrt(bc2))     # correctly rounded, as C's sqrt: pow(bc2, 0.5) is not
    sk0, sk1 = split_seed(check_seed_arg(op, "round_seed", round_seed))
    rk0, rk1 = split_seed(restore_seed)
    mk0, mk1 = split_seed(mask_seed)
    mark_written(op, written)
    with launch_scope(params[0].device if len(params) else None, interp):   # Triton launches on the current device
        for dtypes, meta, n_rows, seed_off, tiles in groups:
            f = [fp32_arg(x, interp) for x in (
                restore_scale, weight_decay, round32(1.0 - float(lr) * float(weight_decay_raw)),
                round32(1.0 - float(beta1)), b2, round32(1.0 - float(beta2)), eps, step_size, bc2_sqrt,
                history_alpha, round32(1.0 - float(history_alpha_raw)))]
            _adam_kernel[(tiles,)](
                meta, n_rows, seed_off, len(seeds), to_i32(rk0), to_i32(rk1), f[0],
                to_i32(mk0), to_i32(mk1), T, *f[1:],
                int(weight_decay != 0.0), int(bool(decoupled_weight_decay)),
                int(bool(sign)), int(len(history_buffers) > 0), int(bool(history_init)),
                int(bool(stochastic_rounding)), to_i32(sk0), to_i32(sk1),
                **update_constants(d, restore_scale, T, seeds),
                P_DTYPE=dtypes[0], M_DTYPE=dtypes[1], V_DTYPE=dtypes[2], H_DTYPE=dtypes[3], BLOCK=block,
                num_warps=4, enable_fp_fusion=False,   # one arithmetic: no FMA contraction
            )
