"""zfkernels: fused, seed-regenerated zeroth-order kernels.

The Python face of the compiled ops (``torch.ops.zfkernels.*``, CPU and CUDA), the Triton
kernels and the pure-PyTorch reference. Every function takes ``backend``:

* ``"auto"``   – the compiled op for the tensors' device; where it was not built, Triton on
  GPUs, else the reference, with one warning saying how to build it;
* ``"cpu"`` / ``"cuda"`` – the compiled extension (error if it was not built);
* ``"triton"`` – the Triton kernels (GPU, or CPU under ``TRITON_INTERPRET=1``);
* ``"torch"``  – the reference (zfkernels/reference.py), slow but readable.

The stream and op semantics: docs/perturbation-stream.md, docs/kernel-ops.md.
Importing this package never fails but for a bad ``ZEROFLOW_CPU_CAPABILITY`` (docs/kernel-ops.md,
"CPU capabilities"); a missing backend fails on use with the fix.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import sys
import warnings
from typing import Sequence

import torch

from . import _compiled, opspec, reference
from ._compiled import cpu_capabilities, cpu_capability, set_cpu_capability
from .stream import (
    SEED_LIMIT,
    check_adam_step,
    STREAM_VERSION,
    TENSOR_ID_LIMIT,
    check_seed,
    derive_seed,
    dist_code,
    integer_arg,
    mask_threshold,
)

__all__ = [
    "STREAM_VERSION",
    "available_backends",
    "resolve_backend",
    "cpu_capability",
    "cpu_capabilities",
    "set_cpu_capability",
    "call_op",
    "philox4x32_10",
    "perturbation",
    "sparse_mask",
    "perturb_",
    "zo_sgd_update_",
    "zo_adam_update_",
    "derive_seed",
    "mask_threshold",
]

BACKENDS = ("cpu", "cuda", "triton", "torch")
_warned: set[str] = set()


def _triton_module():
    try:
        from . import triton as zt  # optional dependency, imported on use
    except ImportError as exc:
        return None, f"Triton kernels unavailable ({type(exc).__name__}: {exc}); pip install triton"
    except Exception as exc:  # noqa: BLE001 - a Triton that fails to initialise; the message says what to do
        return None, f"Triton kernels unavailable ({type(exc).__name__}: {exc})"
    return zt, ""


# The values of TRITON_INTERPRET that turn Triton's interpreter on (Triton's getenv_bool:
# case-insensitive, not stripped), so that "true" here is "true" there.
_TRITON_TRUE = ("1", "true", "on", "yes", "y")


def _triton_interprets() -> bool:
    """Whether zfkernels.triton's kernels run (or, imported now, would run) in Triton's CPU
    interpreter. Triton decides it when it decorates the kernels, at the import of
    zfkernels.triton: once imported, that decision holds whatever TRITON_INTERPRET says now;
    before, TRITON_INTERPRET is read as Triton reads it (not only "1")."""
    mod = sys.modules.get(f"{__name__}.triton")
    if mod is not None:
        return mod.interpreting()
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRITON_TRUE


def _triton_usable_on(device_type: str) -> bool:
    # Cheap checks first: importing Triton costs ~0.25 s.
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    if device_type == "cuda" and _triton_interprets():
        return False        # the interpreter runs CPU tensors only (zfkernels/triton/_common.py, device_ok)
    if device_type == "cpu" and not _triton_interprets():
        return False
    if device_type not in ("cpu", "cuda"):
        return False
    return _triton_module()[0] is not None


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable on this machine (for ``device``'s type, or for any device)."""
    dev_types = [torch.device(device).type] if device is not None else ["cpu", "cuda"]
    out = []
    if "cpu" in dev_types and _compiled.cpu_available():
        out.append("cpu")
    if "cuda" in dev_types and _compiled.cuda_available():
        out.append("cuda")
    if any(_triton_usable_on(t) for t in dev_types):
        out.append("triton")
    out.append("torch")
    return out


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _check_backend_name(backend: str) -> None:
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend={backend!r} is not one of {('auto',) + BACKENDS}")


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """The concrete backend that ``backend`` means for tensors on ``device`` (a torch.device
    or its name, as :func:`available_backends` takes it)."""
    _check_backend_name(backend)
    if not isinstance(device, torch.device):     # "cpu" raised AttributeError: 'str' has no attribute 'type'
        device = torch.device(device)
    dt = device.type
    if backend == "auto":
        native = "cuda" if dt == "cuda" else "cpu" if dt == "cpu" else None
        if native == "cpu" and _compiled.cpu_available():
            return "cpu"
        if native == "cuda" and _compiled.cuda_available():
            return "cuda"
        fallback = "triton" if dt == "cuda" and _triton_usable_on("cuda") else "torch"
        if native is not None:
            _warn_once(
                f"auto-{native}",
                f"zfkernels: the compiled {native} backend is missing "
                f"({_compiled.missing_reason(native)}); using backend={fallback!r} instead.",
            )
        return fallback
    if backend in ("cpu", "cuda"):
        if dt != backend:
            raise ValueError(f"backend={backend!r} cannot run tensors on device {device}; use backend='auto'")
        ok = _compiled.cpu_available() if backend == "cpu" else _compiled.cuda_available()
        if not ok:
            raise RuntimeError(f"zfkernels backend {backend!r} is not available: {_compiled.missing_reason(backend)}")
    if backend == "triton":
        zt, why = _triton_module()
        if zt is None:
            raise RuntimeError(why)
        if dt == "cuda" and _triton_interprets():
            raise RuntimeError(
                "backend='triton' cannot run CUDA tensors under TRITON_INTERPRET=1: Triton's interpreter runs "
                "these kernels on CPU tensors only; unset TRITON_INTERPRET before zfkernels.triton is imported "
                "(or move the tensors to the CPU)"
            )
        if not _triton_usable_on(dt):
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors, set before "
                f"zfkernels.triton is imported); got device {device}"
            )
    return backend


