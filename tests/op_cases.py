"""Argument builders and comparison rules of the compiled-op parity tests, shared by
tests/test_compiled_ops.py (CPU kernels) and tests/test_cuda_ops.py (CUDA kernels), which
call the ops and the reference (zfkernels/reference.py) with the same positional schema."""
from __future__ import annotations

import torch

GAUSS, RADE = 0, 1
T_HALF = 1 << 23  # mask threshold: sparsity 0.5


def sgd_args(params, mom, hist, ids, seeds, coeffs, dist, T, cfg):
    """zo_sgd_update_'s arguments (mask_seed 31), options from ``cfg``."""
    return (
        params, mom, hist, ids, seeds, coeffs, dist, 31, T, cfg.get("restore_seed", 0),
        cfg.get("restore_scale", 0.0), cfg.get("lr", 0.05), cfg.get("weight_decay", 0.0),
        cfg.get("momentum", 0.0), cfg.get("dampening", 0.0), cfg.get("nesterov", False),
        cfg.get("momentum_init", False), cfg.get("sign", False), cfg.get("history_alpha", 0.0),
        cfg.get("history_init", False),
    )


def adam_args(params, m, v, hist, ids, seeds, coeffs, dist, T, cfg):
    """zo_adam_update_'s arguments (mask_seed 8, lr 1e-3, betas 0.9/0.999, eps 1e-8)."""
    return (
        params, m, v, hist, ids, seeds, coeffs, dist, 8, T, cfg.get("restore_seed", 0),
        cfg.get("restore_scale", 0.0), 1e-3, 0.9, 0.999, 1e-8, cfg.get("weight_decay", 0.0),
        cfg.get("decoupled", False), cfg.get("step", 1), cfg.get("sign", False),
        cfg.get("history_alpha", 0.0), cfg.get("history_init", False),
    )


def assert_sgd_matches(got, want, dist, cfg):
    """``got``/``want``: [params, momentum buffers, history buffers] after zo_sgd_update_ by a
    kernel / by the reference. Rademacher: bit-exact; Gaussian: within 1e-5 (z within the
    2^-18 bound); with sign, params may differ by 2 lr only where g ~ 0 (sign flips)."""
    for li, (a_list, b_list) in enumerate(zip(got, want)):
        for a, b in zip(a_list, b_list):
            a = a.cpu()
            if dist == RADE:
                assert torch.equal(a, b)
            elif cfg.get("sign") and li == 0:
                torch.testing.assert_close(a, b, rtol=0, atol=2.01 * 0.05)
                assert ((a - b).abs() > 1e-5).float().mean().item() < 1e-2
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def assert_adam_matches(got, want, dist, cfg):
    """``got``/``want``: [params, m, v, history] after zo_adam_update_. torch.sqrt on the CPU
    (MKL/SLEEF) is not correctly rounded (+-1 ulp), the kernels' is: params differ by far
    less than their ulp; m, v (no sqrt) are bit-exact for Rademacher."""
    for li, (a_list, b_list) in enumerate(zip(got, want)):
        for a, b in zip(a_list, b_list):
            a = a.cpu()
            if dist == RADE and li > 0:
                assert torch.equal(a, b)
            elif dist == RADE:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 if not cfg.get("sign") else 3e-3)
