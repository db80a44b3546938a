"""Forward precision of continual runs (``--precision``) and where the fidelity study drew the line.

* ``fp32``: plain fp32 forwards.
* ``tf32``: fp32 tensors; CUDA matmuls and cuDNN convolutions may use TF32 tensor cores
  (``fp32_precision`` "tf32" on ``torch.backends.cuda.matmul`` and ``torch.backends.cudnn.conv`` /
  ``.rnn``; before torch 2.9 ``allow_tf32``; set around each forward and restored after it).
  The flags do not act on the CPU: there tf32 is fp32.
* ``bf16`` / ``fp16``: ``torch.autocast`` around the backbone's forward pass.

Parameters stay fp32 in every mode, the backbone's features are cast back to fp32 before the
head, and the loss and the zeroth-order finite difference ``(L+ - L-) / (2 eps)`` are computed
in fp32 (the loss) and Python floats (the difference). Only the forward's arithmetic changes.

A backward pass through fp16 forwards computes fp16 gradients, and those below fp16's smallest
subnormal (6e-8) flush to zero: first-order steps under fp16 (the ``fo_*`` baselines, the FO
phase of ``--hybrid-switch``) scale the loss with a ``torch.amp.GradScaler``
(:func:`grad_scaler`), as torch's AMP recipe does. bf16 has fp32's exponent range: no scaler.

A ZO step divides a loss difference of order ``zo_eps`` by ``zo_eps``: the rounding noise of a
reduced-precision forward does not shrink with ``zo_eps``, so below some ``zo_eps`` it swamps the
difference. ``MIN_SAFE_ZO_EPS`` is that line as measured by ``benchmarks/precision_fidelity.py``
(docs/algorithms.md, section 10); :func:`zo_eps_warning` names a combination below it. The
default precision is fp32 on every device: on the CPU it is the fastest and exact; on CUDA
the measurement that would justify TF32 or bf16 is pending (same section).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Below these zo_eps the projected gradient of forwards in this precision correlates < 0.99 with
# the fp64 one: the study's 1/eps fit of the relative error, rounded up to one digit (fits: fp32
# 5.6e-7, bf16 6.0e-4, fp16 7.6e-5, TF32 emulated on the CPU 7.6e-5). Measured on ViT-Tiny/16
# EASE adapters on a CPU (docs/algorithms.md section 10); the GPU (ViT-B/16) measurement is
# pending, and tf32's floor comes from the CPU emulation of TF32 until it is made.
SAFE_CORRELATION = 0.99
MIN_SAFE_ZO_EPS: Dict[str, float] = {"fp32": 6e-7, "tf32": 8e-5, "bf16": 7e-4, "fp16": 8e-5}
STUDY = "benchmarks/precision_fidelity.py, docs/algorithms.md section 10"

# Optimizers whose steps are finite differences of forward losses (forward_grad uses jvps and
# the fo_* baselines backward passes: neither divides a loss difference by eps).
_FINITE_DIFFERENCE = ("zo_sgd", "zo_sgd_sign", "zo_sgd_conserve", "zo_adam", "zo_adam_sign", "zo_adam_conserve")


def _tf32_settings() -> list:
    """The TF32 switches of this torch, as ``(object, attribute, value when on, value when off)``.
    torch >= 2.9 has ``fp32_precision`` ("tf32" / "ieee") on the cuBLAS matmuls and on cuDNN's
    convolutions and RNNs; once a process has set one of those, reading the legacy
    ``matmul.allow_tf32`` raises ("you have used mix of the legacy and new APIs"), so a user
    who followed torch's advice to use the new API could not run a tf32 or CUDA fp32 forward.
    Older torch has the ``allow_tf32`` booleans only."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(cudnn, "conv") and hasattr(cudnn, "rnn"):
        return [(obj, "fp32_precision", "tf32", "ieee") for obj in (matmul, cudnn.conv, cudnn.rnn)]
    return [(matmul, "allow_tf32", True, False), (cudnn, "allow_tf32", True, False)]