def call_op(backend: str, op: str, **args):
    """``op`` of the concrete ``backend`` (a name :func:`resolve_backend` returns) called with
    ``args`` (by name) bound by the table of zfkernels/opspec.py: defaults filled in, scalars
    converted to their schema types. None of the checks of the functions above: ``args``
    must already be what they pass (``tensor_ids`` a list of ints, ``dist`` and
    ``mask_threshold`` the integer codes, seeds in [0, 2^63)). For callers that validated
    their tensor lists once and call many times: the optimizers cache the validated lists
    per parameter layout (python/zeroflow/optim/zo.py) because the face's per-call list
    checks cost ~70 us per op on a 152-tensor list, more than the kernels of a small model.
    Every backend still checks the tensors (type, dtype, contiguity, device, shapes) before
    it writes anything."""
    if backend in ("cpu", "cuda"):
        return opspec.call(getattr(torch.ops.zfkernels, op), op, args)
    if backend == "triton":
        fn = getattr(_triton_module()[0], op)
    elif backend == "torch":
        fn = getattr(reference, op)
    else:       # "auto" or a misspelt name ran the slow reference without a word
        raise ValueError(f"call_op: backend={backend!r} is not one of {BACKENDS}; pass the name that "
                         f"zfkernels.resolve_backend(backend, device) returns (it resolves 'auto')")
    if not _on_cpu(args):   # a GPU's arithmetic ignores the CPU's flush mode: no probe per launch
        return opspec.call(fn, op, args)
    with _ieee_subnormals():
        return opspec.call(fn, op, args)


def _on_cpu(args: dict) -> bool:
    """Whether the call's tensors (its first tensor or tensor list decides) are CPU tensors."""
    for value in args.values():
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, torch.Tensor):
            return value.device.type == "cpu"
    return True


# A float32 subnormal (2^-140): multiplied by 1 it stays itself in IEEE mode and becomes 0
# under flush-to-zero / denormals-are-zero. Made from its bits: converting the float 2^-140
# at an import under flush mode would give 0, and every call would then switch flushing on.
_SUBNORMAL = torch.tensor([1 << 9], dtype=torch.int32).view(torch.float32)


