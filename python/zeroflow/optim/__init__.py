"""zeroflow.optim: forward-pass optimizers and the method factory.

``create(name, params, **kw)`` builds any of the nine ZeroFlow methods::

    zo_sgd, zo_sgd_sign, zo_sgd_conserve, zo_adam, zo_adam_sign, zo_adam_conserve,
    forward_grad, fo_sgd, fo_adam

``train_step(opt, closure)`` runs one step for any of them (ZO: closure only;
FO: zero_grad, closure, backward, step). Every optimizer the factory returns has
``zeroth_order`` (bool) and ``forward_passes`` (total forwards so far).
Formulas and costs: docs/algorithms.md.
"""
from __future__ import annotations

import math

import torch

from zfkernels.stream import _is_bool

from .fo import FOAdam, FOAdamW, FOSGD
from .hybrid import HybridFOZO
from .zo import ZOFusedAdam, ZOFusedSGD, counter, refuse_a_module, returned_hint

__all__ = ["ZOFusedSGD", "ZOFusedAdam", "HybridFOZO", "FOSGD", "FOAdam", "FOAdamW", "create",
           "train_step", "METHODS"]

METHODS = ("zo_sgd", "zo_sgd_sign", "zo_sgd_conserve", "zo_adam", "zo_adam_sign", "zo_adam_conserve",
           "forward_grad", "fo_sgd", "fo_adam")

# Options only the zeroth-order optimizers understand; fo_* drop them so that one kwargs
# dict can configure every method of a sweep.
ZO_ONLY = ("zo_eps", "q", "perturbation", "estimator", "sign", "scalar_sign", "conserve", "sparsity",
           "sparse_resample", "history", "stochastic_rounding", "state_dtype", "backend", "seed", "fo_lr", "base")

_ZO = {
    "zo_sgd": (ZOFusedSGD, {}),
    "zo_sgd_sign": (ZOFusedSGD, {"sign": True}),
    "zo_sgd_conserve": (ZOFusedSGD, {"conserve": True}),
    "zo_adam": (ZOFusedAdam, {}),
    "zo_adam_sign": (ZOFusedAdam, {"sign": True}),
    "zo_adam_conserve": (ZOFusedAdam, {"conserve": True}),
}


def _fo(name: str, params, kw: dict):
    kw = {k: v for k, v in kw.items() if k not in ZO_ONLY}
    if name == "fo_sgd":
        return FOSGD(params, **kw)
    if kw.pop("decoupled_weight_decay", False):
        return FOAdamW(params, **kw)
    return FOAdam(params, **kw)


def _zo(name: str, params, kw: dict, model):
    kw = dict(kw)
    kw.pop("fo_lr", None)
    if name == "forward_grad":
        base = kw.pop("base", "sgd")
        if base not in ("sgd", "adam"):
            raise ValueError(f"forward_grad base={base!r} must be 'sgd' or 'adam'")
        cls = ZOFusedSGD if base == "sgd" else ZOFusedAdam
        return cls(params, estimator="forward_grad", model=model, **kw)
    kw.pop("base", None)
    cls, preset = _ZO[name]
    if name.endswith("_sign") and kw.get("scalar_sign"):
        preset = {}                      # scalar_sign=True asks for the public-code sign variant
    for k, v in preset.items():
        # the keyword overrode the preset: zo_sgd_sign with sign=False was plain ZO-SGD, silently
        if k in kw and kw[k] != v:
            raise ValueError(f"{name} is the method with {k}={v!r}; {k}={kw[k]!r} makes it "
                             f"{name.rsplit('_', 1)[0]} (name that method instead, or drop {k})")
    return cls(params, **{**preset, **kw})


