"""Hybrid FO -> ZO (paper §6, enhancement 1): one optimizer object that trains with a
first-order optimizer for the first ``switch`` steps and with a zeroth-order one after.

The hybrid owns the param groups that schedulers see: ``param_groups[i]["lr"]`` is the
scheduled learning rate; before every step it is pushed into the active inner optimizer,
the ZO phase scaled by ``zo_lr_scale`` (= zo lr / fo lr at construction). A scheduler
attached to the hybrid therefore keeps decaying both phases with one schedule.
"""
from __future__ import annotations

import math

import torch

from .zo import (
    SCHEDULER_LRS,
    _check_layout,
    _number,
    _warn_at_caller,
    check_buffer_shapes,
    counter,
    load_with_hooks,
    params_list,
    refuse_a_shared_parameter,
    state_dict_with_hooks,
)


def _rate(x, name: str) -> float:
    """A hybrid group's ``lr`` / ``zo_lr_scale``: a real number >= 0 and finite, else a
    ValueError naming it (float() said "could not convert string to float" and took -1)."""
    try:
        v = _number(x, name)
    except TypeError as e:
        raise ValueError(str(e)) from None
    if not 0.0 <= v < math.inf:
        raise ValueError(f"{name}={x!r} must be >= 0 and finite")
    return v


def _check_inner(opt: torch.optim.Optimizer, state_dict, which: str) -> None:
    """An inner optimizer's saved state checked before anything loads: its own
    ``check_state_dict`` (zeroflow's optimizers), else, for a torch.optim optimizer, what
    torch.optim's load would refuse after the hybrid's own groups were loaded (the groups and
    their parameter counts)."""
    check = getattr(opt, "check_state_dict", None)
    if check is not None:
        check(state_dict)
        return
    what = f"state_dict's 'hybrid' {which!r} state"
    if not (isinstance(state_dict, dict) and {"state", "param_groups"} <= set(state_dict)):
        raise ValueError(f"{what} is not an optimizer state_dict (state, and param_groups each listing its "
                         "parameter ids)")
    _check_layout(state_dict)       # the groups and state as zeroflow's own optimizers check them
    saved, mine = state_dict["param_groups"], opt.param_groups
    if len(saved) != len(mine):
        raise ValueError(f"{what} has {len(saved)} param groups, the {type(opt).__name__} {len(mine)}")
    for i, (sg, g) in enumerate(zip(saved, mine)):
        if len(sg["params"]) != len(g["params"]):
            raise ValueError(f"{what}: param group {i} has {len(sg['params'])} parameters, the "
                             f"{type(opt).__name__}'s {len(g['params'])}")
    check_buffer_shapes(state_dict, mine, f"{what}'s")


def _check_direction(fo: torch.optim.Optimizer) -> None:
    """The FO optimizer minimizes, as the ZO phase does: torch.optim's maximize=True ascended
    through the FO phase and the ZO optimizer descended after the switch, without a word."""
    for i, g in enumerate(fo.param_groups):
        if g.get("maximize"):
            raise ValueError(f"HybridFOZO: the FO optimizer's param group {i} has maximize=True, but the ZO phase "
                             "minimizes the closure's loss (the run ascended until the switch, then descended); "
                             "build the FO optimizer without maximize, and return the negated objective from the "
                             "closure to maximize it")


def _tensor_of(item):
    """A param group entry's tensor: ``item``, or the tensor of a ``(name, tensor)`` pair."""
    return item[1] if isinstance(item, tuple) and len(item) == 2 else item


def _named_as(opt: torch.optim.Optimizer, tensors: list, names: list | None) -> dict:
    """A new group's ``params`` (and ``param_names``) as ``opt``'s groups hold them: named where
    they are (the names given explicitly: a group left empty by frozen parameters has no pair
    for torch.optim to read its names from), else the tensors only."""
    if names is not None and opt.param_groups and "param_names" in opt.param_groups[0]:
        return {"params": list(tensors), "param_names": list(names)}
    return {"params": list(tensors)}