@contextlib.contextmanager
def _ieee_subnormals():
    """IEEE subnormals for a Python backend's host arithmetic (the reference's torch ops on
    CPU tensors, Triton's interpreter in numpy) whatever the thread's mode, as the compiled
    CPU op keeps them (csrc/ops.cpp IeeeSubnormals): under torch.set_flush_denormal(True)
    they flushed subnormal inputs and results to zero (subnormal weights, Adam's m and v
    decaying through the subnormals) and wrote other bits than the cpu and cuda backends.
    The mode is torch's (set_flush_denormal), cleared for the call and set again after."""
    flushing = torch.mul(_SUBNORMAL, 1.0).item() == 0.0
    if flushing:
        torch.set_flush_denormal(False)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(True)


def _backend_for(backend: str, params: Sequence[torch.Tensor]) -> str:
    """:func:`resolve_backend` for the device of ``params``. An empty list has no device: its
    call goes to the reference, which checks every argument as each backend does (a bad one
    raises as it would with tensors) and writes nothing, and ``backend`` only has to be a name
    of a backend."""
    if len(params):
        return resolve_backend(backend, params[0].device)
    _check_backend_name(backend)
    return "torch"


def _real(v, name: str) -> float:
    """A float argument of an op (``lr``, ``scale``, ``coeffs[j]``, ...) or an option of
    zeroflow's optimizers: a Python or numpy real or a one-element real tensor, as a float.
    The ops' conversion (float()) took the string "0.1" as 0.1 and said "float() argument
    must be ... not 'NoneType'" for None, naming no argument."""
    if isinstance(v, torch.Tensor):
        if v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool:
            return float(v)
    elif isinstance(v, numbers.Real) and not isinstance(v, bool):
        return float(v)
    raise TypeError(f"{name}={v!r} is not a real number (a Python or numpy real, or a one-element real tensor)")


def _flag(v, name: str) -> bool:
    """A bool argument of an op (``nesterov``, ``sign``, ...): True or False (numpy's too).
    The ops' conversion (bool()) turned the string "False" into True."""
    if isinstance(v, bool) or type(v).__module__ == "numpy" and type(v).__name__ in ("bool_", "bool"):
        return bool(v)
    raise TypeError(f"{name}={v!r} must be True or False, got {type(v).__name__}")


def _options(op: str, **given) -> dict:
    """``given`` (the op's float and bool arguments, by schema name) checked by
    :func:`_real` / :func:`_flag`, naming each as the face spells it."""
    kinds = {a.name: a.type for a in opspec.OPS[op]}
    return {k: (_real(v, k) if kinds[k] == "float" else _flag(v, k)) for k, v in given.items()}


def _ids(tensors: Sequence[torch.Tensor], tensor_ids: Sequence[int] | None) -> list[int]:
    if tensor_ids is None:
        return list(range(len(tensors)))
    ids = [integer_arg(t, f"tensor_ids[{k}]") for k, t in enumerate(tensor_ids)]
    if len(ids) != len(tensors):
        raise ValueError(f"tensor_ids has {len(ids)} entries for {len(tensors)} tensors; give one id per tensor")
    # Checked here too (every backend checks it): an id beyond int64 reached the compiled op as
    # "Expected a value of type 'List[int]' ... found type 'list'", a RuntimeError naming no id.
    if ids and not (min(ids) >= 0 and max(ids) < TENSOR_ID_LIMIT):
        k = next(k for k, t in enumerate(ids) if not 0 <= t < TENSOR_ID_LIMIT)
        raise ValueError(f"tensor_ids[{k}]={ids[k]} is outside [0, 2**32); use a 32-bit unsigned id")
    return ids


def _as_list(tensors, name: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors; wrap a single tensor as [t]")
    out = list(tensors)
    # One isinstance per distinct type instead of per tensor (a list holds one or two types:
    # Tensor, Parameter); the per-tensor loop cost ~20 us on a 152-tensor list.
    if not all(issubclass(cls, torch.Tensor) for cls in set(map(type, out))):
        for k, t in enumerate(out):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{k}] is a {type(t).__name__}, not a torch.Tensor")
    return out


