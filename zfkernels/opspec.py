"""The argument list of every zfkernels op, declared once.

Every backend takes these arguments, with these names, in this order: the ``TORCH_LIBRARY``
schema of the compiled ops (csrc/ops.cpp; its CPU, Meta, Composite and CUDA kernels follow
it), the Triton functions (zfkernels/triton/) and the reference (zfkernels/reference.py).
tests/test_opspec.py checks all three against this table. The Python face
(zfkernels/__init__.py) names every argument it passes and :func:`call` puts them in the
table's order, so an argument can never land in another's place; the tests build their
argument lists with :func:`bind`.

Adding an option to an op: a row here, the kernels' arithmetic (csrc/ops.cpp,
csrc/zo_functors.cuh, zfkernels/triton/, zfkernels/reference.py), the spec
(docs/kernel-ops.md) and the keyword of the Python face; the tests then tell every place
that does not follow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

REQUIRED = object()   # an argument without a default: every call must give it


@dataclass(frozen=True)
class Arg:
    """One argument: its name, its type as the schema writes it, and the value the Python
    face passes when the caller gives none."""
    name: str
    type: str
    default: Any = REQUIRED


# Parts shared by the ops (docs/kernel-ops.md): the stream of z and the mask; steps 1-2 of
# the updates (restore and estimate); steps 3-4 (history and sign).
_STREAM = (
    Arg("dist", "int", 0),                 # 0 gaussian, 1 rademacher
    Arg("mask_seed", "int", 0),
    Arg("mask_threshold", "int", 0),       # T = round(sparsity * 2^24); 0: no mask
)
_ESTIMATE = (
    Arg("tensor_ids", "int[]"),
    Arg("seeds", "int[]"),
    Arg("coeffs", "float[]"),
    *_STREAM,
    Arg("restore_seed", "int", 0),
    Arg("restore_scale", "float", 0.0),    # 0: no pending perturbation to restore
)
_HISTORY_SIGN = (
    Arg("sign", "bool", False),
    Arg("history_alpha", "float", 0.0),
    Arg("history_init", "bool", False),
)
# The parameter store of the updates (stream §9): round-to-nearest, or stochastic rounding
# of bf16/fp16 parameters from the rounding stream of round_seed.
_STORE = (
    Arg("stochastic_rounding", "bool", False),
    Arg("round_seed", "int", 0),
)

OPS: dict[str, tuple[Arg, ...]] = {
    "philox4x32_10": (
        Arg("counters", "Tensor"),
        Arg("key0", "int"),
        Arg("key1", "int"),
    ),
    "perturb_": (
        Arg("params", "Tensor(a!)[]"),
        Arg("tensor_ids", "int[]"),
        Arg("seed", "int"),
        Arg("scale", "float"),
        *_STREAM,
    ),
    "zo_sgd_update_": (
        Arg("params", "Tensor(a!)[]"),
        Arg("momentum_buffers", "Tensor(b!)[]", ()),     # empty: the feature is off
        Arg("history_buffers", "Tensor(c!)[]", ()),
        *_ESTIMATE,
        Arg("lr", "float"),
        Arg("weight_decay", "float", 0.0),
        Arg("momentum", "float", 0.0),
        Arg("dampening", "float", 0.0),
        Arg("nesterov", "bool", False),
        Arg("momentum_init", "bool", False),
        *_HISTORY_SIGN,
        *_STORE,
    ),
    "zo_adam_update_": (
        Arg("params", "Tensor(a!)[]"),
        Arg("exp_avgs", "Tensor(b!)[]"),
        Arg("exp_avg_sqs", "Tensor(c!)[]"),
        Arg("history_buffers", "Tensor(d!)[]", ()),      # empty: the feature is off
        *_ESTIMATE,
        Arg("lr", "float"),
        Arg("beta1", "float", 0.9),
        Arg("beta2", "float", 0.999),
        Arg("eps", "float", 1e-8),
        Arg("weight_decay", "float", 0.0),
        Arg("decoupled_weight_decay", "bool", False),
        Arg("step", "int"),
        *_HISTORY_SIGN,
        *_STORE,
    ),
}
RETURNS = {"philox4x32_10": "Tensor", "perturb_": "()", "zo_sgd_update_": "()", "zo_adam_update_": "()"}

# The Python value each schema type is converted to before a call (lists stay lists).
_SCALAR = {"int": int, "float": float, "bool": bool}


def names(op: str) -> list[str]:
    """The argument names of ``op``, in schema order."""
    return [a.name for a in OPS[op]]


def schema(op: str) -> str:
    """``op``'s schema as torch prints it (``str(torch.ops.zfkernels.<op>.default._schema)``)."""
    args = ", ".join(f"{a.type} {a.name}" for a in OPS[op])
    return f"zfkernels::{op}({args}) -> {RETURNS[op]}"