__all__ = ["HybridFOZO"]


class HybridFOZO(torch.optim.Optimizer):
    """``HybridFOZO(fo, zo, switch)``: ``fo`` and ``zo`` optimize the same parameters with
    the same group structure. Use :func:`zeroflow.optim.train_step`, which asks
    ``zeroth_order`` whether to run backward (FO phase) or only the closure (ZO phase)."""

    def __init__(self, fo: torch.optim.Optimizer, zo: torch.optim.Optimizer, switch: int):
        for name, o in (("fo", fo), ("zo", zo)):
            if not isinstance(o, torch.optim.Optimizer):     # an AttributeError on param_groups
                raise TypeError(f"HybridFOZO({name}=...) must be a torch.optim.Optimizer, got {type(o).__name__}")
        if getattr(zo, "zeroth_order", False) is not True:     # its phase steps without backward: no .grad
            raise TypeError(f"HybridFOZO(zo=...) must be a zeroth-order optimizer (ZOFusedSGD, ZOFusedAdam), got "
                            f"{type(zo).__name__}: the ZO phase runs only the closure, so a first-order optimizer "
                            "there finds no .grad and trains nothing")
        switch = counter(switch, "hybrid_switch (the number of FO steps before ZO)")    # True was 1 step
        _check_direction(fo)
        if len(fo.param_groups) != len(zo.param_groups):
            raise ValueError("fo and zo optimizers must have the same param groups")
        groups = []
        for gf, gz in zip(fo.param_groups, zo.param_groups):
            if [id(p) for p in gf["params"]] != [id(p) for p in gz["params"]]:
                # the usual cause: a partly frozen model given to both, which the ZO optimizer filters
                frozen = sum(1 for p in gf["params"] if not p.requires_grad)
                raise ValueError(
                    "fo and zo optimizers must optimize the same parameters in the same order"
                    + (f"; the fo optimizer holds {frozen} parameter(s) with requires_grad=False, which a zeroflow ZO "
                       "optimizer leaves out of its groups: give both the trainable ones only (e.g. "
                       "[p for p in model.parameters() if p.requires_grad])" if frozen else ""))
            lf, lz = _rate(gf["lr"], "the FO optimizer's lr"), float(gz["lr"])   # nan: the ZO phase's lr nan
            if lf == 0.0 and lz != 0.0:
                raise ValueError(f"the FO phase's lr is 0 and the ZO phase's {lz}: the hybrid schedules the ZO lr as a "
                                 "multiple of the FO lr (zo_lr_scale), which 0 cannot carry; give the FO phase an "
                                 "lr > 0 (fo_lr=...), or use the ZO optimizer alone (hybrid_switch=0 or none)")
            group = {"params": gz["params"], "lr": lf, "zo_lr_scale": (lz / lf) if lf else 1.0}
            # named as the inner optimizers' groups (built from model.named_parameters()): torch.optim
            # refuses a named group in an optimizer of unnamed ones and the other way round, so an
            # unnamed hybrid over named optimizers could add no group at all
            names = gz.get("param_names", gf.get("param_names"))
            if names is not None:
                group["param_names"] = list(names)
            groups.append(group)
        super().__init__(groups, {})
        self.fo, self.zo, self.switch = fo, zo, switch      # after: add_param_group forwards once they are set
        self._steps = 0

    def add_param_group(self, param_group: dict) -> None:
        """A group added after construction goes to both phases' optimizers too (it was
        only the hybrid's: never trained). It takes ``params``, ``lr`` (the FO phase's) and
        ``zo_lr_scale``, by default those of the first group, and the lr schedulers' keys
        (``initial_lr``, to resume a scheduler; :data:`SCHEDULER_LRS`), which only the hybrid's
        group keeps; the other options are each inner optimizer's defaults. Refused as a whole,
        nothing added, where either optimizer refuses it."""
        if not hasattr(self, "zo"):       # torch.optim.Optimizer.__init__ adding the hybrid's own groups
            return super().add_param_group(param_group)
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("param_group has no 'params' entry (it has "
                             f"{', '.join(map(str, param_group)) or 'none'}); "
                             "give the tensors to optimize as {'params': [...], ...}")
        other = sorted(set(param_group) - {"params", "lr", "zo_lr_scale", *SCHEDULER_LRS})
        if other:
            raise ValueError(f"HybridFOZO.add_param_group takes params, lr and zo_lr_scale, not {', '.join(other)}: "
                             "the two phases' other options are their optimizers' defaults (build the hybrid with "
                             "the group in both fo and zo to give it its own); it takes the lr schedulers' "
                             f"{', '.join(SCHEDULER_LRS)} too")
        # what a scheduler attached to the hybrid reads from its groups: a user gives a new
        # group its initial_lr to resume the scheduler (last_epoch >= 0 requires one per group);
        # it was refused as an option, where the plain ZO optimizers take it. The hybrid's group
        # keeps it; the inner optimizers' groups get only the lr the hybrid pushes each step
        sched = {k: param_group[k] for k in SCHEDULER_LRS if k in param_group}
        for k, v in sched.items():
            _rate(v, k)
        # the ZO optimizer leaves frozen parameters out of a group: so does the FO one here, as
        # construction requires the same parameters in both ((name, tensor) pairs too: a frozen
        # named parameter stayed in the FO group and the hybrid's, and every later step refused
        # the groups as not its optimizers')
        given = params_list(param_group["params"])
        named = any(isinstance(p, tuple) for p in given)     # before the filter: a group of frozen pairs is named
        if named and not all(isinstance(p, tuple) and len(p) == 2 for p in given):
            raise ValueError("HybridFOZO.add_param_group: give every parameter of the group as a (name, tensor) "
                             "pair, or none")
        ps = [p for p in given if not (isinstance(t := _tensor_of(p), torch.Tensor) and not t.requires_grad)]
        tensors, names = [_tensor_of(p) for p in ps], ([p[0] for p in ps] if named else None)
        if self.param_groups and named != ("param_names" in self.param_groups[0]):
            raise ValueError(
                "HybridFOZO.add_param_group: " + ("this hybrid's param groups name their parameters (built from "
                                                  "named_parameters()): give the new group's as (name, tensor) pairs"
                                                  if not named else
                                                  "this hybrid's param groups do not name their parameters: give "
                                                  "the new group's as tensors, not (name, tensor) pairs"))
        self._match_groups()        # a group popped before: out of the inner optimizers first
        first = self.param_groups[0]
        lf = _rate(param_group.get("lr", first["lr"]), "lr")
        scale = _rate(param_group.get("zo_lr_scale", first["zo_lr_scale"]), "zo_lr_scale")
        # each optimizer gets the parameters as its own groups hold them: named or not (an inner
        # optimizer built on plain tensors under a named hybrid takes the tensors)
        # a tensor of another group (a tied weight under its second name): said by name, not as torch.optim's
        # FO optimizer says it
        refuse_a_shared_parameter(self.zo.param_groups, list(zip(names, tensors)) if names else tensors)
        self.fo.add_param_group({**_named_as(self.fo, tensors, names), "lr": lf})    # torch.optim's checks first
        try:
            self.zo.add_param_group({**_named_as(self.zo, tensors, names), "lr": lf * scale})
        except Exception:
            self.fo.param_groups.pop()
            raise
        super().add_param_group({**_named_as(self, tensors, names), "lr": lf, "zo_lr_scale": scale, **sched})

    def __getstate__(self):     # torch.optim's keeps defaults, state, param_groups only
        return super().__getstate__() | {"fo": self.fo, "zo": self.zo, "switch": self.switch, "_steps": self._steps}

    def __setstate__(self, state):
        super().__setstate__(state)
        # torch.optim's adds "differentiable" to defaults (run by its load_state_dict and by a
        # copy), which add_param_group then put into every later group: no option of the hybrid's
        self.defaults.pop("differentiable", None)

    @property
    def zeroth_order(self) -> bool:
        return self._steps >= self.switch

    @property
    def forward_passes(self) -> int:
        # a torch.optim FO optimizer counts nothing: one forward for each step of the FO phase,
        # the steps before the switch (start_zo lowers switch to the steps taken)
        fo = getattr(self.fo, "forward_passes", None)
        return (min(self._steps, self.switch) if fo is None else fo) + self.zo.forward_passes

    @property
    def active(self) -> torch.optim.Optimizer:
        return self.zo if self.zeroth_order else self.fo

    def start_zo(self) -> None:
        """Switch to the ZO phase now (e.g. at a task/epoch boundary); the FO phase's
        ``.grad`` tensors and optimizer state are freed here, as at a scheduled switch."""
        was_fo = not self.zeroth_order
        self.switch = min(self.switch, self._steps)
        if was_fo:
            self._free_fo()

    def _free_fo(self) -> None:
        """What the FO phase holds and the ZO phase never reads: the ``.grad`` tensors and the
        FO optimizer's state (SGD's momentum buffers, Adam's m and v: one or two parameter-sized
        buffers per parameter). The state stayed for the whole ZO phase, beside the ZO
        optimizer's own (a hybrid zo_adam held four parameter-sized buffers where ZO-Adam
        declares two, docs/algorithms.md §6)."""
        self.fo.zero_grad(set_to_none=True)
        self.fo.state.clear()

    def _match_groups(self) -> None:
        """The inner optimizers' groups follow the hybrid's: a group dropped from the hybrid
        (``param_groups.pop(k)``, e.g. an old task's head, which the ZO optimizers allow) is
        dropped from both phases' optimizers too, with the FO optimizer's state of its
        parameters (the ZO optimizer drops its own at its next step). Before, the dropped group
        kept training in both (perturbed, updated, weight-decayed) and the scheduled lr of each
        later group went to the group before it. A group the inner optimizers do not hold
        (appended to ``param_groups`` directly, not by ``add_param_group``) is refused."""
        def key(g):
            return tuple(id(p) for p in g["params"])

        mine = [key(g) for g in self.param_groups]
        for o in (self.fo, self.zo):
            theirs = [key(g) for g in o.param_groups]
            if theirs == mine:
                continue
            # the hybrid's groups, in order, among theirs (matched in order, not by membership: a
            # group left empty by frozen parameters has the key of every other empty group, and
            # two of them with one popped kept both and refused every later step)
            kept = []
            for g, k in zip(o.param_groups, theirs):
                if len(kept) < len(mine) and k == mine[len(kept)]:
                    kept.append(g)
            if len(kept) != len(mine):
                raise ValueError(
                    "HybridFOZO: its param groups are not its two optimizers' groups (a group appended to "
                    "param_groups directly, or the groups reordered); add a group with add_param_group(), drop "
                    "one with param_groups.pop(k)")
            held = {id(p) for g in kept for p in g["params"]}
            if o is self.fo:
                for p in [p for p in o.state if id(p) not in held]:
                    del o.state[p]
                for g in o.param_groups:
                    if not any(g is k for k in kept):
                        for p in g["params"]:
                            p.grad = None
            o.param_groups[:] = kept

    def _check_rates(self) -> None:
        """Every group's ``lr`` and ``zo_lr_scale``, checked before the step pushes them (as
        add_param_group and load_state_dict check them): torch.optim's FO optimizers do not
        check an lr set between steps, so the FO phase stepped with lr -0.1 (ascent) or nan (nan
        in every parameter), and a nan zo_lr_scale surfaced only at the switch, refused as the
        ZO optimizer's "lr=nan"."""
        for i, g in enumerate(self.param_groups):
            for k in ("lr", "zo_lr_scale"):
                try:
                    _rate(g.get(k), k)
                except ValueError as e:
                    raise ValueError(f"HybridFOZO param group {i}: {e}") from None

    def _sync_lr(self) -> None:
        zo = self.zeroth_order
        for g, gi in zip(self.param_groups, self.active.param_groups):
            gi["lr"] = g["lr"] * g["zo_lr_scale"] if zo else g["lr"]

    def step(self, closure=None):
        was_fo = not self.zeroth_order
        self._match_groups()
        self._check_rates()
        if was_fo:      # an option set between steps (or loaded with the FO state)
            _check_direction(self.fo)
        self._sync_lr()
        loss = self.active.step(closure)
        if was_fo:
            self._check_fo_step_had_grads()
        self._steps += 1
        if was_fo and self.zeroth_order:
            self._free_fo()      # the .grad tensors and the FO state, for the ZO phase
        return loss

    def _check_fo_step_had_grads(self) -> None:
        """Warn once when a first-order step found no ``.grad``: it moved nothing. The usual
        cause is a ZO-style closure (``opt.step(lambda: loss)``, no backward) given to the
        hybrid, which trained nothing for its whole FO phase without a word."""
        if getattr(self, "_warned_no_grad", False):
            return
        if any(p.grad is not None for g in self.fo.param_groups for p in g["params"]):
            return
        self._warned_no_grad = True
        _warn_at_caller(
            f"HybridFOZO: first-order step {self._steps} (of the FO phase's {self.switch}) found no .grad and moved "
            "nothing. In the FO phase the closure must call loss.backward() (torch.optim's convention), or train "
            "with zeroflow.optim.train_step, which runs backward in the FO phase and only the forward in the ZO "
            "phase")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.fo.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        self._match_groups()
        return state_dict_with_hooks(self, lambda: super(HybridFOZO, self).state_dict() | {"hybrid": {
            "steps": self._steps, "switch": self.switch, "fo": self.fo.state_dict(), "zo": self.zo.state_dict()}})

    def load_state_dict(self, state_dict):
        """Both inner states are checked before anything is loaded: a state that does not
        fit raises and leaves the hybrid (and its two optimizers) untouched. The hybrid's
        load-state-dict hooks run around the whole load (post-hooks see fo and zo loaded)."""
        load_with_hooks(self, state_dict, self._load_checked)

    def _load_checked(self, state_dict) -> None:
        self._match_groups()
        h = state_dict.get("hybrid") if isinstance(state_dict, dict) else None
        if not isinstance(h, dict) or not {"steps", "switch", "fo", "zo"} <= set(h):
            raise ValueError("state_dict lacks the 'hybrid' part (steps, switch, fo, zo); "
                             "was it saved by a HybridFOZO?")
        if not isinstance(state_dict.get("param_groups"), (list, tuple)):
            raise ValueError("state_dict's param_groups must be a list of dicts; was it saved by a HybridFOZO?")
        if len(state_dict.get("param_groups", ())) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(state_dict.get('param_groups', ()))} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        steps, switch = (counter(h[k], f"state_dict's 'hybrid' {k!r}") for k in ("steps", "switch"))
        # the hybrid's own groups: torch.optim's load took a group without zo_lr_scale or with
        # lr='x', and the step that needed it failed (KeyError at the ZO phase, TypeError in the FO one)
        for i, (sg, g) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            if not isinstance(sg, dict) or len(sg.get("params", ())) != len(g["params"]):
                raise ValueError(f"state_dict param group {i} does not list the {len(g['params'])} parameters of this "
                                 "HybridFOZO's group")
            for k in ("lr", "zo_lr_scale"):
                if k not in sg:
                    raise ValueError(f"state_dict param group {i} lacks {k}; was it saved by a HybridFOZO?")
                try:
                    _rate(sg[k], k)
                except ValueError as e:
                    raise ValueError(f"state_dict param group {i}: {e}") from None
        _check_inner(self.fo, h["fo"], "fo")
        self.zo.check_state_dict(h["zo"])
        state_dict = dict(state_dict)
        state_dict.pop("hybrid")
        super().load_state_dict(state_dict)
        self._steps, self.switch = steps, switch
        self.fo.load_state_dict(h["fo"])
        self.zo.load_state_dict(h["zo"])
        if self.zeroth_order:       # a state saved in the ZO phase before its FO state was freed
            self.fo.state.clear()