def philox4x32_10(counters: torch.Tensor, key: tuple[int, int], backend: str = "auto") -> torch.Tensor:
    """Philox4x32-10 (Random123-compatible) on ``counters`` (``[N, 4]``, values < 2^32,
    int64 storage) with ``key = (k0, k1)``; returns the ``[N, 4]`` output words as int64."""
    split = "a 64-bit seed is key=(seed & 0xFFFFFFFF, seed >> 32)"
    if not (isinstance(key, (tuple, list)) and len(key) == 2):     # "'int' object is not iterable"
        raise TypeError(f"key={key!r} must be a pair (k0, k1) of 32-bit unsigned integers; {split}")
    k0, k1 = (integer_arg(k, f"key[{j}]") for j, k in enumerate(key))
    for name, k in (("key[0]", k0), ("key[1]", k1)):
        if not 0 <= k < 2**32:
            raise ValueError(f"{name}={k} must be a 32-bit unsigned integer in [0, 2**32); give one 32-bit word of "
                             f"the key in each entry ({split})")
    if not isinstance(counters, torch.Tensor):      # a list raised "'list' object has no attribute 'dtype'"
        raise TypeError(f"counters must be an integer tensor of shape [N, 4], got {type(counters).__name__}; give "
                        "torch.tensor(rows, dtype=torch.int64), one row of four 32-bit counter words per output row")
    if counters.dtype.is_floating_point or counters.dtype.is_complex or counters.dtype == torch.bool:
        raise TypeError(f"counters must be an integer tensor (int64 storage), got {counters.dtype}: a float "
                        "counter would be truncated to another one; build the counters as integers "
                        "(dtype=torch.int64), each value in [0, 2**32)")
    if counters.layout != torch.strided:    # .contiguous() of a sparse one: "unsupported memory format"
        raise ValueError(f"counters must be a dense tensor; {reference.COUNTERS_DENSE_FIX}")
    b = resolve_backend(backend, counters.device)
    return call_op(b, "philox4x32_10", counters=counters.to(torch.int64).contiguous(), key0=k0, key1=k1)


def perturbation(
    seed: int,
    numel: int,
    dist: str = "gaussian",
    tensor_id: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    *,
    mask_seed: int = 0,
    sparsity: float = 0.0,
) -> torch.Tensor:
    """The z (times the mask, if ``sparsity`` > 0) that the kernels use for tensor
    ``tensor_id``, materialized as a flat tensor: for tests and inspection."""
    numel = integer_arg(numel, "numel")        # int() made numel=2.7 two elements
    if numel < 0:
        raise ValueError(f"numel={numel} must be >= 0")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):    # the kernel named "params[0]"
        raise ValueError(f"dtype={dtype} must be torch.float32, torch.bfloat16 or torch.float16 (the dtypes the "
                         "kernels perturb)")
    out = torch.zeros(numel, dtype=dtype, device=device)
    perturb_([out], seed, 1.0, dist, tensor_ids=[tensor_id], mask_seed=mask_seed, sparsity=sparsity, backend=backend)
    return out


def sparse_mask(mask_seed: int, numel: int, sparsity: float, tensor_id: int = 0, device="cpu") -> torch.Tensor:
    """The keep-mask (bool, False = zeroed) of §6 for one tensor, from the reference."""
    # checked as the ops check them: int() gave tensor_id=1.9 (or True) tensor 1's mask
    numel, tensor_id = integer_arg(numel, "numel"), integer_arg(tensor_id, "tensor_id")
    if numel < 0:       # torch.arange's "upper bound and lower bound inconsistent with step sign"
        raise ValueError(f"numel={numel} must be >= 0")
    return reference.keep_mask(mask_seed, numel, tensor_id, mask_threshold(sparsity), torch.device(device))


@torch.no_grad()   # in-place updates of parameters are never recorded by autograd (as torch.optim)
def perturb_(
    tensors: Sequence[torch.Tensor],
    seed: int,
    scale: float,
    dist: str = "gaussian",
    *,
    tensor_ids: Sequence[int] | None = None,
    mask_seed: int = 0,
    sparsity: float = 0.0,
    backend: str = "auto",
) -> None:
    """In place, one pass: ``tensors[k] += scale * m_k * z_k(seed)``, with ``tensor_id=k``
    (or ``tensor_ids[k]``). ``sparsity`` is the fraction of coordinates zeroed by the mask
    drawn from ``mask_seed``."""
    tensors = _as_list(tensors, "tensors")
    ids = _ids(tensors, tensor_ids)
    scale = _real(scale, "scale")
    opspec.check_scalars("perturb_", {"scale": scale})      # as every backend does, before it is chosen
    b = _backend_for(backend, tensors)
    call_op(b, "perturb_", params=tensors, tensor_ids=ids, seed=_seed(seed), scale=scale, dist=dist_code(dist),
          mask_seed=_seed(mask_seed, "mask_seed"), mask_threshold=mask_threshold(sparsity))