def create(name: str, params, *, model: torch.nn.Module | None = None, hybrid_switch: int | None = None, **kw):
    """Build ZeroFlow method ``name`` over ``params``.

    ``model``: the nn.Module the closure runs (needed by ``forward_grad`` only; ignored by
    the others). ``hybrid_switch``: if a positive int and ``name`` is a forward-pass method,
    return a :class:`HybridFOZO` that runs the FO counterpart (fo_sgd for *_sgd* and
    forward_grad with base sgd, fo_adam for *_adam*) for that many steps and then the ZO
    method; ``fo_lr`` sets the FO phase lr (default: ``lr``). Other keywords go to the
    optimizer; fo_* silently drop the ZO-only ones (see ``ZO_ONLY``).
    """
    if name not in METHODS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(METHODS)}")
    refuse_a_module(params)     # create("zo_sgd", model): before the hybrid's list() hides it
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model= must be an nn.Module, got {type(model).__name__}")
    if name.startswith("fo_"):
        return _fo(name, params, kw)
    if _is_bool(hybrid_switch) and math.prod(getattr(hybrid_switch, "shape", ())) == 1 and not hybrid_switch:
        # False means off, numpy's and torch's too (a sweep's flag column): numpy.bool_(False),
        # not Python's False, was refused as no int. One element only, counted by shape (numpy's
        # arrays have no numel: numpy.array([False, False]) raised numpy's "truth value ... is
        # ambiguous" where a torch tensor of two Falses is named as no count)
        hybrid_switch = None
    if hybrid_switch is not None:
        # True was 1 FO step (a flag meaning "hybrid on" ran one FO step without a word), and
        # numpy's int64 (a sweep's value) was refused as no int
        hybrid_switch = counter(hybrid_switch, "hybrid_switch (the number of FO steps before ZO; 0/None = off)")
    if not hybrid_switch:
        return _zo(name, params, kw, model)
    params = _materialize(params)
    zo = _zo(name, params, kw, model)
    # the FO twin gets the ZO optimizer's (filtered) groups, lr = fo_lr or the group's lr
    fo_lr = kw.get("fo_lr")
    fo_groups = []
    for g in zo.param_groups:
        fg = {"params": g["params"], "lr": fo_lr if fo_lr is not None else g["lr"],
              "weight_decay": g["weight_decay"]}
        if "param_names" in g:      # named_parameters(): the FO twin's groups are named too (add_param_group)
            fg["param_names"] = list(g["param_names"])
        if "momentum" in g:
            fg.update(momentum=g["momentum"], dampening=g["dampening"], nesterov=g["nesterov"])
        if "betas" in g:
            fg.update(betas=g["betas"], eps=g["eps"])
        fo_groups.append(fg)
    # the FO twin's defaults are the ZO optimizer's options too: a group added later
    # (HybridFOZO.add_param_group, a head per task) got torch's defaults in the FO phase (SGD:
    # no momentum, no weight decay; AdamW: weight decay 0.01) and the configured ones in the ZO phase
    d = zo.defaults
    lr = fo_lr if fo_lr is not None else d["lr"]
    if "betas" in d:
        fo = (FOAdamW if zo.param_groups[0]["decoupled_weight_decay"] else FOAdam)(
            fo_groups, lr=lr, betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"])
    else:
        fo = FOSGD(fo_groups, lr=lr, momentum=d["momentum"], dampening=d["dampening"],
                   weight_decay=d["weight_decay"], nesterov=d["nesterov"])
    return HybridFOZO(fo, zo, hybrid_switch)


def _materialize(params):
    """Turn a generator of params (model.parameters()) into a list so it can be reused."""
    if isinstance(params, torch.Tensor):
        return [params]
    out = list(params)
    for g in out:       # {"params": model}: before list() says "'Linear' object is not iterable"
        if isinstance(g, dict):
            refuse_a_module(g.get("params"), "param_group['params']")
    return [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in out]


def train_step(optimizer, closure, scaler=None) -> float:
    """One training step with any factory optimizer; returns the loss as a float.

    ``closure()`` runs the forward pass and returns the scalar loss tensor (no backward).
    Zeroth-order (``optimizer.zeroth_order``): ``optimizer.step(closure)``.
    First-order: ``zero_grad(); loss = closure(); loss.backward(); step()``.

    ``scaler`` (a ``torch.amp.GradScaler``, for fp16 autocast forwards): a first-order step
    back-propagates the scaled loss, so that small gradients do not underflow in fp16, and
    steps through ``scaler.step`` (gradients unscaled first; a step whose gradients hold an
    inf or nan is skipped) and ``scaler.update``. A zeroth-order step runs no backward and
    ignores it. The returned loss is the unscaled one.
    """
    if getattr(optimizer, "zeroth_order", False):
        loss = optimizer.step(closure)
    else:
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("the closure must return a scalar loss tensor"
                                 + (f" (it returned {type(loss).__name__}{returned_hint(loss)})"
                                    if not isinstance(loss, torch.Tensor) else ""))
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            optimizer.step()
        else:
            sync = getattr(optimizer, "sync_grads", None)
            if sync is not None:    # DataParallelZO: every rank's scaler sees the reduced gradients
                sync()
            scaler.step(optimizer)
            scaler.update()
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