@contextlib.contextmanager
def _tf32_flags(enabled: bool):
    settings = _tf32_settings()
    old = [getattr(obj, name) for obj, name, _, _ in settings]
    try:
        for obj, name, on, off in settings:
            setattr(obj, name, on if enabled else off)
        yield
    finally:
        for (obj, name, _, _), value in zip(settings, old):
            setattr(obj, name, value)


def forward_precision(precision: str, device_type: str):
    """Context manager under which a forward pass runs in ``precision`` on ``device_type``."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision])
    if precision == "tf32":
        return _tf32_flags(True)
    if precision == "fp32":
        # explicit: a process that enabled TF32 globally still gets fp32 forwards here
        return _tf32_flags(False) if device_type == "cuda" else contextlib.nullcontext()
    raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")


def grad_scaler(cfg: Dict, device: torch.device) -> Optional["torch.amp.GradScaler"]:
    """The loss scaler of a run's first-order steps: a ``torch.amp.GradScaler`` for fp16 runs
    that call backward (the ``fo_*`` baselines, a hybrid's FO phase), one for the whole run (its
    scale carries over from task to task, and the run checkpoint saves it); None otherwise (no
    scaling: bf16, fp32, tf32 and backward-free optimizers train exactly as before)."""
    if cfg.get("precision", "fp32") != "fp16":
        return None
    if not (str(cfg["optimizer"]).startswith("fo_") or cfg.get("hybrid_switch")):
        return None
    return torch.amp.GradScaler(device.type)


def autocast_problem(precision: str, device: torch.device) -> Optional[str]:
    """Why ``precision`` cannot run on ``device`` with this torch (None: it can). A tiny linear
    layer is run under autocast, the way the backbone will be."""
    if precision not in AUTOCAST_DTYPES:
        return None
    try:
        lin = torch.nn.Linear(4, 4).to(device)
        with torch.no_grad(), forward_precision(precision, device.type):
            out = lin(torch.ones(2, 4, device=device))
    except (RuntimeError, TypeError, ValueError) as e:     # from autocast or the kernel
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if out.dtype != AUTOCAST_DTYPES[precision]:
        return f"autocast on {device.type} left a linear layer in {out.dtype}"
    return None


def zo_eps_warning(cfg: Dict, device_type: str) -> Optional[str]:
    """A warning when ``cfg`` runs finite-difference ZO steps at a ``zo_eps`` below the smallest
    one the fidelity study found safe for its precision on ``device_type``; None otherwise."""
    precision, eps = cfg.get("precision", "fp32"), float(cfg["zo_eps"])
    # the TF32 flags act on CUDA only: elsewhere these forwards are fp32
    acting = "fp32" if precision == "tf32" and device_type != "cuda" else precision
    floor = MIN_SAFE_ZO_EPS[acting]
    if cfg["optimizer"] not in _FINITE_DIFFERENCE or eps >= floor:
        return None
    return (f"--precision {precision} with --zo-eps {eps:g}: by the fidelity study ({STUDY}) the projected "
            f"gradient of {acting} forwards correlates below {SAFE_CORRELATION} with the fp64 one at zo_eps < "
            f"{floor:g} (the rounding noise of the loss does not shrink with eps); use --zo-eps {floor:g} or more"
            + (", or --precision fp32" if acting != "fp32" else ""))


def check_run_precision(cfg: Dict, device: torch.device, warn) -> None:
    """Before a run starts: refuse a precision that cannot run on ``device`` here, and warn
    (``warn(message)``) about a ``zo_eps`` the study found unsafe for it."""
    from .errors import ZeroflowError

    precision = cfg.get("precision", "fp32")
    problem = autocast_problem(precision, device)
    if problem:
        # the other reduced precision, if it runs here, else fp32 alone (bf16 was suggested to a bf16 run)
        other = next(p for p in AUTOCAST_DTYPES if p != precision)
        instead = "fp32" + (f" or {other}" if autocast_problem(other, device) is None else "")
        raise ZeroflowError(f"--precision {precision} cannot run on {device} with torch {torch.__version__} "
                            f"({problem}); use --precision {instead}")
    message = zo_eps_warning(cfg, device.type)
    if message:
        warn(message)