def _seed(s, name="seed") -> int:
    if type(s) is int and 0 <= s < SEED_LIMIT:      # the common case, without check_seed's call
        return s
    return check_seed(s, name)


def _check_features(params: list, buffers_name: str, buffers, **settings) -> None:
    """The buffer list turns momentum / history on (docs/kernel-ops.md, zo_sgd_update_ steps
    3 and 6): a momentum or history weight given without its buffers was dropped without a word
    (momentum=0.9 with no momentum_buffers ran plain SGD). Refused, naming both (an empty
    params list holds its one buffer per param already). The first-step flags
    (momentum_init, history_init) mean nothing without buffers and pass."""
    if len(buffers) or not params:
        return
    given = [f"{k}={v!r}" for k, v in settings.items() if v]
    if given:
        raise ValueError(f"{', '.join(given)} without {buffers_name}: the buffers turn the feature on; give one "
                         f"buffer per param ({buffers_name}=[torch.zeros_like(p) for p in params]) or leave "
                         f"{' and '.join(k for k in settings)} at their defaults")


def _qs(seeds, coeffs) -> tuple[list[int], list[float]]:
    seeds = [_seed(s, f"seeds[{j}]") for j, s in enumerate(seeds)]
    coeffs = [_real(c, f"coeffs[{j}]") for j, c in enumerate(coeffs)]
    if len(seeds) != len(coeffs):
        raise ValueError(f"{len(seeds)} seeds but {len(coeffs)} coeffs: give one projected gradient per seed")
    return seeds, coeffs


@torch.no_grad()   # in-place updates of parameters are never recorded by autograd (as torch.optim)
def zo_sgd_update_(
    params: Sequence[torch.Tensor],
    seeds: Sequence[int],
    coeffs: Sequence[float],
    *,
    lr: float,
    dist: str = "gaussian",
    tensor_ids: Sequence[int] | None = None,
    momentum_buffers: Sequence[torch.Tensor] = (),
    history_buffers: Sequence[torch.Tensor] = (),
    restore_seed: int = 0,
    restore_scale: float = 0.0,
    mask_seed: int = 0,
    sparsity: float = 0.0,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    momentum_init: bool = False,
    sign: bool = False,
    history_alpha: float = 0.0,
    history_init: bool = False,
    stochastic_rounding: bool = False,
    round_seed: int = 0,
    backend: str = "auto",
) -> None:
    """Fused ZO SGD-family step, one pass (docs/kernel-ops.md § zo_sgd_update_):
    restore the pending perturbation ``restore_scale * m * z(restore_seed)``, estimate
    ``g = sum_j coeffs[j] * m * z(seeds[j])`` (pass ``coeffs[j] = g_j / q``), optional
    history mix / sign / weight decay / momentum, then ``theta -= lr * g``.
    ``stochastic_rounding``: bf16/fp16 parameters are stored with the unbiased stochastic
    rounding of stream §9, its random bits drawn from ``round_seed`` (fp32: no effect)."""
    params = _as_list(params, "params")
    ids = _ids(params, tensor_ids)
    seeds, coeffs = _qs(seeds, coeffs)
    o = _options("zo_sgd_update_", restore_scale=restore_scale, lr=lr, weight_decay=weight_decay, momentum=momentum,
                 dampening=dampening, nesterov=nesterov, momentum_init=momentum_init, sign=sign,
                 history_alpha=history_alpha, history_init=history_init, stochastic_rounding=stochastic_rounding)
    restore_scale, lr, weight_decay, momentum, dampening, nesterov, momentum_init, sign, history_alpha, history_init, \
        stochastic_rounding = o.values()
    # lists first: _check_features takes their len() (a generator of buffers, which params may be, had none)
    momentum_buffers = _as_list(momentum_buffers, "momentum_buffers")
    history_buffers = _as_list(history_buffers, "history_buffers")
    _check_features(params, "momentum_buffers", momentum_buffers, momentum=momentum, nesterov=nesterov)
    _check_features(params, "history_buffers", history_buffers, history_alpha=history_alpha)
    opspec.check_scalars("zo_sgd_update_", dict(o, momentum_buffers=momentum_buffers, history_buffers=history_buffers))
    b = _backend_for(backend, params)
    call_op(b, "zo_sgd_update_", params=params, momentum_buffers=momentum_buffers,
          history_buffers=history_buffers, tensor_ids=ids, seeds=seeds, coeffs=coeffs,
          dist=dist_code(dist), mask_seed=_seed(mask_seed, "mask_seed"), mask_threshold=mask_threshold(sparsity),
          restore_seed=_seed(restore_seed, "restore_seed"), restore_scale=restore_scale, lr=lr,
          weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov,
          momentum_init=momentum_init, sign=sign, history_alpha=history_alpha, history_init=history_init,
          stochastic_rounding=stochastic_rounding, round_seed=_seed(round_seed, "round_seed"))