def bind(op: str, **given) -> dict[str, Any]:
    """``given`` completed with the defaults, in schema order; ``TypeError`` naming an
    argument ``op`` does not have, or a required one that is missing. No given value is
    checked or converted (the tests pass bad values on purpose); a default list is a new
    list."""
    unknown = sorted(set(given) - set(names(op)))
    if unknown:
        raise TypeError(f"{op}() has no argument {', '.join(unknown)}; its arguments are {', '.join(names(op))}")
    missing = [a.name for a in OPS[op] if a.name not in given and a.default is REQUIRED]
    if missing:
        raise TypeError(f"{op}() needs {', '.join(missing)}")
    return {a.name: given[a.name] if a.name in given else _fresh(a.default) for a in OPS[op]}


def _fresh(default):
    return list(default) if isinstance(default, tuple) else default


def _converter(kind: str):
    if kind.endswith("[]"):
        return list
    return _SCALAR.get(kind)          # None: passed as given (a Tensor)


# Per op, what call() does with each argument, worked out once: the face calls it several
# times per optimizer step (3 us for the 22 arguments of zo_adam_update_).
_CALL_PLAN = {op: tuple((a.name, _converter(a.type), a.default) for a in args) for op, args in OPS.items()}
_NAME_SET = {op: frozenset(a.name for a in args) for op, args in OPS.items()}


def call(fn: Callable, op: str, given: dict) -> Any:
    """``fn`` called with ``given`` bound as :func:`bind` does, each scalar converted to its
    schema type (``float(lr)``, ``bool(nesterov)``, ...) and each list to a list, passed in
    the table's order: the order of every backend's signature (tests/test_opspec.py).
    Positional, because keywords cost a compiled op ~7 us more per call (~15 us in all
    for a small list of tensors)."""
    if not given.keys() <= _NAME_SET[op]:
        bind(op, **given)                             # raises, naming the unknown argument
    args = []
    for name, convert, default in _CALL_PLAN[op]:
        if name in given:
            value = given[name]
        elif default is REQUIRED:
            bind(op, **given)                         # raises, naming the missing argument
        else:
            value = _fresh(default)
        args.append(value if convert is None else convert(value))
    return fn(*args)


# The smallest double that rounds to inf in float32 (halfway between FLT_MAX and 2^128, which
# round-to-nearest-even sends up), and FLT_MAX itself.
F32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103
F32_MAX = 2.0 ** 128 - 2.0 ** 104


