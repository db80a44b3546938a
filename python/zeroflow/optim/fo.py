"""First-order baselines: torch's own SGD / Adam with the two attributes every
zeroflow optimizer exposes (``zeroth_order``, ``forward_passes``)."""
from __future__ import annotations

import torch

from zfkernels.opspec import F32_MAX, adam_scalars_refusal

from .zo import (NOT_OPTIONS, _check_layout, check_buffer_shapes, counter, load_with_hooks, refuse_a_module,
                 refuse_a_parameter_given_twice, refuse_a_shared_parameter, state_dict_with_hooks)

__all__ = ["FOSGD", "FOAdam", "FOAdamW"]


class _FOMixin:
    zeroth_order = False

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):       # a module there: "'Linear' object is not iterable"
            refuse_a_module(param_group.get("params"), "param_group['params']")
            if "params" in param_group and not isinstance(param_group["params"], (set, frozenset)):
                # torch.optim's warning only, then two updates a step; and its "some parameters appear
                # in more than one parameter group", naming neither place. The caller's dict stays the
                # group, as in torch.optim (which sets its params to the list too)
                ps = param_group["params"]
                ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
                refuse_a_parameter_given_twice(ps, len(self.param_groups))
                refuse_a_shared_parameter(self.param_groups, ps)
                param_group["params"] = ps
        super().add_param_group(param_group)

    def _init_counters(self) -> None:
        self.forward_passes = 0     # one forward (+ one backward) per step
        self.steps = 0

    def step(self, closure=None):
        # torch.optim wraps a class's step (its hooks, the profiler's record) once an instance of
        # that class exists: this step is wrapped as FOSGD's, and torch's SGD.step as SGD's once
        # any torch.optim.SGD was built, so calling it wrapped ran every step hook twice (a
        # logging or clipping hook saw two steps per step). Its unwrapped function is called.
        self._check_step_scalars()
        parent = super().step
        fn = parent.__func__
        if getattr(fn, "hooked", False) and hasattr(fn, "__wrapped__"):
            loss = fn.__wrapped__(self, closure)
        else:
            loss = parent(closure)
        self.forward_passes += 1
        self.steps += 1
        return loss

    def _check_step_scalars(self) -> None:
        """What a step derives from the options and the state, checked before torch's step
        (FOAdam's step size); nothing here for FOSGD."""

    def __getstate__(self):     # torch.optim's keeps defaults, state, param_groups only
        return super().__getstate__() | {"forward_passes": self.forward_passes, "steps": self.steps}

    def state_dict(self):
        return state_dict_with_hooks(self, lambda: super(_FOMixin, self).state_dict() | {"zeroflow": {
            "optimizer": type(self).__name__, "forward_passes": self.forward_passes, "steps": self.steps}})

    def check_state_dict(self, state_dict) -> None:
        """Raise ``ValueError`` if ``state_dict`` was saved by another optimizer class (its
        recorded class, or group options this class does not have), for other parameter
        groups, or with buffers of other shapes than the parameters. A group may lack options
        that a newer torch added (torch fills them in)."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("not an optimizer state_dict (a mapping with 'state' and 'param_groups')")
        me = type(self).__name__
        saved_by = (state_dict.get("zeroflow") or {}).get("optimizer", me)
        if saved_by != me:
            raise ValueError(f"state_dict was saved by {saved_by}; this is a {me}")
        for k in ("forward_passes", "steps"):
            counter((state_dict.get("zeroflow") or {}).get(k, 0), f"state_dict's 'zeroflow' counter {k!r}")
        _check_layout(state_dict)
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer {len(self.param_groups)}")
        for i, (sg, g) in enumerate(zip(groups, self.param_groups)):
            foreign = sorted(set(sg) - set(g) - NOT_OPTIONS)
            if foreign:
                raise ValueError(f"state_dict param group {i} has options {', '.join(foreign)} that a {me} does not "
                                 f"have (a state of another optimizer class?)")
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"state_dict param group {i} has {len(sg['params'])} parameters, this optimizer "
                                 f"{len(g['params'])}")
        check_buffer_shapes(state_dict, self.param_groups)

    def load_state_dict(self, state_dict):
        load_with_hooks(self, state_dict, self._load_checked)

    def _load_checked(self, state_dict) -> None:
        self.check_state_dict(state_dict)
        state_dict = dict(state_dict)
        extra = state_dict.pop("zeroflow", None) or {}
        super().load_state_dict(state_dict)
        self.forward_passes = int(extra.get("forward_passes", 0))
        self.steps = int(extra.get("steps", 0))


class FOSGD(_FOMixin, torch.optim.SGD):
    """``torch.optim.SGD`` + zeroflow counters (``fo_sgd``)."""

    def __init__(self, params, lr=1e-3, **kw):
        refuse_a_module(params)
        super().__init__(params, lr=lr, **kw)
        self._init_counters()


class _AdamScalars:
    def _check_step_scalars(self) -> None:
        # lr=3e38 (what ZO-Adam's float32 check takes) made torch's step size lr / (1 - beta1^1) = 3e39:
        # on CPU torch raised 'value cannot be converted to type float without overflow' after m, v
        # and the step count had advanced; its foreach path (CUDA) wrote inf / nan into every
        # parameter. Refused before torch's step, for the step count each parameter will take.
        # float64 parameters compute in float64, where such a step size is finite.
        name = "AdamW" if isinstance(self, torch.optim.AdamW) else "Adam"
        for i, g in enumerate(self.param_groups):
            lr, b1 = float(g["lr"]), float(g["betas"][0])
            wd = float(g["weight_decay"])
            # AdamW's decay 1 - lr * wd (torch's Adam takes decoupled_weight_decay=True too)
            decoupled = bool(g.get("decoupled_weight_decay", name == "AdamW"))
            if lr / (1.0 - b1) < F32_MAX / 2 and (not decoupled or lr * wd < F32_MAX / 2):
                continue        # the common case, decided without the state: step 1's step size is the largest
            ps = [p for p in g["params"] if p.grad is not None and p.dtype != torch.float64]
            steps = sorted({int(self.state[p]["step"]) + 1 if "step" in self.state.get(p, ()) else 1 for p in ps})
            for t in steps:
                why = adam_scalars_refusal(lr, b1, t, wd, decoupled, f"torch.optim.{name} computes for float32, "
                                           "bf16 and fp16 parameters")
                if why is not None:
                    raise ValueError(f"param group {i}: {why}")


class FOAdam(_AdamScalars, _FOMixin, torch.optim.Adam):
    """``torch.optim.Adam`` + zeroflow counters (``fo_adam``)."""

    def __init__(self, params, lr=1e-3, **kw):
        refuse_a_module(params)
        super().__init__(params, lr=lr, **kw)
        self._init_counters()


class FOAdamW(_AdamScalars, _FOMixin, torch.optim.AdamW):
    """``torch.optim.AdamW`` + zeroflow counters (``fo_adam`` with ``decoupled_weight_decay=True``)."""

    def __init__(self, params, lr=1e-3, **kw):
        refuse_a_module(params)
        super().__init__(params, lr=lr, **kw)
        self._init_counters()