@torch.no_grad()   # in-place updates of parameters are never recorded by autograd (as torch.optim)
def zo_adam_update_(
    params: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    seeds: Sequence[int],
    coeffs: Sequence[float],
    *,
    lr: float,
    step: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    dist: str = "gaussian",
    tensor_ids: Sequence[int] | None = None,
    history_buffers: Sequence[torch.Tensor] = (),
    restore_seed: int = 0,
    restore_scale: float = 0.0,
    mask_seed: int = 0,
    sparsity: float = 0.0,
    sign: bool = False,
    history_alpha: float = 0.0,
    history_init: bool = False,
    stochastic_rounding: bool = False,
    round_seed: int = 0,
    backend: str = "auto",
) -> None:
    """Fused ZO Adam/AdamW step, one pass over params, m, v (and h): the estimate as in
    :func:`zo_sgd_update_`, then exactly ``torch.optim.Adam``/``AdamW`` fed it as grad;
    ``stochastic_rounding`` / ``round_seed`` as in :func:`zo_sgd_update_`."""
    params = _as_list(params, "params")
    ids = _ids(params, tensor_ids)
    seeds, coeffs = _qs(seeds, coeffs)
    step = check_adam_step(integer_arg(step, "step"))
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:     # betas=0.9: "object of type 'float' has no len()"
        raise ValueError(f"betas={tuple(betas) if isinstance(betas, list) else betas!r} must be two numbers "
                         "(beta1, beta2)")
    betas = (_real(betas[0], "betas[0]"), _real(betas[1], "betas[1]"))
    o = _options("zo_adam_update_", restore_scale=restore_scale, lr=lr, eps=eps, weight_decay=weight_decay,
                 decoupled_weight_decay=decoupled_weight_decay, sign=sign, history_alpha=history_alpha,
                 history_init=history_init, stochastic_rounding=stochastic_rounding)
    restore_scale, lr, eps, weight_decay, decoupled_weight_decay, sign, history_alpha, history_init, \
        stochastic_rounding = o.values()
    # each option finite in float32, their step size or decay factor may not be (lr=3e38 at step 1)
    opspec.check_adam_scalars(lr, betas[0], step, weight_decay, decoupled_weight_decay)
    history_buffers = _as_list(history_buffers, "history_buffers")     # before its len(), as in zo_sgd_update_
    _check_features(params, "history_buffers", history_buffers, history_alpha=history_alpha)
    opspec.check_scalars("zo_adam_update_", dict(o, history_buffers=history_buffers))
    b = _backend_for(backend, params)
    call_op(b, "zo_adam_update_", params=params, exp_avgs=_as_list(exp_avgs, "exp_avgs"),
          exp_avg_sqs=_as_list(exp_avg_sqs, "exp_avg_sqs"),
          history_buffers=history_buffers, tensor_ids=ids, seeds=seeds, coeffs=coeffs,
          dist=dist_code(dist), mask_seed=_seed(mask_seed, "mask_seed"), mask_threshold=mask_threshold(sparsity),
          restore_seed=_seed(restore_seed, "restore_seed"), restore_scale=restore_scale, lr=lr, beta1=betas[0],
          beta2=betas[1], eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
          step=step, sign=sign, history_alpha=history_alpha, history_init=history_init,
          stochastic_rounding=stochastic_rounding, round_seed=_seed(round_seed, "round_seed"))