def adam_scalars_refusal(lr: float, beta1: float, step: int, weight_decay: float = 0.0,
                         decoupled_weight_decay: bool = False, computed: str = "the kernels compute") -> str | None:
    """Why the float32 scalars an Adam update derives from its options would be infinite, or
    None. Each option may be finite in float32 and the step size ``lr / (1 - beta1**step)``
    (largest at step 1: lr=3e38 with beta1=0.9 is 3e39) or AdamW's decay factor
    ``1 - lr * weight_decay`` not: the update then writes inf / nan into every parameter.
    The same fp64 expressions every backend rounds to float32 (csrc/ops_common.h
    ``adam_scalars``), so a refusal here is exactly an infinite scalar there. Every backend's
    op refuses it in these words (:func:`check_adam_scalars`; the compiled ops:
    csrc/ops_common.h ``check_adam_scalars``)."""
    lr, beta1, wd = float(lr), float(beta1), float(weight_decay)
    if not 0.0 <= beta1 < 1.0:      # check_betas' to refuse, in its words (1 - beta1**step may be 0)
        return None
    bc1 = 1.0 - beta1 ** step
    size = lr / bc1
    if abs(size) >= F32_OVERFLOW:
        return (f"lr={lr:g} makes Adam step {step}'s bias-corrected step size lr / (1 - beta1**{step}) = {size:.6g} "
                f"(beta1={beta1:g}) infinite in float32, where {computed}: the update would write inf / "
                f"nan into every parameter; give lr at most {F32_MAX * bc1:.6g} for this step (float32's largest "
                f"number times 1 - beta1**{step})")
    decay = 1.0 - lr * wd
    if decoupled_weight_decay and abs(decay) >= F32_OVERFLOW:
        return (f"lr={lr:g} and weight_decay={wd:g} make AdamW's decay factor 1 - lr * weight_decay = {decay:.6g} "
                f"infinite in float32, where {computed}: the update would write inf / nan into every "
                f"parameter; give lr * weight_decay at most {F32_MAX:.6g} (float32's largest number)")
    return None


def check_adam_scalars(lr: float, beta1: float, step: int, weight_decay: float = 0.0,
                       decoupled_weight_decay: bool = False, where: str = "") -> None:
    """:func:`adam_scalars_refusal` as a ``ValueError``, raised before anything is written: the
    check of csrc/ops_common.h ``check_adam_scalars`` (the compiled ops, same words), for the
    face and the Python backends (the reference and Triton). ``where`` prefixes the message
    (Triton names its op)."""
    why = adam_scalars_refusal(lr, beta1, step, weight_decay, decoupled_weight_decay)
    if why is not None:
        raise ValueError(where + why)


@dataclass(frozen=True)
class Scalar:
    """A float option an op refuses when it is NaN or infinite in float32 (docs/kernel-ops.md
    "Errors"): ``feature`` names the buffer list that turns its feature on (the option is then
    checked only when that list is non-empty: the call does not use it otherwise), and
    ``inf_ok`` says that +-inf (or a value float32 rounds to it) gives a finite update (Adam's
    eps: ``m / denom`` is then +-0) and only NaN is refused."""
    name: str
    feature: str | None = None
    inf_ok: bool = False


# Per op, in schema order, the float options whose NaN or infinite value would make the kernels
# write inf / nan into the parameters: every one the op takes but zo_adam_update_'s betas
# (check_betas) and the coefficients (the estimate, step 2 of docs/kernel-ops.md: a NaN estimate
# stays visible, and the optimizers skip a step whose coefficients are not finite). The rule of
# csrc/ops_common.h ``check_scalar`` (the compiled ops, same words); tests/test_parity.py runs
# every entry on every backend.
FINITE_SCALARS: dict[str, tuple[Scalar, ...]] = {
    "philox4x32_10": (),
    "perturb_": (Scalar("scale"),),
    "zo_sgd_update_": (Scalar("restore_scale"), Scalar("lr"), Scalar("weight_decay"),
                       Scalar("momentum", "momentum_buffers"), Scalar("dampening", "momentum_buffers"),
                       Scalar("history_alpha", "history_buffers")),
    "zo_adam_update_": (Scalar("restore_scale"), Scalar("lr"), Scalar("eps", inf_ok=True), Scalar("weight_decay"),
                        Scalar("history_alpha", "history_buffers")),
}


def scalar_refusal(name: str, value: float, inf_ok: bool = False) -> str | None:
    """Why the float option ``name`` = ``value`` is refused, or None: NaN, or (unless
    ``inf_ok``) infinite in float32, where the kernels compute (+-inf, or a float64 of
    magnitude at least :data:`F32_OVERFLOW`, which rounds to +-inf there)."""
    v = float(value)
    bound = "" if inf_ok else f" of magnitude at most {F32_MAX:.6g} (float32's largest number)"
    if v != v:
        return (f"{name}=nan is not a number: a call with it writes nan into the parameters; give {name} a "
                f"number{bound}")
    if not inf_ok and abs(v) >= F32_OVERFLOW:
        return (f"{name}={v:g} is infinite in float32, where the kernels compute: a call with it writes inf / nan "
                f"into the parameters; give {name} a number{bound}")
    return None


def check_scalars(op: str, args: dict, where: str = "") -> None:
    """The float options of ``op`` that :data:`FINITE_SCALARS` lists, from ``args`` (by schema
    name, with the buffer lists that turn features on), refused as a ``ValueError`` by
    :func:`scalar_refusal` before anything is written: the check of csrc/ops_common.h
    ``check_scalar`` (the compiled ops, same words and order), for the face and the Python
    backends (the reference and Triton). ``where`` prefixes the message (Triton names its op)."""
    for name, feature, inf_ok in _FINITE_PLAN[op]:
        v = float(args[name])
        if -F32_OVERFLOW < v < F32_OVERFLOW or inf_ok and v == v:     # the common case: ~0.8 us for six options
            continue
        if feature is not None and not len(args[feature]):
            continue
        raise ValueError(where + scalar_refusal(name, v, inf_ok))


_FINITE_PLAN = {op: tuple((s.name, s.feature, s.inf_ok) for s in scalars) for op, scalars in FINITE_SCALARS.items()}


def check_betas(beta1: float, beta2: float, where: str = "") -> None:
    """Adam's decay rates in [0, 1), unrounded (NaN fails too): the rule of
    csrc/ops_common.h ``check_beta``, for the Python backends (the reference and Triton).
    ``where`` prefixes the message (Triton names its op)."""
    for index, (name, beta) in enumerate((("beta1", beta1), ("beta2", beta2))):
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"{where}{name}={beta!r} (betas[{index}]) is outside [0, 1); Adam's decay rates "
                             "need 0 <= beta < 1, e.g. betas=(0.9, 0.999)")


def check_writable(op: str, lists, where: str = "") -> None:
    """What the compiled ops refuse before they write anything, checked by the Python backends
    (the reference and Triton) before their first write, so a refused call leaves every tensor
    as it was (``lists``: ``(schema name, tensors)`` pairs of what op ``op`` writes):

    * with grad mode on, a tensor that requires grad (csrc/ops.cpp ``refuse_grad_writes``,
      same message): Triton wrote such a leaf, and the reference refused it in its first
      ``copy_``, after the tensors before it were written;
    * outside inference mode, an inference tensor: torch's rule for in-place updates, which the
      compiled ops apply through their ADInplaceOrView kernels. ``where`` prefixes this message
      (Triton names its op)."""
    import torch

    if torch.is_grad_enabled():
        for name, tensors in lists:
            for k, t in enumerate(tensors):
                if t.requires_grad:
                    raise RuntimeError(
                        f"zfkernels::{op}: {name}[{k}] requires grad, and this op writes it in place without "
                        "recording a gradient: call it under torch.no_grad() (zfkernels' functions and the zeroflow "
                        "optimizers do), or pass a tensor that does not require grad (.detach())")
    if torch.is_inference_mode_enabled():
        return
    for name, tensors in lists:
        for k, t in enumerate(tensors):
            if t.is_inference():
                raise RuntimeError(
                    f"{where}{name}[{k}]: Inplace update to inference tensor outside InferenceMode is not "
                    "allowed. You can make a clone to get a normal tensor before doing inplace update "
                    "(see https://github.com/pytorch/rfcs/pull/17)")
