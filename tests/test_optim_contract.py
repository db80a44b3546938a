"""The optimizers' contract where a step or a state goes wrong (docs/algorithms.md §7): a step
that fails leaves no parameter moved, a bad option or state is refused before anything
changes, and an optimizer can be copied, pickled, resumed under a torch lr scheduler and
extended with add_param_group. Each case here once failed (a fresh-eyes audit, 2026-12-01)."""
from __future__ import annotations

import contextlib
import copy
import gc
import io
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F

from conftest import child_env, make_data, make_mlp
from zeroflow.optim import HybridFOZO, ZOFusedAdam, ZOFusedSGD, create, train_step

warnings.filterwarnings("ignore", message="zfkernels: the compiled")
X, Y = make_data(32, 6)
MOVED = 1e-6      # a restore rounds (§7): within this, far below a perturbation (zo_eps = 1e-2)


def loss_of(model):
    return F.mse_loss(model(X), Y)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def max_moved(model, before) -> float:
    return max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before))


def two_groups(cls, **kw):
    model = make_mlp(6, 4, 1)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    return model, cls([{"params": first}, {"params": second}], lr=0.1, zo_eps=1e-2, seed=3, **kw)


def failing_at(n, closure):
    calls = [0]

    def c():
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt     # the worst case: a ^C in the middle of a forward
        return closure()
    return c


# ------------------------------------------------------------------ failed steps
@pytest.mark.parametrize("cls,kw", [(ZOFusedSGD, dict(momentum=0.9)), (ZOFusedAdam, {})])
@pytest.mark.parametrize("fail_at", [4, 5])     # L0, L+, L-, then conserve at theta0 + Delta, theta0 - Delta
def test_a_closure_failing_in_conserves_forwards_lands_on_theta0(cls, kw, fail_at):
    model = make_mlp(6, 4, 1)
    opt = cls(model.parameters(), lr=0.1, zo_eps=1e-2, conserve=True, seed=5, **kw)
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        opt.step(failing_at(fail_at, lambda: loss_of(model)))
    assert max_moved(model, before) <= MOVED      # was 0.36 (left at theta0 + Delta or theta0 - Delta)
    assert opt.conserve_choice == 0.0 and opt.step_count == 1
    loss = opt.step(lambda: loss_of(model))       # and the optimizer goes on
    assert torch.isfinite(loss)


@pytest.mark.parametrize("cls,kw", [(ZOFusedSGD, {}), (ZOFusedAdam, {}), (ZOFusedSGD, dict(conserve=True))])
def test_a_step_called_from_its_own_closure_is_refused_and_theta_restored(cls, kw):
    """A closure that steps its own optimizer (concurrency / re-entrancy audit): the inner step
    took the outer one's seeds and, ending, cleared its stream options, so the outer step's
    restore raised KeyError and left theta perturbed (0.015 at lr 0)."""
    model = make_mlp(6, 4, 1)
    opt = cls(model.parameters(), lr=0.0, zo_eps=1e-2, seed=5, **kw)
    before = snapshot(model)
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] == 2:       # at theta + eps z
            opt.step(lambda: loss_of(model))
        return loss_of(model)
    with pytest.raises(RuntimeError, match="while a step of this optimizer was running"):
        opt.step(closure)
    assert max_moved(model, before) <= MOVED
    assert opt.step_count == 1
    opt.step(lambda: loss_of(model))      # and the optimizer goes on
    assert opt.step_count == 2


@pytest.mark.parametrize("fail", [False, True])
@pytest.mark.parametrize("cls,kw", [(ZOFusedSGD, {}), (ZOFusedAdam, {}), (ZOFusedSGD, dict(conserve=True))])
def test_zo_eps_set_inside_the_closure_does_not_change_the_running_step(cls, kw, fail):
    """A closure (or a schedule stepped inside it) that sets zo_eps: the restore used the new
    value, leaving theta at theta0 + (eps_old - eps_new) z, after a normal step (0.0074 at
    lr 0) and after a failed one (0.013); the step uses the zo_eps it started with."""
    model = make_mlp(6, 4, 1)
    ref_model = copy.deepcopy(model)
    opt = cls(model.parameters(), lr=0.1, zo_eps=1e-2, seed=5, **kw)
    ref = cls(ref_model.parameters(), lr=0.1, zo_eps=1e-2, seed=5, **kw)
    before = snapshot(model)
    calls = [0]

    def closure():
        calls[0] += 1
        opt.param_groups[0]["zo_eps"] = 5e-3
        if fail and calls[0] == 2:      # theta is perturbed there (conserve's L0 comes first)
            raise RuntimeError("boom")
        return loss_of(model)
    if fail:
        with pytest.raises(RuntimeError, match="boom"):
            opt.step(closure)
        assert max_moved(model, before) <= MOVED
    else:
        opt.step(closure)
        ref.step(lambda: loss_of(ref_model))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))
    assert opt.param_groups[0]["zo_eps"] == 5e-3      # the next step takes the new value


def test_a_group_added_or_dropped_inside_the_closure_joins_or_leaves_at_the_next_step():
    """add_param_group inside the closure: the restore met a group with no stream options
    (KeyError) and left theta perturbed; dropping one left it perturbed for good."""
    model, opt = two_groups(ZOFusedSGD)
    for g in opt.param_groups:
        g["lr"] = 0.0
    extra = torch.nn.Parameter(torch.zeros(3))
    before = snapshot(model)

    def add():
        if len(opt.param_groups) == 2:
            opt.add_param_group({"params": [extra], "lr": 0.1})
        return loss_of(model)
    opt.step(add)
    assert max_moved(model, before) <= MOVED and torch.equal(extra, torch.zeros(3))   # not in this step

    def drop():
        if len(opt.param_groups) == 3:
            opt.param_groups.pop(1)
        return loss_of(model)
    opt.step(drop)
    assert max_moved(model, before) <= MOVED
    assert not torch.equal(extra, torch.zeros(3))      # trained from the step after it was added
    assert len(opt.param_groups) == 2
    opt.step(lambda: loss_of(model))


def test_a_step_refused_by_its_checks_leaves_the_optimizer_free_for_the_next_one():
    """The running-step claim is taken before the checks: a step refused there gives it back
    (else every later step was refused as "called while a step was running")."""
    model, opt = two_groups(ZOFusedSGD)
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="param group 1: .*must be >= 0"):
        opt.step(lambda: loss_of(model))
    opt.param_groups[1]["lr"] = 0.01
    opt.step(lambda: loss_of(model))
    assert opt.step_count == 1


def test_a_step_from_another_thread_during_the_checks_of_a_running_one_is_refused():
    """The claim comes before the option checks: a second thread calling step() while the first
    is still checking its groups is refused, not run beside it (deterministic: the first
    thread's check waits until the second call has returned)."""
    import threading

    model, opt = two_groups(ZOFusedSGD)
    entered, go = threading.Event(), threading.Event()
    real = opt._check_group
    calls = [0]

    def check_group(g, where):
        calls[0] += 1
        if calls[0] == 1:
            entered.set()
            assert go.wait(30)
        return real(g, where)
    opt._check_group = check_group
    errors = []

    def first():
        try:
            opt.step(lambda: loss_of(model))
        except BaseException as e:      # noqa: BLE001 - reported below
            errors.append(e)
    t = threading.Thread(target=first)
    t.start()
    try:
        assert entered.wait(30)
        with pytest.raises(RuntimeError, match="while a step of this optimizer was running"):
            opt.step(lambda: loss_of(model))
    finally:
        go.set()
        t.join(60)
    assert errors == [] and opt.step_count == 1


@pytest.mark.parametrize("cls,kw", [(ZOFusedSGD, dict(conserve=True)), (ZOFusedAdam, dict(conserve=True)),
                                    (ZOFusedSGD, dict(estimator="forward_grad"))])
def test_a_group_added_inside_the_closure_joins_at_the_next_step_with_conserve_and_forward_grad(cls, kw):
    """conserve's moves (_move) and forward_grad's parameter list use the groups the step
    started with, as the perturbations do: a group added by the closure is not moved by the
    step that saw it added (it has no stream options there: the step failed), and trains from the next."""
    model = make_mlp(6, 4, 1)
    extra = torch.nn.Parameter(torch.zeros(3))
    model.register_parameter("extra", extra)       # forward_grad: a tensor of the model
    if kw.get("estimator") == "forward_grad":
        kw = dict(kw, model=model)
    opt = cls([{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}], lr=0.1,
              zo_eps=1e-2, seed=3, **kw)

    def add():
        if len(opt.param_groups) == 2:
            opt.add_param_group({"params": [extra], "lr": 0.1})
        return loss_of(model) + extra.sum() * 0.5
    opt.step(add)
    assert torch.equal(extra, torch.zeros(3)) and opt.step_count == 1
    opt.step(add)
    assert not torch.equal(extra, torch.zeros(3))


@pytest.mark.parametrize("cls,kw,key,value", [
    (ZOFusedSGD, dict(momentum=0.9), "lr", 0.5), (ZOFusedSGD, dict(weight_decay=0.1), "weight_decay", 0.5),
    (ZOFusedSGD, dict(momentum=0.9), "momentum", 0.5), (ZOFusedAdam, {}, "lr", 0.5),
    (ZOFusedAdam, dict(decoupled_weight_decay=True, weight_decay=0.1), "weight_decay", 0.5)])
@pytest.mark.parametrize("at_call", [2, 4])     # L0, L+, L-, then conserve's forwards (theta0 + Delta, - Delta)
def test_an_option_set_by_the_closure_changes_the_next_step_not_the_running_one(cls, kw, key, value, at_call):
    """As for zo_eps (docs/algorithms.md §7): the update and conserve's frozen moves read lr,
    weight_decay and momentum from the group when they ran, so an option set by the closure
    (a scheduler stepped inside it) between conserve's update and its moves sent theta along
    another multiple of Delta: it landed 9 Delta away from theta0 while conserve_choice said
    theta0 and the step returned L(theta0)."""
    def run(change):
        model = make_mlp(6, 4, 1)
        opt = cls(model.parameters(), lr=0.1, zo_eps=1e-2, conserve=True, seed=5, **kw)
        calls = [0]

        def closure():
            calls[0] += 1
            if change and calls[0] == at_call:
                opt.param_groups[0][key] = value
            return loss_of(model)
        loss = opt.step(closure)
        return snapshot(model), loss, opt.conserve_choice
    (want, want_loss, want_choice), (got, got_loss, got_choice) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert (got_loss, got_choice) == (want_loss, want_choice)


def test_each_group_is_perturbed_by_its_own_zo_eps():
    """The step records every group's zo_eps (not the optimizer's default): group 1 at
    zo_eps=5e-3 moves half as far at the first forward as at 1e-2, the same z."""
    def first_forward_move(eps1):
        model, opt = two_groups(ZOFusedSGD)
        opt.param_groups[1]["zo_eps"] = eps1
        before, moved = snapshot(model), []

        def closure():
            if not moved:
                moved.append([p.detach() - b for p, b in zip(model.parameters(), before)])
            return loss_of(model)
        opt.step(closure)
        return moved[0]
    half, full = first_forward_move(5e-3), first_forward_move(1e-2)
    assert all(torch.equal(a, b) for a, b in zip(half[:2], full[:2]))         # group 0: its own 1e-2
    assert all(torch.allclose(a, b / 2, rtol=1e-3, atol=1e-7) and a.abs().max() > 0 for a, b in zip(half[2:], full[2:]))

def test_a_group_whose_perturbation_fails_takes_the_others_back():
    model, opt = two_groups(ZOFusedSGD)
    opt.step(lambda: loss_of(model))
    model[2].bias.data = model[2].bias.data.double()     # the second group's kernel call refuses it
    before = snapshot(model)
    with pytest.raises(ValueError, match="dtype Double"):
        opt.step(lambda: loss_of(model).float())
    assert max_moved(model, before) <= MOVED              # the first group was left at theta + eps z


@pytest.mark.parametrize("cls,buffer", [(ZOFusedSGD, "momentum_buffer"), (ZOFusedAdam, "exp_avg")])
def test_a_failed_update_restores_the_groups_it_did_not_apply(cls, buffer):
    model, opt = two_groups(cls, **(dict(momentum=0.9) if cls is ZOFusedSGD else {}))
    opt.step(lambda: loss_of(model))
    opt.state[model[2].weight][buffer] = torch.zeros(7)  # replaced between steps: only the kernel sees it
    before = snapshot(model)
    with pytest.raises(ValueError) as e:
        opt.step(lambda: loss_of(model))
    second = [p.detach() for p in model[2].parameters()]
    assert max((p - b).abs().max().item() for p, b in zip(second, before[2:])) <= MOVED   # was at theta - eps z
    assert any("the update failed after 1 of the step's 2 fused calls" in n for n in e.value.__notes__)


@pytest.mark.parametrize("key,value,needle", [
    ("zo_eps", 0.0, "zo_eps=0.0 must be > 0"), ("zo_eps", None, "zo_eps=None is not a real number"),
    ("lr", None, "lr=None is not a real number"),
    # a tensor lr was not checked at all: a negative one trained uphill, a two-element one
    # failed in the update after both forwards, naming no option
    ("lr", torch.tensor(-1.0), "lr=-1.0 must be >= 0"), ("lr", torch.tensor(float("nan")), "must be >= 0"),
    ("lr", torch.tensor([0.1, 0.2]), r"lr=tensor\(\[0.1000, 0.2000\]\) is not a real number"),
    # the op refuses a bool tensor; the option check once took it as 1.0 (zfkernels._real is both's rule)
    ("lr", torch.tensor(True), r"lr=tensor\(True\) is not a real number"),
    ("momentum", -0.5, "momentum=-0.5 must be >= 0"), ("nesterov", True, "nesterov momentum requires"),
    ("history", 1.0, "history=1.0"), ("sign", "yes", "sign='yes' must be True or False")])
def test_an_option_set_between_steps_is_refused_before_any_group_moves(key, value, needle):
    model, opt = two_groups(ZOFusedSGD)
    opt.step(lambda: loss_of(model))
    opt.param_groups[1][key] = value
    before, state = snapshot(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=f"param group 1: .*{needle}"):
        opt.step(lambda: loss_of(model))
    assert max_moved(model, before) == 0.0 and opt.step_count == 1
    assert opt.state_dict()["zeroflow"] == state["zeroflow"]


@pytest.mark.parametrize("attr,value,error,needle", [
    # a misspelt estimator ran one_side without a word; q = 0 divided by zero after the forwards
    ("estimator", "two_sided", ValueError, r"ZOFusedSGD\.estimator='two_sided' must be one of"),
    ("q", 0, ValueError, r"ZOFusedSGD\.q=0 must be an int >= 1"),
    ("q", 2.0, ValueError, r"ZOFusedSGD\.q=2\.0 must be an int"),
    ("q", True, ValueError, r"ZOFusedSGD\.q=True must be an int"),      # a bool is no count
    ("conserve", 1, ValueError, r"ZOFusedSGD\.conserve=1 must be True or False"),
    ("model", "net", TypeError, r"ZOFusedSGD\.model= must be the nn\.Module the closure runs \(or None\), got str"),
    ("conserve", "False", ValueError, r"ZOFusedSGD\.conserve='False' must be True or False"),
    ("sparse_resample", "epoch", ValueError, r"ZOFusedSGD\.sparse_resample='epoch' must be one of"),
    ("backend", "gpu", ValueError, r"ZOFusedSGD\.backend='gpu' must be one of"),
    ("estimator", "forward_grad", ValueError, r"ZOFusedSGD\.estimator='forward_grad' needs model=")])
def test_an_optimizer_wide_option_set_between_steps_is_refused_before_anything_moves(attr, value, error, needle):
    model, opt = two_groups(ZOFusedSGD)
    opt.step(lambda: loss_of(model))
    setattr(opt, attr, value)
    before, state = snapshot(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=needle):
        opt.step(lambda: loss_of(model))
    assert max_moved(model, before) == 0.0 and opt.step_count == 1
    assert opt.state_dict()["zeroflow"] == state["zeroflow"]


@pytest.mark.parametrize("zo_eps", [float("inf"), 1e39, 2.0 ** 124])
def test_a_perturbation_size_that_overflows_float32_is_refused(zo_eps):
    # it was accepted: the perturbed loss was inf, and the skipped step's restore computed
    # inf - inf, turning every parameter into NaN while the warning said "restored"
    with pytest.raises(ValueError, match="zo_eps=.* must be > 0 and at most"):
        ZOFusedSGD(make_mlp(6, 4, 1).parameters(), zo_eps=zo_eps)


# 2^128 - 2^103: the smallest Python float that float32 rounds to inf (half an ulp above its
# largest number, 2^128 - 2^104; the tie rounds to the even inf)
F32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103


@pytest.mark.parametrize("value", [float("inf"), 1e39, F32_OVERFLOW])
@pytest.mark.parametrize("cls,key", [(ZOFusedSGD, "lr"), (ZOFusedSGD, "weight_decay"), (ZOFusedSGD, "momentum"),
                                     (ZOFusedAdam, "lr"), (ZOFusedAdam, "weight_decay"), (ZOFusedAdam, "eps")])
def test_an_infinite_step_option_is_refused_before_it_reaches_the_parameters(cls, key, value):
    # accepted: lr, weight_decay or momentum = inf wrote +-inf into every parameter at the first
    # step, and every later step was skipped for a non-finite loss (Adam's eps = inf: no update);
    # so did a Python float finite in float64 but inf in float32 (lr=1e39), where the kernels compute
    need = re.escape(f"{key}={value} must be {'>' if key == 'eps' else '>='} 0 and finite")    # eps = 0: 0/0
    if math.isfinite(value):
        need += r" in float32 \(at most 3\.4028235e\+38, float32's largest number"
    with pytest.raises(ValueError, match=need):
        cls(make_mlp(6, 4, 1).parameters(), **{key: value})
    model, opt = two_groups(cls)
    opt.step(lambda: loss_of(model))
    opt.param_groups[0][key] = value
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"param group 0: {need}"):
        opt.step(lambda: loss_of(model))
    assert max_moved(model, before) == 0.0 and opt.step_count == 1


@pytest.mark.parametrize("key", ["lr", "weight_decay", "momentum", "eps"])
def test_a_step_option_just_below_float32_overflow_is_taken(key):
    # the bound is where float32 rounds to inf, not float32's largest number: a value between
    # them rounds down to that number, finite where the kernels compute
    assert math.isinf(torch.tensor(F32_OVERFLOW, dtype=torch.float64).float().item())
    below = math.nextafter(F32_OVERFLOW, 0.0)
    assert torch.tensor(below, dtype=torch.float64).float().item() == torch.finfo(torch.float32).max
    cls = ZOFusedAdam if key == "eps" else ZOFusedSGD
    assert cls(make_mlp(6, 4, 1).parameters(), **{key: below}).param_groups[0][key] == below


@pytest.mark.parametrize("cls,key,value,tail", [
    (ZOFusedSGD, "lr", -1.0, ""), (ZOFusedSGD, "momentum", float("nan"), ""),
    (ZOFusedAdam, "weight_decay", float("inf"), ""),
    (ZOFusedAdam, "eps", float("inf"), " (eps=inf makes every update 0)"),
    (ZOFusedAdam, "eps", -1.0, ""), (ZOFusedAdam, "eps", float("nan"), "")])
def test_a_step_option_refusal_gives_the_reason_of_its_value_only(cls, key, value, tail):
    # "in float32 (at most 3.4e38 ...)" belongs to a finite value that float32 rounds to inf, and
    # "(eps=inf makes every update 0)" to eps=inf: neither explains a negative, NaN or infinite
    # value (eps=-1 was refused as "(eps=inf makes every update 0)")
    with pytest.raises(ValueError) as e:
        cls(make_mlp(6, 4, 1).parameters(), **{key: value})
    want = f"{key}={value} must be {'>' if key == 'eps' else '>='} 0 and finite{tail}"
    assert str(e.value) == want


@pytest.mark.parametrize("cls,kw,needle", [
    (ZOFusedAdam, dict(betas=(1.5, 0.999)), "betas=.* must be two numbers in \\[0, 1\\)"),
    (ZOFusedAdam, dict(eps=-1.0), "eps=-1.0 must be > 0"),
    (ZOFusedSGD, dict(momentum=-1.0), "momentum=-1.0 must be >= 0"),
    (ZOFusedSGD, dict(nesterov=True), "nesterov momentum requires")])
def test_per_group_sgd_and_adam_options_are_checked_like_the_constructors(cls, kw, needle):
    model = make_mlp(6, 4, 1)
    opt = cls(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=needle):       # they were accepted, and stepped
        opt.add_param_group({"params": model[2].parameters(), **kw})
    assert len(opt.param_groups) == 1


EPS_ZERO = r"eps=.* must be > 0 \(at least 1\.18e-38.*0/0 writes NaN"


@pytest.mark.parametrize("eps", [0.0, 1e-46, 1e-40])      # 0 itself, 0 in float32, below its smallest normal
def test_zo_adam_refuses_an_eps_that_divides_a_zero_estimate_by_zero(eps):
    # torch.optim.Adam's eps=0 was taken: a coordinate whose ZO estimate was 0 at every step so
    # far (a masked one with sparsity > 0; all of them after a first step whose loss difference
    # is 0) has m = v = 0, and its update wrote 0/0 = NaN into the parameter without a word
    for kw in (dict(sparsity=0.5), {}):
        with pytest.raises(ValueError, match=EPS_ZERO):
            ZOFusedAdam(make_mlp(6, 4, 1).parameters(), eps=eps, **kw)
    model, opt = two_groups(ZOFusedAdam, sparsity=0.5)
    with pytest.raises(ValueError, match=EPS_ZERO):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], "eps": eps})
    assert len(opt.param_groups) == 2
    opt.step(lambda: loss_of(model))
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["eps"] = eps
    with pytest.raises(ValueError, match=EPS_ZERO):
        opt.load_state_dict(saved)
    opt.param_groups[1]["eps"] = eps            # set between steps: refused before anything moves
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"param group 1: {EPS_ZERO}"):
        opt.step(lambda: loss_of(model))
    assert max_moved(model, before) == 0.0 and opt.step_count == 1


def test_zo_adam_with_the_tiny_eps_the_refusal_suggests_keeps_zero_estimates_finite():
    # what the message offers instead of eps=0: a first step whose loss difference is 0 and the
    # masked coordinates leave the parameters where they were (0/eps = 0; up to the restore's
    # rounding, §7), not NaN
    model = make_mlp(6, 4, 1)
    before = snapshot(model)
    opt = ZOFusedAdam(model.parameters(), lr=0.1, eps=1e-30, sparsity=0.5, seed=3)
    opt.step(lambda: torch.tensor(1.0))
    assert opt.last_projected == [0.0]
    assert max_moved(model, before) <= MOVED
    opt.step(lambda: loss_of(model))
    assert all(p.isfinite().all() for p in model.parameters())


# ------------------------------------------------------------------ copies and states
def _run(model, opt, steps):
    for _ in range(steps):
        train_step(opt, lambda: loss_of(model))


@pytest.mark.parametrize("name,kw", [("zo_sgd", dict(momentum=0.9)), ("zo_adam", dict(sparsity=0.3)),
                                     ("zo_sgd", dict(hybrid_switch=1)), ("fo_adam", {})])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_optimizer_continues_the_original_bit_for_bit(name, kw, how):
    # torch.optim's __getstate__ keeps defaults, state and param_groups only: the copy had no
    # counters and raised AttributeError at its first step
    model = make_mlp(6, 4, 1)
    opt = create(name, model.parameters(), lr=0.05, seed=7, **kw)
    _run(model, opt, 2)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        model2, opt2 = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    _run(model, opt, 3)
    _run(model2, opt2, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_an_optimizer_under_a_scheduler_steps_itself(how):
    """The scheduler's step wrapper (an instance attribute holding the original) was copied:
    the copy's step() stepped the original's parameters, and pickle refused the wrapper."""
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.05, momentum=0.9, seed=7)
    torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    _run(model, opt, 1)
    model2, opt2 = (copy.deepcopy((model, opt)) if how == "deepcopy"
                    else pickle.loads(pickle.dumps((model, opt))))
    before = snapshot(model)
    _run(model2, opt2, 2)
    assert max_moved(model, before) == 0.0 and opt.step_count == 1 and opt2.step_count == 3
    _run(model, opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("kw,error,needle", [
    # int(seed) truncated 1.5 to the seed 1 and said "invalid literal for int()" for a string;
    # bool(conserve) turned conserve on for "False"; a model= that is no module was ignored
    (dict(seed=1.5), TypeError, r"seed=1.5 must be an int in \[0, 2\*\*63\)"),
    (dict(seed="7"), TypeError, "seed='7' must be an int"),
    (dict(seed=float("nan")), TypeError, "seed=nan must be an int"),
    (dict(seed=True), TypeError, "seed=True must be an int"),
    (dict(conserve="False"), ValueError, "conserve='False' must be True or False"),
    (dict(model="net"), TypeError, "model= must be the nn.Module the closure runs")])
def test_optimizer_wide_arguments_of_the_wrong_type_are_refused_by_name(kw, error, needle):
    with pytest.raises(error, match=needle):
        ZOFusedSGD(make_mlp(6, 4, 1).parameters(), **kw)


def test_seeds_of_integer_types_are_still_taken():
    import numpy as np
    ps = list(make_mlp(6, 4, 1).parameters())
    assert [ZOFusedSGD(ps, seed=s).seed for s in (5, np.int64(5), torch.tensor(5))] == [5, 5, 5]


def test_a_param_group_without_params_and_a_bad_mask_epoch_are_named():
    model, opt = two_groups(ZOFusedSGD)
    with pytest.raises(ValueError, match="param_group has no 'params' entry \\(it has lr\\)"):   # KeyError: 'params'
        opt.add_param_group({"lr": 0.1})
    assert len(opt.param_groups) == 2
    for k in (1.5, "2", -1):         # int(1.5) set epoch 1; "2" raised "'<' not supported"
        with pytest.raises(ValueError, match="set_mask_epoch\\(k\\): the mask epoch k is"):
            opt.set_mask_epoch(k)
    assert opt._task == 0


def test_a_set_of_parameters_is_refused_as_torch_optim_does():
    # list(a set) hid the set from torch.optim's check: the order, and so each tensor's z, varied
    with pytest.raises(TypeError, match=r"param_group\['params'\] is a set"):
        ZOFusedSGD([{"params": set(make_mlp(6, 4, 1).parameters())}])


def test_a_state_of_another_class_is_named_as_such():
    model = make_mlp(6, 4, 1)
    fo = create("fo_sgd", model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="saved by FOSGD; this is a ZOFusedSGD"):     # said "stream None"
        ZOFusedSGD(model.parameters(), lr=0.1).load_state_dict(fo.state_dict())


def test_a_group_added_to_a_hybrid_is_trained_in_both_phases():
    """HybridFOZO took the group into its own param_groups only: never trained, no error."""
    model = make_mlp(6, 4, 1)
    hyb = create("zo_sgd", model[0].parameters(), hybrid_switch=2, lr=0.01, fo_lr=0.1, seed=3)
    with pytest.raises(ValueError, match="takes params, lr and zo_lr_scale, not momentum"):
        hyb.add_param_group({"params": model[2].parameters(), "momentum": 0.9})
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        hyb.add_param_group({"params": list(model[0].parameters())})
    assert [len(o.param_groups) for o in (hyb, hyb.fo, hyb.zo)] == [1, 1, 1]      # nothing half-added
    hyb.add_param_group({"params": model[2].parameters(), "lr": 0.2})
    assert [len(o.param_groups) for o in (hyb, hyb.fo, hyb.zo)] == [2, 2, 2]
    assert hyb.fo.param_groups[1]["lr"] == 0.2
    assert hyb.param_groups[1]["zo_lr_scale"] == hyb.param_groups[0]["zo_lr_scale"]
    for phase in ("fo", "zo"):
        assert hyb.zeroth_order == (phase == "zo")
        before = [p.detach().clone() for p in model[2].parameters()]
        _run(model, hyb, 2)
        assert all(not torch.equal(a, b) for a, b in zip(before, model[2].parameters())), phase


@pytest.mark.parametrize("name", ["zo_sgd", "zo_adam"])
def test_a_hybrid_over_named_parameters_adds_named_groups_and_trains_them(name):
    """create(..., model.named_parameters(), hybrid_switch=...) named the ZO optimizer's groups
    and neither the FO twin's nor the hybrid's: torch.optim refused every add_param_group (named
    or not) as mixing groups with and without names. A frozen named parameter of an added group
    stayed in the FO and hybrid groups (the ZO one drops it), and every later step refused the
    groups as not the hybrid's optimizers'."""
    model = make_mlp(6, 4, 1)
    model[2].bias.requires_grad_(False)
    hyb = create(name, model[0].named_parameters(), hybrid_switch=2, lr=0.01, fo_lr=0.1, seed=3)
    assert [o.param_groups[0]["param_names"] for o in (hyb, hyb.fo, hyb.zo)] == [["weight", "bias"]] * 3
    with pytest.raises(ValueError, match=r"give the new group's as \(name, tensor\) pairs"):
        hyb.add_param_group({"params": list(model[2].parameters())})
    assert [len(o.param_groups) for o in (hyb, hyb.fo, hyb.zo)] == [1, 1, 1]      # nothing half-added
    hyb.add_param_group({"params": [("2." + k, p) for k, p in model[2].named_parameters()], "lr": 0.2})
    assert [o.param_groups[1]["param_names"] for o in (hyb, hyb.fo, hyb.zo)] == [["2.weight"]] * 3
    frozen = model[2].bias.detach().clone()
    for phase in ("fo", "zo"):
        assert hyb.zeroth_order == (phase == "zo")
        before = model[2].weight.detach().clone()
        _run(model, hyb, 2)
        assert not torch.equal(before, model[2].weight), phase
    assert torch.equal(frozen, model[2].bias)
    state = copy.deepcopy(hyb.state_dict())
    assert [g["param_names"] for g in state["param_groups"]] == [["weight", "bias"], ["2.weight"]]
    with pytest.raises(ValueError, match="give every parameter of the group as a \\(name, tensor\\) pair, or none"):
        hyb.add_param_group({"params": [("w", torch.nn.Parameter(torch.zeros(1))), torch.nn.Parameter(torch.zeros(1))]})
    model[2].weight.requires_grad_(False)
    frozen_head = torch.nn.Linear(4, 1).requires_grad_(False)
    hyb.add_param_group({"params": list(frozen_head.named_parameters())})     # named, empty once filtered
    assert [o.param_groups[2]["param_names"] for o in (hyb, hyb.fo, hyb.zo)] == [[]] * 3
    _run(model, hyb, 1)


@pytest.mark.parametrize("key,value,needle", [
    ("lr", -0.1, "lr=-0.1 must be >= 0 and finite"), ("lr", float("nan"), "lr=nan must be >= 0"),
    ("lr", None, "lr=None is not a real number"), ("zo_lr_scale", float("nan"), "zo_lr_scale=nan must be >= 0")])
@pytest.mark.parametrize("switch", [0, 1])
def test_a_bad_rate_set_in_a_hybrid_group_between_steps_is_refused_before_anything_moves(key, value, needle, switch):
    """The FO phase pushed any lr into torch.optim's optimizer, which does not check it at a step:
    lr -0.1 ascended, nan wrote nan into every parameter, None raised a TypeError; a nan
    zo_lr_scale surfaced at the switch only, named as the ZO optimizer's 'lr=nan'."""
    model = make_mlp(6, 4, 1)
    hyb = create("zo_adam", model.parameters(), hybrid_switch=2, lr=0.01, fo_lr=0.1, seed=3)
    _run(model, hyb, switch)
    before, counts = snapshot(model), (hyb.zo.step_count, hyb.fo.steps)
    hyb.param_groups[0][key] = value
    with pytest.raises(ValueError, match="HybridFOZO param group 0: " + re.escape(needle)):
        _run(model, hyb, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert (hyb.zo.step_count, hyb.fo.steps, hyb.zeroth_order) == (*counts, False)


@pytest.mark.parametrize("group,needle", [
    # float() said "could not convert string to float: 'x'"; a negative scale was named as the ZO
    # optimizer's lr; a group without params raised KeyError: 'params'
    ({"lr": "x"}, "lr='x' is not a real number"), ({"lr": None}, "lr=None is not a real number"),
    ({"zo_lr_scale": "x"}, "zo_lr_scale='x' is not a real number"),
    ({"zo_lr_scale": -1.0}, "zo_lr_scale=-1.0 must be >= 0"),
    ({"lr": float("inf")}, "lr=inf must be >= 0 and finite"),
    ({"zo_lr_scale": float("inf")}, "zo_lr_scale=inf must be >= 0 and finite"),
    ({"initial_lr": "x"}, "initial_lr='x' is not a real number"), ({"max_lr": -1.0}, "max_lr=-1.0 must be >= 0"),
    ({"momentum": 0.9}, "takes params, lr and zo_lr_scale, not momentum: .* the lr schedulers' initial_lr, max_lr"),
    ({"params": None, "lr": 0.1}, None)])
def test_a_bad_group_added_to_a_hybrid_is_named_and_adds_nothing(group, needle):
    model = make_mlp(6, 4, 1)
    hyb = create("zo_sgd", model[0].parameters(), hybrid_switch=2, lr=0.01, fo_lr=0.1, seed=3)
    if needle is None:
        group, needle = {"lr": 0.1}, "param_group has no 'params' entry"
    else:
        group = {"params": list(model[2].parameters()), **group}
    with pytest.raises(ValueError, match=needle):
        hyb.add_param_group(group)
    assert [len(o.param_groups) for o in (hyb, hyb.fo, hyb.zo)] == [1, 1, 1]


def test_a_group_added_to_a_scheduled_hybrid_with_its_initial_lr_resumes_the_scheduler():
    """torch's lr schedulers resumed with last_epoch >= 0 need initial_lr in every group, so a
    user gives a group added under a scheduler its own: the plain ZO optimizers take it, the
    hybrid refused it ("takes params, lr and zo_lr_scale"). The hybrid's group keeps it; the
    inner optimizers' groups get the lr the hybrid pushes at each step."""
    def build():
        model = make_mlp(6, 4, 1)
        return model, create("zo_sgd", model[0].parameters(), hybrid_switch=2, lr=0.01, fo_lr=0.1, seed=3)

    model, hyb = build()
    sched = torch.optim.lr_scheduler.StepLR(hyb, 1, gamma=0.5)
    _run(model, hyb, 1)
    sched.step()
    hyb.add_param_group({"params": model[2].parameters(), "lr": 0.2, "initial_lr": 0.2})
    assert hyb.param_groups[1]["initial_lr"] == 0.2
    assert all("initial_lr" not in g for o in (hyb.fo, hyb.zo) for g in o.param_groups)
    for _ in range(2):          # through the switch
        _run(model, hyb, 1)
        sched.step()
    model2, hyb2 = build()
    hyb2.add_param_group({"params": model2[2].parameters(), "lr": 0.2, "initial_lr": 0.2})
    hyb2.load_state_dict(hyb.state_dict())
    torch.optim.lr_scheduler.StepLR(hyb2, 1, gamma=0.5, last_epoch=sched.last_epoch)    # raised KeyError before
    sched.step()
    assert [g["lr"] for g in hyb2.param_groups] == [g["lr"] for g in hyb.param_groups] == [0.1 / 16, 0.2 / 8]
    _run(model2, hyb2, 1)
    assert hyb2.zeroth_order and [g["lr"] for g in hyb2.zo.param_groups] == [
        g["lr"] * g["zo_lr_scale"] for g in hyb2.param_groups]


@pytest.mark.parametrize("edit,needle", [
    (lambda g: g.pop("zo_lr_scale"), "param group 0 lacks zo_lr_scale"),
    (lambda g: g.update(lr="x"), "param group 0: lr='x' is not a real number"),
    (lambda g: g.update(zo_lr_scale=float("nan")), "param group 0: zo_lr_scale=nan must be >= 0"),
    (lambda g: g.update(zo_lr_scale=float("inf")), "param group 0: zo_lr_scale=inf must be >= 0 and finite"),
    # torch.optim's "doesn't match the size of optimizer's group", naming neither optimizer
    (lambda g: g.update(params=g["params"][:1]), "state_dict param group 0 does not list the 4 parameters of this "
                                                 "HybridFOZO's group")])
def test_a_hybrid_state_with_a_bad_group_of_its_own_is_refused_before_it_loads(edit, needle):
    # loaded: the FO phase then stepped with lr 'x' (TypeError), the ZO phase raised KeyError
    # 'zo_lr_scale' at the switch, or ran at lr nan
    model = make_mlp(6, 4, 1)
    hyb = create("zo_sgd", model.parameters(), hybrid_switch=1, lr=0.01, fo_lr=0.1, seed=3)
    _run(model, hyb, 1)
    state = copy.deepcopy(hyb.state_dict())
    bad = copy.deepcopy(state)
    edit(bad["param_groups"][0])
    with pytest.raises(ValueError, match=needle):
        hyb.load_state_dict(bad)
    assert hyb.state_dict()["param_groups"] == state["param_groups"]
    _run(model, hyb, 2)


@pytest.mark.parametrize("groups", [None, 5, "params"])
def test_a_hybrid_state_whose_param_groups_is_no_list_is_refused_by_name(groups):
    # len(None) raised a bare TypeError; a string's characters were taken for groups
    model = make_mlp(6, 4, 1)
    hyb = create("zo_sgd", model.parameters(), hybrid_switch=1, lr=0.01, fo_lr=0.1, seed=3)
    _run(model, hyb, 1)
    state = copy.deepcopy(hyb.state_dict())
    bad = dict(copy.deepcopy(state), param_groups=groups)
    with pytest.raises(ValueError, match="state_dict's param_groups must be a list of dicts; was it saved by a "
                                         "HybridFOZO\\?"):
        hyb.load_state_dict(bad)
    assert hyb.state_dict()["param_groups"] == state["param_groups"]


def test_a_hybrid_over_no_optimizer_or_a_nan_fo_lr_is_refused():
    ps = list(make_mlp(6, 4, 1).parameters())
    with pytest.raises(TypeError, match="HybridFOZO\\(fo=...\\) must be a torch.optim.Optimizer, got str"):
        HybridFOZO("sgd", ZOFusedSGD(ps), 1)
    with pytest.raises(TypeError, match="HybridFOZO\\(zo=...\\) must be a torch.optim.Optimizer, got NoneType"):
        HybridFOZO(torch.optim.SGD(ps, lr=0.1), None, 1)
    with pytest.raises(ValueError, match="the FO optimizer's lr=nan must be >= 0"):
        HybridFOZO(torch.optim.SGD(ps, lr=float("nan")), ZOFusedSGD(ps), 1)


@pytest.mark.parametrize("cls,key,needle", [
    (ZOFusedSGD, "maximize", "maximize=True: zeroflow's optimizers minimize"),
    (ZOFusedAdam, "maximize", "maximize=True: zeroflow's optimizers minimize"),
    (ZOFusedAdam, "amsgrad", "amsgrad=True: ZOFusedAdam has no AMSGrad variant")])
def test_torch_optim_options_a_group_carries_unread_are_refused(cls, key, needle):
    """torch.optim keeps any key of a group dict: {"params": ..., "maximize": True} (or Adam's
    amsgrad) copied from a torch.optim configuration was carried and never read, and the step
    minimized (plain Adam) without a word; refused in a group, and when set between steps."""
    model = make_mlp(6, 4, 1)
    ps = list(model.parameters())
    with pytest.raises(ValueError, match=needle):
        cls([{"params": ps, key: True}], lr=0.1)
    opt = cls([{"params": ps, key: False}], lr=0.1, seed=3)     # False: what the optimizer does
    _run(model, opt, 1)
    opt.param_groups[0][key] = True
    before = snapshot(model)
    with pytest.raises(ValueError, match="param group 0: " + needle):
        _run(model, opt, 1)
    assert max_moved(model, before) == 0.0 and opt.step_count == 1


def test_a_hybrid_over_a_partly_frozen_model_names_the_frozen_parameters():
    """The ZO optimizer leaves frozen parameters out of its groups and torch.optim's keeps them:
    a hybrid built over model.parameters() of a partly frozen model was refused as optimizing
    other parameters, with no word of why."""
    model = make_mlp(6, 4, 1)
    model[0].requires_grad_(False)
    ps = list(model.parameters())
    with pytest.raises(ValueError, match=r"the fo optimizer holds 2 parameter\(s\) with requires_grad=False"):
        HybridFOZO(torch.optim.SGD(ps, lr=0.1), ZOFusedSGD(ps, lr=0.1), 1)
    trainable = [p for p in ps if p.requires_grad]
    HybridFOZO(torch.optim.SGD(trainable, lr=0.1), ZOFusedSGD(ps, lr=0.1), 1)


def test_a_hybrid_switch_is_a_count_not_a_flag():
    """hybrid_switch=True (read as "hybrid on") was taken as 1 FO step without a word, and
    numpy's int64 (a sweep's value) was refused as no int."""
    import numpy as np
    ps = list(make_mlp(6, 4, 1).parameters())
    with pytest.raises(ValueError, match=r"hybrid_switch \(the number of FO steps before ZO; 0/None = off\) is True"):
        create("zo_sgd", ps, hybrid_switch=True)
    with pytest.raises(ValueError, match=r"hybrid_switch \(the number of FO steps before ZO\) is True"):
        HybridFOZO(torch.optim.SGD(ps, lr=0.1), ZOFusedSGD(ps), True)
    assert create("zo_sgd", ps, hybrid_switch=np.int64(2)).switch == 2
    assert type(create("zo_sgd", ps, hybrid_switch=False)) is ZOFusedSGD      # off, as 0 and None


def test_numpy_and_torch_false_turn_the_hybrid_off_as_python_false_does():
    # numpy.bool_(False) (a sweep's flag column) was refused as no int, where Python's False is
    # off; their True stays refused as Python's is (it ran 1 FO step)
    import numpy as np
    ps = list(make_mlp(6, 4, 1).parameters())
    for off in (np.bool_(False), torch.tensor(False)):
        assert type(create("zo_sgd", ps, hybrid_switch=off)) is ZOFusedSGD
    for on in (np.bool_(True), torch.tensor(True), torch.tensor([False, False]), np.array([False, False])):
        with pytest.raises(ValueError, match=r"hybrid_switch \(the number of FO steps before ZO; 0/None = off\) is "):
            create("zo_sgd", ps, hybrid_switch=on)
    # one element, whatever the shape: a [1] or [1, 1] array of False is off too; an empty one is
    # no False (and `not` of it is ambiguous), refused as no count
    for off in (np.array([False]), torch.tensor([[False]])):
        assert type(create("zo_sgd", ps, hybrid_switch=off)) is ZOFusedSGD
    for empty in (np.array([], dtype=bool), torch.tensor([], dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"hybrid_switch \(the number of FO steps before ZO; 0/None = off\) is "):
            create("zo_sgd", ps, hybrid_switch=empty)


def test_a_hybrid_switch_array_of_falses_is_one_element_only_when_every_dimension_is_1():
    # the elements are counted over the whole shape: a [1, 2] array of False holds two (its first
    # dimension, 1, is no count of them), refused as no count as a [2] array is, not an error of
    # numpy's or torch's ("truth value ... is ambiguous")
    import numpy as np
    ps = list(make_mlp(6, 4, 1).parameters())
    for two in (np.array([[False, False]]), torch.tensor([[False, False]])):
        with pytest.raises(ValueError, match=r"hybrid_switch \(the number of FO steps before ZO; 0/None = off\) is "):
            create("zo_sgd", ps, hybrid_switch=two)


@pytest.mark.parametrize("value", [0.0, "", [], "0"])
def test_a_falsy_hybrid_switch_that_is_no_count_is_refused_not_taken_as_off(value):
    # only None, 0 and a False (Python's, numpy's, torch's) turn the hybrid off: a float 0.0 or an
    # empty string from a config is no count of FO steps, and is named as 1.5 or "2" would be
    ps = list(make_mlp(6, 4, 1).parameters())
    with pytest.raises(ValueError, match=r"hybrid_switch \(the number of FO steps before ZO; 0/None = off\) is "):
        create("zo_sgd", ps, hybrid_switch=value)


@pytest.mark.parametrize("zo", [torch.optim.SGD, torch.optim.Adam])
def test_a_hybrid_whose_zo_phase_is_first_order_is_refused(zo):
    # the ZO phase runs the closure without backward: a torch.optim optimizer there found no
    # .grad and trained nothing after the switch, silently (and forward_passes raised AttributeError)
    ps = list(make_mlp(6, 4, 1).parameters())
    with pytest.raises(TypeError, match=f"HybridFOZO\\(zo=...\\) must be a zeroth-order optimizer "
                                        f"\\(ZOFusedSGD, ZOFusedAdam\\), got {zo.__name__}"):
        HybridFOZO(torch.optim.SGD(ps, lr=0.1), zo(ps, lr=0.1), 1)


def test_a_hybrid_over_a_torch_optim_fo_optimizer_counts_and_resumes():
    # the constructor takes any torch.optim optimizer as fo, but forward_passes and
    # load_state_dict asked it for zeroflow's counter and check: AttributeError ('SGD' object
    # has no attribute 'forward_passes' / 'check_state_dict')
    model = make_mlp(6, 4, 1)
    ps = list(model.parameters())
    hyb = HybridFOZO(torch.optim.SGD(ps, lr=0.1), ZOFusedSGD(ps, lr=0.01, seed=3), 2)
    _run(model, hyb, 3)
    assert hyb.forward_passes == 2 + hyb.zo.forward_passes == 4     # 2 FO steps, 1 ZO step of q=1 (2 passes)
    state = copy.deepcopy(hyb.state_dict())
    model2 = copy.deepcopy(model)
    ps2 = list(model2.parameters())
    hyb2 = HybridFOZO(torch.optim.SGD(ps2, lr=0.1), ZOFusedSGD(ps2, lr=0.01, seed=3), 2)
    hyb2.load_state_dict(state)
    assert hyb2.forward_passes == hyb.forward_passes
    _run(model, hyb, 1)
    _run(model2, hyb2, 1)
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2))
    bad = copy.deepcopy(state)
    bad["hybrid"]["fo"]["param_groups"][0]["params"].pop()
    with pytest.raises(ValueError, match="'hybrid' 'fo' state: param group 0 has 3 parameters, the SGD's 4"):
        hyb2.load_state_dict(bad)
    assert hyb2.state_dict()["hybrid"]["steps"] == 4


def test_a_hybrid_over_a_torch_optim_fo_optimizer_counts_the_fo_steps_taken():
    # docs/algorithms.md §4: forward_passes = FO steps + ZO forwards, one forward counted per
    # step of a torch.optim fo. In the FO phase that is the steps taken so far (not the
    # scheduled switch), and start_zo() in the ZO phase (e.g. called at every task boundary)
    # keeps the switch where it was: moving it to the steps taken counted ZO steps as FO ones
    model = make_mlp(6, 4, 1)
    ps = list(model.parameters())
    hyb = HybridFOZO(torch.optim.SGD(ps, lr=0.1), ZOFusedSGD(ps, lr=0.01, seed=3), 2)
    _run(model, hyb, 1)
    assert hyb.forward_passes == 1
    _run(model, hyb, 2)                 # the second FO step, one ZO step of q=1 (2 passes)
    assert hyb.zeroth_order and hyb.forward_passes == 2 + 2
    hyb.start_zo()
    assert hyb.switch == 2 and hyb.forward_passes == 4


def _torch_sgd_hybrid(ps):
    return HybridFOZO(torch.optim.SGD(ps, lr=0.1, momentum=0.9), ZOFusedSGD(ps, lr=0.01, seed=3), 3)


@pytest.mark.parametrize("build,needle", [
    (lambda ps: create("fo_sgd", ps, lr=0.1, momentum=0.9), "state_dict's momentum_buffer of parameter 0 has shape"),
    (lambda ps: create("fo_adam", ps, lr=0.1), "state_dict's exp_avg of parameter 0 has shape"),
    (lambda ps: create("zo_sgd", ps, lr=0.1, momentum=0.9, hybrid_switch=3),
     "state_dict's momentum_buffer of parameter 0 has shape"),
    (lambda ps: create("zo_adam", ps, lr=0.1, hybrid_switch=3), "state_dict's exp_avg of parameter 0 has shape"),
    (_torch_sgd_hybrid, "'hybrid' 'fo' state's momentum_buffer of parameter 0 has shape")])
def test_a_first_order_state_of_another_model_is_refused_before_anything_loads(build, needle):
    """The FO optimizers' check (and a hybrid's check of its FO phase's state, where the ZO
    state holds no buffer yet) took buffers of another model's shapes: torch.optim loaded them,
    replacing the state, options and (hybrid) counters, and the next step failed on a size."""
    other, model = make_mlp(6, 3, 1), make_mlp(6, 4, 1)
    saved = build(list(other.parameters()))
    _run(other, saved, 2)
    opt = build(list(model.parameters()))
    _run(model, opt, 1)
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=re.escape(needle) + r" \(3, 6\), the parameter \(4, 6\)"):
        opt.load_state_dict(saved.state_dict())
    assert str(opt.state_dict()) == str(state)      # nothing loaded
    _run(model, opt, 1)


@pytest.mark.parametrize("fo", [
    lambda ps: torch.optim.NAdam(ps, lr=0.01),          # mu_product: a 0-dim tensor
    lambda ps: torch.optim.ASGD(ps, lr=0.01),           # eta, mu: 0-dim tensors
    lambda ps: torch.optim.Adafactor(ps, lr=0.01),      # row_var (4, 1), col_var (1, 6): factored
    lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True)])      # the step count: a tensor too
def test_a_hybrid_loads_its_own_state_whatever_tensors_its_torch_optim_fo_phase_keeps(fo):
    """The buffer-shape check of a torch.optim FO state took every tensor but 'step' as a
    parameter-shaped buffer: a hybrid over NAdam, ASGD or Adafactor refused its own state_dict
    ("mu_product of parameter 0 has shape (), the parameter (4, 6)")."""
    model, fresh = make_mlp(6, 4, 1), make_mlp(6, 4, 1)
    saved = HybridFOZO(fo(list(model.parameters())), ZOFusedSGD(model.parameters(), lr=0.01, seed=3), 3)
    _run(model, saved, 2)
    hyb = HybridFOZO(fo(list(fresh.parameters())), ZOFusedSGD(fresh.parameters(), lr=0.01, seed=3), 3)
    fresh.load_state_dict(model.state_dict())
    hyb.load_state_dict(copy.deepcopy(saved.state_dict()))     # torch.optim's load shares the buffers
    _run(model, saved, 2)
    _run(fresh, hyb, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


@pytest.mark.parametrize("edit,needle", [
    (lambda fo: fo.pop("state"), "'hybrid' 'fo' state is not an optimizer state_dict"),
    (lambda fo: fo["param_groups"].append(dict(fo["param_groups"][0], params=[])),
     "'hybrid' 'fo' state has 2 param groups, the SGD 1"),
    (lambda fo: fo["state"].update({99: {"momentum_buffer": torch.zeros(1)}}),
     "state holds parameter id\\(s\\) 99 that no param group lists"),
    (lambda fo: fo["param_groups"][0]["params"].__setitem__(1, 0), "list parameter id 0 more than once")])
def test_a_hybrid_refuses_a_bad_torch_optim_fo_state_before_anything_loads(edit, needle):
    # HybridFOZO.load_state_dict checks both inner states before it loads anything (its
    # docstring, docs/algorithms.md §7): a torch.optim fo's saved state is checked by the
    # layout check zeroflow's own optimizers use. torch.optim's load took a state for an id no
    # group lists (kept it as junk), and raised KeyError / its own ValueError only after the
    # hybrid's groups, steps and switch were loaded
    model = make_mlp(6, 4, 1)
    ps = list(model.parameters())
    hyb = HybridFOZO(torch.optim.SGD(ps, lr=0.1, momentum=0.9), ZOFusedSGD(ps, lr=0.01, seed=3), 3)
    _run(model, hyb, 1)
    bad = copy.deepcopy(hyb.state_dict())
    edit(bad["hybrid"]["fo"])
    _run(model, hyb, 1)
    before = copy.deepcopy(hyb.state_dict())
    with pytest.raises(ValueError, match=needle):
        hyb.load_state_dict(bad)
    after = hyb.state_dict()
    assert after["hybrid"]["steps"] == 2 and after["param_groups"] == before["param_groups"]
    assert sorted(after["hybrid"]["fo"]["state"]) == sorted(before["hybrid"]["fo"]["state"]) == [0, 1, 2, 3]
    assert all(torch.equal(after["hybrid"]["fo"]["state"][i]["momentum_buffer"],
                           before["hybrid"]["fo"]["state"][i]["momentum_buffer"]) for i in range(4))


def test_a_copy_does_not_take_the_originals_hooks():
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.05)
    seen = []
    opt.step_hook = lambda o, info: seen.append(info["step"])
    model2, opt2 = copy.deepcopy((model, opt))
    opt2.step(lambda: loss_of(model2))
    assert seen == [] and opt2.step_hook is None


@pytest.mark.parametrize("cls", [ZOFusedSGD, ZOFusedAdam])
@pytest.mark.parametrize("how", ["load_state_dict", "deepcopy"])
def test_a_group_added_after_a_resume_or_a_copy_has_only_the_optimizers_options(cls, how):
    """torch.optim's __setstate__ (run by its load_state_dict and by every copy) adds
    ``differentiable`` to ``defaults``, and add_param_group then gave a group added after a
    resume (a new task's head) that option too: the next resume refused the saved state ("it
    has differentiable (a state of another optimizer class?)")."""
    model = make_mlp(6, 4, 1)
    body, head = list(model[0].parameters()), list(model[2].parameters())
    opt = cls(body, lr=0.05, seed=3)
    opt.step(lambda: loss_of(model))
    if how == "deepcopy":
        model, opt = copy.deepcopy((model, opt))
        body, head = list(model[0].parameters()), list(model[2].parameters())
    else:
        opt.load_state_dict(opt.state_dict())
    opt.add_param_group({"params": head})
    assert set(opt.param_groups[1]) == set(opt.param_groups[0])
    resumed = cls(body, lr=0.05, seed=3)
    resumed.add_param_group({"params": head})
    resumed.load_state_dict(opt.state_dict())


def test_a_group_added_to_a_hybrid_after_a_resume_has_only_the_hybrids_keys():
    """As for the ZO optimizers: torch.optim's __setstate__ put ``differentiable`` into the
    hybrid's defaults, and a group added after a resume carried it (in repr and state_dict),
    although the hybrid's groups take only params, lr and zo_lr_scale."""
    model = make_mlp(6, 4, 1)
    hyb = create("zo_sgd", model[0].parameters(), hybrid_switch=1, lr=0.01, seed=3)
    hyb.load_state_dict(hyb.state_dict())
    hyb.add_param_group({"params": model[2].parameters()})
    assert set(hyb.param_groups[1]) == {"params", "lr", "zo_lr_scale"}


@pytest.mark.parametrize("cls", [ZOFusedSGD, ZOFusedAdam])
@pytest.mark.parametrize("with_scheduler_at_save", [True, False])
def test_a_state_loads_with_or_without_an_lr_scheduler_attached(cls, with_scheduler_at_save):
    # schedulers write initial_lr into the groups, which the key check took for a state of
    # another optimizer class: the usual resume orders raised
    model = make_mlp(6, 4, 1)
    opt = cls(model.parameters(), lr=0.1, seed=1)
    if with_scheduler_at_save:
        torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    opt.step(lambda: loss_of(model))
    state = opt.state_dict()
    opt2 = cls(make_mlp(6, 4, 1).parameters(), lr=0.1, seed=1)
    if not with_scheduler_at_save:
        torch.optim.lr_scheduler.OneCycleLR(opt2, max_lr=0.2, total_steps=10, cycle_momentum=False)
    opt2.load_state_dict(state)
    assert opt2.step_count == 1


def same(a, b) -> bool:
    """Equal nested states, tensors bit for bit (dict key order aside)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# the part of each class's state_dict that zeroflow adds to torch.optim's
OWN_PART = {"zo_sgd": "zeroflow", "zo_adam": "zeroflow", "fo_adam": "zeroflow", "hybrid": "hybrid"}


def _made(name):
    model = make_mlp(6, 4, 1)
    kw = dict(hybrid_switch=1) if name == "hybrid" else {}
    return model, create("zo_sgd" if name == "hybrid" else name, model.parameters(), lr=0.05, seed=7, **kw)


@pytest.mark.parametrize("name", list(OWN_PART))
def test_state_dict_hooks_see_the_whole_state_as_torch_optim_promises(name):
    # zeroflow's counters (and the hybrid's inner optimizers) were added after torch.optim's
    # hooks had run: a state_dict post-hook saw a state without them, a load post-hook saw the
    # counters of before the load, and a load pre-hook that adapts an old checkpoint (its
    # documented use) never ran, as the zeroflow check refused the dict first
    model, opt = _made(name)
    _run(model, opt, 3)
    part = OWN_PART[name]
    seen = {}
    opt.register_state_dict_post_hook(lambda o, sd: seen.update(saved=part in sd))
    state = opt.state_dict()
    assert seen["saved"] and part in state
    old_format = {k: v for k, v in state.items() if k != part}     # as an older zeroflow wrote it
    _, fresh = _made(name)
    fresh.register_load_state_dict_pre_hook(lambda o, sd: sd | {part: state[part]} if part not in sd else None)
    fresh.register_load_state_dict_post_hook(lambda o: seen.update(loaded=o.state_dict()[part]))
    fresh.load_state_dict(old_format)
    assert same(seen["loaded"], state[part])
    assert same(fresh.state_dict(), state)


@pytest.mark.parametrize("edit,needle", [
    (lambda sd: sd["zeroflow"].update(step="x"), "counter 'step' is 'x'"),
    (lambda sd: sd["zeroflow"].update(seed=-1), "counter 'seed' is -1"),
    (lambda sd: sd["zeroflow"].update(seed=2**64), "below"),
    (lambda sd: sd["zeroflow"].update(task=None), "counter 'task' is None"),
    (lambda sd: sd["zeroflow"].update(tensor_ids=[0, 1, 2]), "tensor_ids must list one id per parameter \\(4\\)"),
    (lambda sd: sd["zeroflow"].update(tensor_ids=[0, 1, 2, 1]), "give one id to two parameters"),
    (lambda sd: sd["zeroflow"].update(tensor_ids=[0, 1, 2, 2**32]), "tensor id is 4294967296"),
    (lambda sd: sd["zeroflow"].update(next_tensor_id=3), "next_tensor_id is 3, not above"),
    # operator.index takes True as 1: a bool passed as a count
    (lambda sd: sd["zeroflow"].update(tensor_ids=[0, 1, 2, True]), "tensor id is True; it must be an int"),
    (lambda sd: sd["zeroflow"].update(step=torch.tensor(True)), "counter 'step' is tensor\\(True\\)"),
    (lambda sd: sd["state"][0].update(momentum_buffer=torch.tensor(0.0)), "momentum_buffer of parameter 0 has shape"),
    (lambda sd: sd["param_groups"][0].update(momentum=-1.0), "param group 0: momentum=-1.0"),
    # loaded, then the next step failed after its forwards (None), or re-initialised every
    # other parameter's momentum (a parameter's entry missing)
    (lambda sd: sd["state"][0].update(momentum_buffer=None), "momentum_buffer of parameter 0 is NoneType"),
    (lambda sd: sd["state"].pop(0), "param group 0: its parameters hold different state entries"),
    # torch.optim's own errors (AttributeError, TypeError) or "the parameter None", naming nothing
    (lambda sd: sd.update(state=[]), "state_dict's state must map parameter ids to dicts of buffers"),
    (lambda sd: sd["state"].update({0: 5}), "state_dict's state of parameter 0 is int, not a dict"),
    (lambda sd: sd.update(param_groups=None), "state_dict's param_groups must be a list of dicts"),
    (lambda sd: sd["state"].update({9: {"momentum_buffer": torch.zeros(3)}}),
     "parameter id\\(s\\) 9 that no param group"),
    (lambda sd: sd["param_groups"][0].update(params=[0, 0, 2, 3]), "list parameter id 0 more than once"),
    # a group whose params is no list: "'NoneType' object is not iterable" from the id scan
    (lambda sd: sd["param_groups"][0].update(params=None), "must be a list of dicts, each with a 'params'"),
    (lambda sd: sd["param_groups"][0].pop("params"), "param_groups must be a list of dicts, each with a 'params'")])
def test_a_bad_state_is_refused_and_leaves_the_optimizer_unchanged(edit, needle):
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.1, momentum=0.9, seed=1)
    opt.step(lambda: loss_of(model))
    state = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(state)
    edit(bad)
    with pytest.raises(ValueError, match=needle):       # half-loaded, or loaded and broke the next step
        opt.load_state_dict(bad)
    now = opt.state_dict()
    assert now["zeroflow"] == state["zeroflow"] and now["param_groups"] == state["param_groups"]
    assert torch.equal(now["state"][0]["momentum_buffer"], state["state"][0]["momentum_buffer"])


@pytest.mark.parametrize("step", [-5, torch.tensor(-5.0), 2.5, torch.tensor(2.5)])
def test_a_saved_adam_step_that_is_no_count_is_refused_at_load(step):
    # loaded, then every later step failed after its forwards ("step=-4 must be >= 1")
    model = make_mlp(6, 4, 1)
    opt = ZOFusedAdam(model.parameters(), lr=0.1, seed=1)
    opt.step(lambda: loss_of(model))
    state = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(state)
    for st in bad["state"].values():
        st["step"] = step
    with pytest.raises(ValueError, match="step of parameter 0 is .*, not a count \\(an int >= 0\\)"):
        opt.load_state_dict(bad)
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())
    good = copy.deepcopy(state)                 # torch.optim.Adam's float tensor count still loads
    for st in good["state"].values():
        st["step"] = torch.tensor(1.0)
    opt.load_state_dict(good)
    opt.step(lambda: loss_of(model))


def test_a_hybrid_with_a_zero_fo_lr_is_refused():
    # the ZO lr is scheduled as a multiple of the FO lr: with fo_lr = 0 the ZO phase ran at lr 0
    with pytest.raises(ValueError, match="FO phase's lr is 0"):
        create("zo_sgd", make_mlp(6, 4, 1).parameters(), hybrid_switch=1, lr=0.1, fo_lr=0.0)


def test_forward_grad_takes_a_head_added_to_the_model_later():
    model = make_mlp(6, 4, 1)
    opt = create("forward_grad", model.parameters(), model=model, lr=0.05, seed=2)
    opt.step(lambda: loss_of(model))
    head = torch.nn.Linear(1, 1)
    model.add_module("head", head)                       # the continual-learning pattern: a new head
    opt.add_param_group({"params": head.parameters()})  # every step raised KeyError(<id>)
    loss = opt.step(lambda: F.mse_loss(head(model[2](model[1](model[0](X)))), Y))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="must be a parameter of model="):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})


def test_numpy_and_tensor_scalars_still_pass_the_option_checks():
    import numpy as np
    model = make_mlp(6, 4, 1)
    opt = ZOFusedAdam(model.parameters(), lr=torch.tensor(0.01), zo_eps=np.float32(1e-2),
                      betas=(np.float32(0.9), 0.99), weight_decay=np.float64(0.0))
    assert torch.isfinite(opt.step(lambda: loss_of(model)))


@pytest.mark.parametrize("cls,kw", [
    (ZOFusedSGD, dict(momentum=0.9, nesterov=True, conserve=True)),
    (ZOFusedAdam, dict(conserve=True)), (ZOFusedAdam, dict(estimator="one_side", q=4))])
@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_options_given_as_float32_scalars_train_as_their_float_values(cls, kw, kind):
    # The optimizer's own scalar math (c_j = d_j / (zo_eps q), the conserve moves' lr and
    # bias corrections) is float64 from the options' values (kernel-ops.md "Scalars"). A 0-d
    # float32 tensor or a numpy float32 option made it float32 arithmetic: 29 % of the
    # coefficients and every conserve move differed from the same values given as floats.
    import numpy as np
    as_f32 = (lambda v: torch.tensor(v, dtype=torch.float32)) if kind == "tensor" else np.float32
    opts = (dict(lr=0.05, zo_eps=1e-2, momentum=0.9, weight_decay=0.1) if cls is ZOFusedSGD
            else dict(lr=0.01, zo_eps=1e-2, betas=(0.9, 0.99), eps=1e-6))
    runs = []
    for wrap in (as_f32, lambda v: float(as_f32(v))):
        torch.manual_seed(0)
        model = make_mlp(6, 4, 1)
        given = {k: (tuple(wrap(x) for x in v) if isinstance(v, tuple) else wrap(v)) for k, v in opts.items()}
        opt = cls(model.parameters(), seed=3, **given, **{k: v for k, v in kw.items() if k not in opts})
        for _ in range(6):   # a float64 loss: d_j with a full mantissa, so c_j's rounding shows
            opt.step(lambda: loss_of(model).double().exp())
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_hybrid_fo_step_without_grads_warns_once_that_it_moved_nothing():
    # opt.step(lambda: loss), the ZO pattern, given to a hybrid: its whole FO phase trained
    # nothing (torch.optim skips parameters without .grad), without a word
    model = make_mlp(6, 4, 1)
    opt = create("zo_sgd", model.parameters(), lr=0.05, fo_lr=0.05, hybrid_switch=3, seed=1)
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match=r"HybridFOZO: first-order step 0 \(of the FO phase's 3\) found no "
                                            r"\.grad and moved nothing.*loss\.backward\(\)") as w:
        opt.step(lambda: loss_of(model))
        opt.step(lambda: loss_of(model))
    assert len([x for x in w if "found no .grad" in str(x.message)]) == 1 and max_moved(model, before) == 0.0
    with warnings.catch_warnings():                   # the convention: train_step, or a closure with backward
        warnings.simplefilter("error")
        fresh = make_mlp(6, 4, 1)
        hybrid = create("zo_sgd", fresh.parameters(), lr=0.05, fo_lr=0.05, hybrid_switch=2, seed=1)
        for _ in range(4):
            train_step(hybrid, lambda: loss_of(fresh))


def test_a_closure_taking_input_derivatives_is_told_how_and_then_steps():
    """A loss with torch.autograd.grad with respect to the inputs (a PINN residual) fails under the
    step's no_grad with autograd's words for backward(); the error said only "must not call
    backward()", which the closure never did, and not how such a loss can run."""
    model = make_mlp(1, 8, 1)
    xs = torch.linspace(0, 1, 16)[:, None]
    opt = ZOFusedSGD(model.parameters(), lr=0.01, seed=3)

    def residual():
        x = xs.clone().requires_grad_(True)
        du = torch.autograd.grad(model(x).sum(), x, create_graph=True)[0]
        return ((du - 1.0) ** 2).mean()

    with pytest.raises(RuntimeError, match="torch.autograd.grad: a PINN residual.*inside `with torch.enable_grad"):
        opt.step(residual)

    def as_told():
        with torch.enable_grad():
            return residual().detach()

    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(as_told)
    assert max_moved(model, before) > 0


def test_a_closure_returning_a_loss_with_a_graph_is_warned_once():
    # A closure that enables grad inside the step's no_grad (Lightning style) and calls
    # backward ran silently: activations kept for a graph, .grad filled 2q times per step.
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.05, seed=1)

    def lightning_style():
        with torch.enable_grad():
            loss = loss_of(model)
            loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="the closure returned a loss with an autograd graph") as w:
        opt.step(lightning_style)
        opt.step(lightning_style)
    assert len([x for x in w if "autograd graph" in str(x.message)]) == 1
    with warnings.catch_warnings():                   # a plain forward closure is not warned
        warnings.simplefilter("error")
        ZOFusedSGD(model.parameters(), lr=0.05, seed=1).step(lambda: loss_of(model))


@pytest.mark.parametrize("cls,kw", [(ZOFusedSGD, dict(momentum=0.9, history=0.5)), (ZOFusedAdam, {})])
def test_state_made_under_inference_mode_serves_the_steps_after_it(cls, kw):
    # ZO training loops often run under torch.inference_mode(); the buffers a first step made
    # there were inference tensors, and the first step outside it failed in its update, after
    # its forwards ("Inplace update to inference tensor outside InferenceMode")
    runs = []
    for inference in (True, False):
        model = make_mlp(6, 4, 1)
        opt = cls(model.parameters(), lr=0.01, seed=2, **kw)
        with torch.inference_mode(inference):
            opt.step(lambda: loss_of(model))
        opt.step(lambda: loss_of(model))
        assert not any(t.is_inference() for st in opt.state.values() for t in st.values()
                       if isinstance(t, torch.Tensor))
        runs.append(snapshot(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_closure_return_values_are_taken_or_refused_by_name():
    import numpy as np
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.01, seed=2)
    # a numpy real is a loss value like a float (np.float32 was refused as "it returned float32")
    assert torch.isfinite(opt.step(lambda: np.float32(loss_of(model).item())))
    with pytest.raises(TypeError, match="real scalar loss; at theta .* it returned a torch.complex64 tensor"):
        opt.step(lambda: loss_of(model).to(torch.complex64))        # was float()'s bare "not 'complex'"
    with pytest.raises(TypeError, match="it returned an object of type builtins.str"):
        opt.step(lambda: "0.5")
    fg = ZOFusedSGD(model.parameters(), lr=0.01, seed=2, estimator="forward_grad", model=model)
    with pytest.raises(TypeError, match=r"forward_grad: the closure must return the loss as a tensor .* \(it "
                                        r"returned float\).*not loss\.item\(\)"):
        fg.step(lambda: loss_of(model).item())                      # was functorch's "return only tensors"


# ------------------------------------------------------------------ ^C between kernel calls
def _interrupting_after(k, monkeypatch):
    """call_op that sends this process a SIGINT right after its k-th call returns: a ^C that
    lands between a kernel and the step's note of what it wrote (KeyboardInterrupt comes at
    the next bytecode, wherever Python is then)."""
    import os
    import signal

    import zfkernels
    real, calls = zfkernels.call_op, [0]

    def call_op(*a, **kw):
        out = real(*a, **kw)
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGINT)
        return out
    monkeypatch.setattr(zfkernels, "call_op", call_op)
    return calls


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler, whatever the process inherited: a test run started as a
    background job (``cmd &`` in a script) inherits SIGINT ignored, and Python then installs
    no handler, so the ^C below was dropped and these tests failed (seen 2026-12-01)."""
    import signal
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("cls,kw", [(ZOFusedSGD, dict(momentum=0.9)), (ZOFusedAdam, dict(conserve=True)),
                                    (ZOFusedSGD, dict(q=2, conserve=True))])
def test_a_ctrl_c_after_any_kernel_call_leaves_theta_at_a_step_boundary(cls, kw, monkeypatch, ctrl_c_raises):
    # before: a ^C right after a kernel returned left theta at theta0 + update + eps z (the
    # restore was taken back twice) or conserve at theta0 +- 2 Delta
    def fresh():
        model = make_mlp(6, 4, 1)
        return model, cls([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                          lr=0.1, zo_eps=1e-2, seed=9, **kw)
    model, opt = fresh()
    start = snapshot(model)
    with monkeypatch.context() as m:
        calls = _interrupting_after(0, m)
        opt.step(lambda: loss_of(model))
    after_step, n_calls = snapshot(model), calls[0]
    assert n_calls >= 5
    for k in range(1, n_calls + 1):
        model, opt = fresh()
        with monkeypatch.context() as m:
            _interrupting_after(k, m)
            with pytest.raises(KeyboardInterrupt):        # held, never lost
                opt.step(lambda: loss_of(model))
        at_start, at_end = max_moved(model, start), max_moved(model, after_step)
        assert at_start <= MOVED or at_end == 0.0, (k, at_start, at_end)
        assert opt.step_count == 1
        assert torch.isfinite(opt.step(lambda: loss_of(model)))


def test_a_ctrl_c_while_a_step_sets_itself_up_does_not_leave_the_optimizer_refusing_steps(monkeypatch, ctrl_c_raises):
    """A ^C that landed after step() claimed the optimizer and before its try began (while it
    wrapped the signal handlers, a few us) left the claim in place: every later step raised
    "step() was called while a step of this optimizer was running", for the optimizer's life."""
    from zeroflow.optim import zo
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.1, momentum=0.9, seed=3)
    start = snapshot(model)

    def interrupted():
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(zo._InterruptGate, "close_for_step", staticmethod(interrupted))
        with pytest.raises(KeyboardInterrupt):
            opt.step(lambda: loss_of(model))
    assert max_moved(model, start) == 0.0
    assert torch.isfinite(opt.step(lambda: loss_of(model)))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_held_while_a_failing_kernel_ran_still_comes(monkeypatch, ctrl_c_raises):
    # a ^C that lands while the update kernel runs is held; the kernel then refuses a state
    # buffer replaced between steps. The step raised the ValueError and dropped the ^C: a loop
    # that catches errors kept training. Now the ^C comes, with the refusal as its context.
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.1, momentum=0.9, seed=3)
    opt.step(lambda: loss_of(model))
    opt.state[model[0].weight]["momentum_buffer"] = torch.zeros(3)
    start = snapshot(model)
    import zfkernels
    real = zfkernels.call_op

    def call_op(b, op, **kw):
        if op == "zo_sgd_update_":
            os.kill(os.getpid(), signal.SIGINT)
        return real(b, op, **kw)
    monkeypatch.setattr(zfkernels, "call_op", call_op)
    with pytest.raises(KeyboardInterrupt) as e:
        opt.step(lambda: loss_of(model))
    assert isinstance(e.value.__context__, ValueError) and "momentum_buffer" in str(e.value.__context__)
    assert max_moved(model, start) <= MOVED      # the perturbation taken back


def test_a_dropped_param_group_does_not_keep_its_parameters_alive():
    # the per-group cache of validated lists (_buckets) is keyed by the group: a group popped
    # from param_groups (an old task's head dropped) stayed in it with its parameters, for the
    # optimizer's lifetime (an audit's find: one adapter kept per task)
    import gc
    import weakref
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.1, seed=3)
    head = torch.nn.Linear(1, 1)
    opt.add_param_group({"params": head.parameters()})
    opt.step(lambda h=head: loss_of(model) + h(loss_of(model).reshape(1)).sum())
    gone = weakref.ref(head.weight)
    opt.param_groups.pop()
    opt.state.clear()
    opt.step(lambda: loss_of(model))
    del head
    gc.collect()
    assert gone() is None
    # nor its tensor ids: a tensor allocated at a dead parameter's address would inherit its id
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert set(opt._tid) == held
    extra = torch.nn.Linear(1, 1)
    opt.add_param_group({"params": extra.parameters()})
    assert [opt._tid[id(p)] for p in extra.parameters()] == [6, 7]     # the count goes on: 4, 5 were the head's
    # also for a group dropped before any step (none of its lists cached), whose parameter's
    # address a new one takes: it got the dead one's id
    late = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [late]})
    opt.param_groups.pop()
    stale = id(late)
    del late
    gc.collect()
    kept = []                   # held, so that each new one takes another block: CPython soon gives back the freed one
    for _ in range(1000):
        kept.append(torch.nn.Parameter(torch.zeros(2)))
        if id(kept[-1]) == stale:
            break
    opt.add_param_group({"params": [kept[-1]]})
    assert opt._tid[id(kept[-1])] == 9


@pytest.mark.parametrize("cls,kw", [(ZOFusedAdam, {}), (ZOFusedSGD, dict(momentum=0.9))])
def test_a_dropped_param_group_leaves_no_state_behind(cls, kw):
    """A group popped from param_groups (an old task's head) kept its parameters' state (Adam's
    m and v, the momentum buffers) for the optimizer's lifetime, and state_dict() raised
    torch.optim's bare KeyError on it (it packs state by the ids of the groups' parameters):
    no checkpoint could be taken after a head was dropped."""
    import gc
    import weakref
    model = make_mlp(6, 4, 1)
    body, head = list(model[0].parameters()), list(model[2].parameters())
    opt = cls([{"params": body}, {"params": head}], lr=0.05, seed=3, **kw)
    opt.step(lambda: loss_of(model))
    buffers = [weakref.ref(b) for p in head for b in opt.state[p].values() if isinstance(b, torch.Tensor)]
    opt.param_groups.pop()
    sd = opt.state_dict()                  # before any step: the dropped group's state is left out
    assert sorted(sd["state"]) == [0, 1] and sd["param_groups"][0]["params"] == [0, 1]
    resumed = cls(body, lr=0.05, seed=3, **kw)
    resumed.load_state_dict(sd)
    opt.step(lambda: loss_of(model))       # and the next step frees it
    gc.collect()
    assert buffers and all(b() is None for b in buffers)
    assert set(opt.state) == set(body)


@pytest.mark.parametrize("cls", [ZOFusedSGD, ZOFusedAdam])
def test_a_resume_after_a_group_was_dropped_takes_the_same_steps(cls):
    """Tensor ids are positions at construction, and a dropped group's ids are not given again:
    after an old head was dropped and a new one added, the remaining parameters' ids were no
    longer their positions, a state_dict did not hold them, and the optimizer resumed from it
    (built over the groups it saved, as docs/algorithms.md §8 says) drew other z for every
    parameter: not the steps the saved run took."""
    model = make_mlp(6, 4, 1)
    old_head, new_head = torch.nn.Linear(1, 1), torch.nn.Linear(6, 1)

    def loss(m, head):
        return loss_of(m) + head(X).pow(2).mean()
    opt = cls([{"params": old_head.parameters()}, {"params": model.parameters()}], lr=0.05, seed=3)
    opt.step(lambda: loss_of(model) + old_head(loss_of(model).reshape(1)).sum())
    opt.param_groups.pop(0)
    opt.add_param_group({"params": new_head.parameters()})
    state = copy.deepcopy(opt.state_dict())
    model2, new_head2 = copy.deepcopy((model, new_head))
    resumed = cls([{"params": model2.parameters()}, {"params": new_head2.parameters()}], lr=0.05, seed=3)
    resumed.load_state_dict(state)
    for _ in range(2):
        opt.step(lambda: loss(model, new_head))
        resumed.step(lambda: loss(model2, new_head2))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(new_head.parameters(), new_head2.parameters()))
    third = torch.nn.Linear(2, 1)                  # and a group added after the resume gets the next id
    opt.add_param_group({"params": third.parameters()})
    resumed.add_param_group({"params": third.parameters()})
    assert opt._tid[id(third.weight)] == resumed._tid[id(third.weight)] == 8


def test_start_zo_frees_the_fo_gradients_as_a_scheduled_switch_does():
    # docs/algorithms.md says the FO .grad tensors are freed at the switch: only the scheduled
    # one did (start_zo() made step() see a ZO phase from its start, so the freeing never ran)
    model = make_mlp(6, 4, 1)
    hyb = create("zo_sgd", model.parameters(), hybrid_switch=100, lr=0.01, fo_lr=0.1, seed=3)
    _run(model, hyb, 2)
    assert all(p.grad is not None for p in model.parameters())
    hyb.start_zo()
    assert hyb.zeroth_order and all(p.grad is None for p in model.parameters())
    _run(model, hyb, 1)
    assert all(p.grad is None for p in model.parameters())


def test_fo_optimizers_drop_every_zo_only_option_as_documented():
    model = make_mlp(6, 4, 1)
    for name in ("fo_sgd", "fo_adam"):      # stochastic_rounding raised TypeError from torch.optim
        opt = create(name, model.parameters(), lr=0.1, stochastic_rounding=True, sparsity=0.5, zo_eps=1e-2)
        assert not opt.zeroth_order


def test_a_closure_that_leaves_grad_mode_on_steps_like_one_that_does_not():
    # torch.set_grad_enabled(True) as a statement inside the closure: the next kernel call, and
    # the undo after it, refused the parameters (they require grad), leaving theta perturbed
    def leaky(model):
        def closure():
            torch.set_grad_enabled(True)
            return loss_of(model)
        return closure

    results = []
    for make in (lambda m: (lambda: loss_of(m)), leaky):
        model = make_mlp(6, 4, 1)
        opt = ZOFusedSGD(model.parameters(), lr=0.1, zo_eps=1e-2, seed=3)
        for _ in range(2):
            opt.step(make(model))
        results.append(snapshot(model))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert torch.is_grad_enabled()


def test_a_low_precision_loss_is_warned_about_once():
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.1, zo_eps=1e-2, seed=3)
    with pytest.warns(RuntimeWarning, match="returned a torch.bfloat16 loss") as seen:
        for _ in range(3):
            opt.step(lambda: loss_of(model).to(torch.bfloat16))
    assert len([w for w in seen if "bfloat16 loss" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZOFusedSGD(model.parameters(), lr=0.1, seed=3).step(lambda: loss_of(model))     # fp32: no warning


def _detached(model, opt):
    """The model gets new tensors: load_state_dict(assign=True) of a copy of its weights."""
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    return opt, lambda: loss_of(model)


def _copied_optimizer(model, opt):
    """A deepcopy of the optimizer (its parameters are copies), stepped against ``model``."""
    return copy.deepcopy(opt), lambda: loss_of(model)


def _functional_call(model, opt):
    """The closure runs torch.func.functional_call with a copied parameter dict."""
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    return opt, lambda: F.mse_loss(torch.func.functional_call(model, weights, (X,)), Y)


# forward_grad is not among them: its jvp puts the optimizer's tensors into the model by name.
@pytest.mark.parametrize("estimator", ["two_side", "one_side"])
@pytest.mark.parametrize("unhook", [_detached, _copied_optimizer, _functional_call],
                         ids=["assign_true", "deepcopy_opt", "functional_call"])
def test_steps_whose_perturbation_never_reaches_the_loss_are_warned_once(estimator, unhook):
    # After model.load_state_dict(sd, assign=True), with a deepcopy of the optimizer, or with
    # functional_call on copies, the optimizer perturbs tensors the forward does not read:
    # every L+ - L- is exactly 0 and nothing trains, silently (an audit's finding). Three such
    # steps in a row warn, once, and the warning names the caller's line, not a torch wrapper.
    model = make_mlp(6, 4, 1)
    opt, closure = unhook(model, ZOFusedSGD(model.parameters(), lr=0.05, seed=1, estimator=estimator))
    with pytest.warns(RuntimeWarning, match=r"every loss difference of the last 3 steps was exactly 0, so nothing "
                                            r"trains.*assign=True") as w:
        for _ in range(6):
            opt.step(closure)
    zero = [x for x in w if "was exactly 0" in str(x.message)]
    assert len(zero) == 1 and zero[0].filename == __file__
    assert opt.last_projected == [0.0]


def test_a_forward_grad_step_with_a_zero_directional_derivative_is_warned():
    # forward_grad's estimate is grad.v: exactly 0 for three steps in a row (here a loss that
    # does not depend on the parameters) is warned the same way.
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.05, seed=1, estimator="forward_grad", model=model)
    with pytest.warns(RuntimeWarning, match=r"every directional derivative grad\.v of the last 3 steps"):
        for _ in range(3):
            opt.step(lambda: loss_of(model) * 0.0)


@pytest.mark.parametrize("swap", ["assign_true", "new_module"])
def test_forward_grad_refuses_a_model_that_no_longer_holds_its_tensors(swap):
    # forward_grad's jvp puts the optimizer's tensors into the model by name: after
    # load_state_dict(assign=True) or a replaced module it trained those tensors while the
    # model kept its own, never updated and without a word. Refused before the step runs.
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.05, seed=1, estimator="forward_grad", model=model)
    opt.step(lambda: loss_of(model))
    if swap == "assign_true":
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        name = "0.weight"
    else:
        model[2] = torch.nn.Linear(4, 1)
        name = "2.weight"
    held = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"parameter '{name}' is no longer the tensor this optimizer trains.*"
                                         r"Build the optimizer again"):
        opt.step(lambda: loss_of(model))
    assert all(torch.equal(a, b) for a, b in zip(held, opt.param_groups[0]["params"]))
    assert max_moved(model, before) == 0.0
    fresh = ZOFusedSGD(model.parameters(), lr=0.05, seed=1, estimator="forward_grad", model=model)
    fresh.step(lambda: loss_of(model))
    assert max_moved(model, before) > 0.0


class _Objective(torch.nn.Module):
    """A loss as a module (its forward returns the loss of a model on fixed data)."""
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self):
        return loss_of(self.model)


def test_forward_grad_takes_a_module_as_its_closure():
    # forward_grad's jvp calls the closure inside a wrapper module; a closure that is an nn.Module
    # was registered as a submodule of that wrapper, so functional_call met the model's parameters
    # twice and left plain tensors in the model in place of its Parameters (model.parameters() lost
    # them); the next step refused: "the model's parameter '0.weight' is no longer the tensor ..."
    model, twin = make_mlp(6, 4, 1), make_mlp(6, 4, 1)
    params = list(model.parameters())
    opt = ZOFusedSGD(model.parameters(), lr=0.05, seed=1, estimator="forward_grad", model=model)
    ref = ZOFusedSGD(twin.parameters(), lr=0.05, seed=1, estimator="forward_grad", model=twin)
    objective = _Objective(model)
    for _ in range(2):
        opt.step(objective)
        ref.step(lambda: loss_of(twin))
    held = list(model.parameters())
    assert len(held) == len(params) and all(a is b for a, b in zip(held, params))
    assert all(torch.equal(a, b) for a, b in zip(params, twin.parameters()))
    assert dict(opt._fg_wrapper.named_children()) == {"m": model}


@pytest.mark.parametrize("fails", [False, True])
def test_forward_grad_keeps_no_reference_to_a_closure_after_its_step(fails):
    # the jvp's wrapper holds the closure only while the step runs (set back to None in a
    # finally): kept, it held whatever the closure captured (the last batch) until the next
    # step, and a later pickle.dumps / torch.save of the optimizer (§7: it can be pickled)
    # failed on a lambda closure, "Can't pickle <function <lambda>>"
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.05, seed=1, estimator="forward_grad", model=model)

    def closure():
        if fails:
            raise KeyboardInterrupt
        return loss_of(model)
    ref = weakref.ref(closure)
    with pytest.raises(KeyboardInterrupt) if fails else contextlib.nullcontext():
        opt.step(closure)
    del closure
    gc.collect()
    assert ref() is None, "the optimizer still holds the step's closure"
    opt.step(lambda: loss_of(model))
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    _run(model2, opt2, 1)


@pytest.mark.parametrize("hybrid", [False, True])
def test_the_optimizers_warnings_name_the_callers_line(hybrid):
    # A fixed stacklevel named torch/utils/_contextlib.py or torch/optim/optimizer.py (the
    # wrappers torch puts around step(), more or fewer by torch version): a user's
    # `-W error::RuntimeWarning:mymodule` or a log line could not find their own code.
    model = make_mlp(6, 4, 1)
    opt = create("zo_sgd", model.parameters(), lr=0.05, seed=1, **(dict(fo_lr=0.05, hybrid_switch=1) if hybrid
                                                                   else {}))
    with pytest.warns(RuntimeWarning) as w:
        if hybrid:
            opt.step(lambda: loss_of(model))                            # an FO step without .grad
        opt.step(lambda: loss_of(model).to(torch.bfloat16))              # a bf16 loss
        opt.step(lambda: torch.tensor(float("nan")))                     # a skipped step
    assert len(w) == (3 if hybrid else 2)
    assert [x.filename for x in w] == [__file__] * len(w), [(x.filename, x.lineno) for x in w]


class _Attention(torch.nn.Module):
    """One self-attention layer, through F.scaled_dot_product_attention or written out."""
    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.qkv, self.out = torch.nn.Linear(8, 24), torch.nn.Linear(8, 1)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        if self.fused:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
        return self.out(a.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8))


def test_forward_grad_runs_models_with_scaled_dot_product_attention():
    # SDPA picked its fused kernels under the jvp too, and they have no forward-AD formula:
    # forward_grad failed on every timm ViT and Hugging Face model with torch's "Trying to use
    # forward AD with _scaled_dot_product_flash_attention_for_cpu". The estimate now matches
    # the same layer written out (softmax(q k^T / sqrt(d)) v), to rounding.
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    estimates = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = _Attention(fused)
        opt = ZOFusedSGD(model.parameters(), lr=0.1, seed=3, estimator="forward_grad", model=model)
        opt.step(lambda: model(x).pow(2).mean())
        estimates.append(opt.last_projected[0])
    assert estimates[0] == pytest.approx(estimates[1], rel=1e-5) and estimates[0] != 0.0


class _OldStyleSquare(torch.autograd.Function):
    """An autograd.Function without jvp or setup_context (what many extensions ship)."""
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _SquaredOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 1)

    def forward(self, x):
        return _OldStyleSquare.apply(self.lin(x))


@pytest.mark.parametrize("case", ["weight_norm", "autograd_function"])
def test_forward_grad_on_an_op_without_forward_ad_says_what_to_do(case):
    # weight_norm has no forward-AD formula in torch, a custom autograd.Function without jvp /
    # setup_context cannot run under torch.func: torch's error now carries a note that names
    # forward_grad and the ZO estimators that need only forwards.
    torch.manual_seed(0)
    model = (torch.nn.Sequential(torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(6, 4)),
                                 torch.nn.Linear(4, 1)) if case == "weight_norm" else _SquaredOut())
    opt = ZOFusedSGD(model.parameters(), lr=0.1, seed=3, estimator="forward_grad", model=model)
    with pytest.raises((NotImplementedError, RuntimeError)) as e:
        opt.step(lambda: loss_of(model))
    assert any("estimator='forward_grad'" in n and "'two_side'" in n for n in e.value.__notes__), e.value


def test_forward_grad_on_batchnorm_in_train_mode_says_eval_mode():
    # BatchNorm in train mode writes its running statistics in place, which torch.func's jvp
    # refuses ("mutate a captured Tensor", a message that names jvp): the note told the user to
    # switch to a finite-difference estimator, where BatchNorm in train mode is worse still
    # (docs/algorithms.md §0); the documented fix (§3) is eval mode, and the note now says so.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    opt = ZOFusedSGD(model.parameters(), lr=0.1, seed=3, estimator="forward_grad", model=model)
    with pytest.raises(RuntimeError, match="mutate a captured Tensor") as e:
        opt.step(lambda: loss_of(model))
    notes = e.value.__notes__
    assert any("BatchNorm" in n and "model.eval()" in n for n in notes), notes
    assert not any("'two_side'" in n for n in notes), notes
    model.eval()
    opt.step(lambda: loss_of(model))


def test_a_compiled_function_calling_step_runs_the_step_eagerly():
    # torch.compile traced into step(): 13 graphs of the optimizer's internals, a warning about
    # _thread.get_ident (the interrupt gate), other returned losses; fullgraph=True failed with
    # "Attempted to call function marked as skipped". The step now runs eagerly (same bits as
    # without compile) and a model compiled inside the closure still runs compiled.
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        model = make_mlp(6, 4, 1)
        opt = ZOFusedSGD(model.parameters(), lr=0.05, seed=1)
        train = lambda: opt.step(lambda: loss_of(model))     # noqa: E731
        if compiled:
            train = torch.compile(train, backend="eager")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            losses = [train() for _ in range(3)]
        runs.append((losses, snapshot(model)))
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    with pytest.raises(Exception, match="reads every loss on the host"):
        torch.compile(lambda: opt.step(lambda: loss_of(model)), backend="eager", fullgraph=True)()
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    fast = torch.compile(model, backend="eager")
    opt.step(lambda: F.mse_loss(fast(X), Y))
    assert counters["stats"]["unique_graphs"] == 1


def test_an_uninitialized_lazy_parameter_is_refused_with_the_fix():
    # zeroflow's own message read p.shape, and torch raised "Can't access the shape of an
    # uninitialized parameter ... in load_state_dict" instead
    model = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 is uninitialized .*run one forward pass"):
        ZOFusedSGD(model.parameters(), lr=0.05)
    model(X)
    ZOFusedSGD(model.parameters(), lr=0.05).step(lambda: loss_of(model))


def test_a_parameter_made_channels_last_after_construction_gets_the_models_fix():
    # The kernel's advice, "call .contiguous() on it", makes a copy the model never uses; the
    # refusal now carries a note naming the parameter and model.to(memory_format=...).
    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    opt = ZOFusedSGD(conv.parameters(), lr=0.05, seed=1)
    before = snapshot(conv)
    conv.to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="not contiguous") as e:
        opt.step(lambda: conv(x).pow(2).mean())
    assert any("parameter 0 of param group 0 (4, 3, 3, 3) is no longer contiguous" in n
               and "memory_format=torch.contiguous_format" in n for n in e.value.__notes__)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(conv)))
    conv.to(memory_format=torch.contiguous_format)
    opt.step(lambda: conv(x).pow(2).mean())


@pytest.mark.parametrize("how", ["-c", "prompt"])
def test_a_skipped_step_warns_under_python_c_and_at_the_interactive_prompt(how):
    # __main__'s loader there cannot give source: the skip warning (each_time) raised
    # ImportError: '__main__' is not a built-in module, in place of the warning
    code = ("import torch\nfrom zeroflow.optim import ZOFusedSGD\n"
            "m = torch.nn.Linear(3, 2); o = ZOFusedSGD(m.parameters(), lr=0.1)\n"
            "o.step(lambda: torch.tensor(float('nan')))\nprint('stepped', o.step_count, o.steps_skipped)\n")
    args, stdin = ([sys.executable, "-c", code], None) if how == "-c" else ([sys.executable, "-i"], code)
    out = subprocess.run(args, input=stdin, env=child_env(), capture_output=True, text=True, timeout=300)
    assert "ImportError" not in out.stderr, out.stderr
    assert "stepped 1 1" in out.stdout and "non-finite loss (nan) at step 0; step skipped" in out.stderr, out


def test_a_model_converted_to_float64_after_construction_gets_a_note_naming_its_parameter():
    # the kernel's text names its list index ("params[1] has dtype Double") and "use float32"
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.05, seed=1)
    model[2].double()
    before = snapshot(model)
    with pytest.raises(ValueError, match="has dtype Double") as e:
        opt.step(lambda: loss_of(model))
    assert any("parameter 2 of param group 0 (1, 4) is torch.float64 now" in n and "model.float()" in n
               for n in getattr(e.value, "__notes__", ()))
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model)))


def test_step_returns_a_float32_loss_whatever_the_default_dtype():
    # documented as a 0-dim float32 tensor; under set_default_dtype(float64) it was float64
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.05, seed=1)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = [opt.step(lambda: loss_of(model)), opt.step(lambda: torch.tensor(float("inf")))]
    finally:
        torch.set_default_dtype(old)
    assert [(t.dtype, t.dim()) for t in out] == [(torch.float32, 0)] * 2


def test_importing_the_optimizers_does_not_load_dynamo():
    # step()'s torch.compiler.disable, applied at import, loaded torch._dynamo: ~2 s more for
    # every `import zeroflow.optim`; it is made on first use, once torch.compile has loaded it
    code = ("import sys, torch; before = 'torch._dynamo' in sys.modules; import zeroflow.optim, zeroflow.replay, "
            "zeroflow.distributed; print(before, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr[-2000:]


def test_the_zero_estimate_warning_needs_three_zero_steps_in_a_row():
    # One zero estimate happens (a flat stretch, a loss coarser than zo_eps): two in a row, a
    # live step, two more, then a third: only then the warning.
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.05, seed=1)
    flat = torch.tensor(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for closure in (lambda: flat, lambda: flat, lambda: loss_of(model), lambda: flat, lambda: flat):
            opt.step(closure)
        for _ in range(20):
            opt.step(lambda: loss_of(model))          # a training loop that learns is never warned
    with pytest.warns(RuntimeWarning, match="was exactly 0"):
        for _ in range(3):
            opt.step(lambda: flat)


@pytest.mark.parametrize("name,kw,buffers", [("zo_adam", dict(history=0.5), ("exp_avg", "exp_avg_sq", "history")),
                                             ("zo_sgd", dict(momentum=0.9), ("momentum_buffer",))])
def test_float32_state_of_bf16_parameters_is_created_and_resumed_as_float32(name, kw, buffers):
    # bf16 Adam moments lose every v update below half an ulp (v froze); state_dtype="float32"
    # keeps them in float32, and a resume must not round them back to bf16 (torch.optim's
    # load casts every buffer to its parameter's dtype)
    def build(seed_model=0):
        model = make_mlp(6, 4, 1, seed_model).to(torch.bfloat16)
        return model, create(name, model.parameters(), lr=1e-2, zo_eps=2**-6, seed=5, state_dtype="float32",
                             perturbation="rademacher", **kw)

    def loss(model):
        return F.mse_loss(model(X.to(torch.bfloat16)).float(), Y)

    model, opt = build()
    for _ in range(3):
        opt.step(lambda: loss(model))
    assert all(st[b].dtype == torch.float32 for st in opt.state.values() for b in buffers)
    model2, opt2 = build()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(st[b].dtype == torch.float32 for st in opt2.state.values() for b in buffers)
    for m, o in ((model, opt), (model2, opt2)):
        for _ in range(2):
            o.step(lambda: loss(m))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    with pytest.raises(ValueError, match="state_dtype='bf16' must be one of"):
        create(name, model.parameters(), lr=0.1, state_dtype="bf16")


@pytest.mark.parametrize("name", ["zo_adam", "zo_sgd"])
def test_a_half_precision_state_loads_cast_to_its_parameters_dtype(name):
    # docs/algorithms.md §8: torch.optim's load casts every buffer to its parameter's dtype, and
    # only a float32 buffer of a bf16 / fp16 parameter is kept as saved. A state of fp16
    # parameters loaded into a bf16 model is cast to bf16; kept as fp16 (as a float32 buffer
    # is), the next step failed: "exp_avgs[0] has dtype Half but params[0] is BFloat16"
    kw = dict(momentum=0.9) if name == "zo_sgd" else {}
    fp16 = make_mlp(6, 4, 1).to(torch.float16)
    opt = create(name, fp16.parameters(), lr=1e-2, seed=5, **kw)
    opt.step(lambda: F.mse_loss(fp16(X.half()).float(), Y))
    bf16 = make_mlp(6, 4, 1).to(torch.bfloat16)
    opt2 = create(name, bf16.parameters(), lr=1e-2, seed=5, **kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    held = [t for st in opt2.state.values() for t in st.values() if isinstance(t, torch.Tensor) and t.dim()]
    assert held and all(t.dtype == torch.bfloat16 for t in held)
    opt2.step(lambda: F.mse_loss(bf16(X.bfloat16()).float(), Y))


def test_an_optimizer_pickled_before_an_option_existed_still_steps():
    model = make_mlp(6, 4, 1)
    opt = ZOFusedAdam(model.parameters(), lr=1e-2, seed=3)
    opt.step(lambda: loss_of(model))
    state = opt.__getstate__()
    for g in state["param_groups"]:         # as zeroflow wrote it before these options
        del g["state_dtype"], g["stochastic_rounding"]
    old = ZOFusedAdam.__new__(ZOFusedAdam)
    old.__setstate__(state)
    old.step(lambda: loss_of(model))        # raised "an option is missing ('state_dtype')"
    assert old.param_groups[0]["state_dtype"] == "param" and old.param_groups[0]["stochastic_rounding"] is False


@pytest.mark.parametrize("name,kw,keys", [
    ("zo_sgd", dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True),
     ("momentum", "dampening", "weight_decay", "nesterov")),
    ("forward_grad", dict(momentum=0.9, weight_decay=5e-4), ("momentum", "weight_decay")),
    ("zo_adam", dict(betas=(0.8, 0.9), eps=1e-6, weight_decay=5e-4), ("betas", "eps", "weight_decay")),
    ("zo_adam", dict(betas=(0.8, 0.9), weight_decay=5e-4, decoupled_weight_decay=True), ("betas", "weight_decay"))])
def test_a_group_added_to_a_factory_hybrid_gets_the_configured_options_in_both_phases(name, kw, keys):
    """A head added per task (add_param_group) trained its FO phase with torch's defaults
    (SGD: no momentum, no weight decay; AdamW: weight decay 0.01, betas (0.9, 0.999)) and its
    ZO phase with the options given to create(): the FO twin was built from the first group's
    options without them as its defaults."""
    model = make_mlp(6, 4, 1)
    hyb = create(name, model[0].parameters(), model=model, hybrid_switch=2, lr=0.01, fo_lr=0.1, seed=3, **kw)
    hyb.add_param_group({"params": model[2].parameters()})
    for phase in (hyb.fo, hyb.zo):
        first, added = phase.param_groups
        assert {k: added[k] for k in keys} == {k: first[k] for k in keys}, type(phase).__name__
    assert hyb.fo.param_groups[1]["lr"] == 0.1 and hyb.zo.param_groups[1]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize("switch", [1, 10])
def test_a_group_dropped_from_a_hybrid_stops_training_in_both_phases(switch):
    """param_groups.pop(k) drops an old task's head from a ZO optimizer (its state goes at the
    next step); from a hybrid it dropped the hybrid's own group only: the head kept being
    perturbed, updated and weight-decayed by both phases' optimizers, and the scheduled lr of
    every later group went to the group before it. A resume after the drop loads."""
    torch.manual_seed(0)
    a, h0, h1 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))

    def build():
        o = create("zo_sgd", a.parameters(), hybrid_switch=switch, lr=0.01, momentum=0.9, weight_decay=0.1,
                   seed=1)
        o.add_param_group({"params": list(h0.parameters()), "lr": 0.01})
        return o

    hyb = build()
    train_step(hyb, lambda: F.cross_entropy(h0(a(x)), y))
    hyb.add_param_group({"params": list(h1.parameters()), "lr": 0.02})
    hyb.param_groups.pop(1)                          # the old head
    hyb.param_groups[1]["lr"] = 0.05                 # as a scheduler sets it
    before = h0.weight.detach().clone()
    for _ in range(3):
        train_step(hyb, lambda: F.cross_entropy(h1(a(x)), y))
    assert torch.equal(before, h0.weight)
    for inner in (hyb.fo, hyb.zo):
        assert [[id(p) for p in g["params"]] for g in inner.param_groups] == \
               [[id(p) for p in g["params"]] for g in hyb.param_groups]
    assert not any(id(p) in {id(q) for q in h0.parameters()} for p in hyb.fo.state)
    assert hyb.active.param_groups[1]["lr"] == pytest.approx(0.05)     # h1's group got h1's lr
    sd = hyb.state_dict()
    fresh = create("zo_sgd", a.parameters(), hybrid_switch=switch, lr=0.01, momentum=0.9, weight_decay=0.1, seed=1)
    fresh.add_param_group({"params": list(h1.parameters()), "lr": 0.02})
    fresh.load_state_dict(sd)
    gone = hyb.param_groups.pop(1)                   # popped and added again before a step
    hyb.add_param_group({"params": gone["params"], "lr": 0.03})
    train_step(hyb, lambda: F.cross_entropy(h1(a(x)), y))
    assert [len(o.param_groups) for o in (hyb, hyb.fo, hyb.zo)] == [2, 2, 2]
    with pytest.raises(ValueError, match="not its two optimizers' groups"):
        hyb.param_groups.append(dict(hyb.param_groups[1], params=list(h0.parameters())))
        train_step(hyb, lambda: F.cross_entropy(h1(a(x)), y))


@pytest.mark.parametrize("switch", [1, 10])
def test_a_hybrid_with_two_groups_of_frozen_parameters_drops_one_and_steps(switch):
    """add_param_group leaves frozen parameters out, so a frozen head's group is empty, and all
    empty groups look alike: with two of them, popping one made the inner optimizers' groups look
    reordered and every later step raised "not its two optimizers' groups"."""
    torch.manual_seed(0)
    a, f0, f1 = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    f0.requires_grad_(False)
    f1.requires_grad_(False)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    hyb = create("zo_sgd", a.parameters(), hybrid_switch=switch, lr=0.01, momentum=0.9, seed=1)
    hyb.add_param_group({"params": list(f0.parameters())})
    hyb.add_param_group({"params": list(f1.parameters())})
    hyb.param_groups.pop(1)
    before = a.weight.detach().clone()
    for _ in range(2):
        train_step(hyb, lambda: F.cross_entropy(a(x), y))
    assert not torch.equal(before, a.weight)
    assert [len(o.param_groups) for o in (hyb, hyb.fo, hyb.zo)] == [2, 2, 2]
    fresh = create("zo_sgd", a.parameters(), hybrid_switch=switch, lr=0.01, momentum=0.9, seed=1)
    fresh.add_param_group({"params": list(f1.parameters())})
    fresh.load_state_dict(hyb.state_dict())


def test_a_group_dropped_from_a_hybrid_before_its_next_step_is_out_of_a_save_a_load_and_its_grad():
    """The drop is applied where the hybrid is next used, not only at a step: a checkpoint taken
    right after the pop (the end of a task) saves the groups left, a hybrid popped and not yet
    stepped loads the state of one built with the groups left, and the dropped head's last .grad
    is freed, not kept for the rest of the run once the FO optimizer no longer holds it."""
    torch.manual_seed(0)
    a, h0, h1 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))

    def build(*heads):
        o = create("zo_sgd", a.parameters(), hybrid_switch=10, lr=0.01, momentum=0.9, seed=1)
        for h in heads:
            o.add_param_group({"params": list(h.parameters()), "lr": 0.01})
        return o

    hyb = build(h0, h1)
    train_step(hyb, lambda: F.cross_entropy(h0(a(x)) + h1(a(x)), y))     # FO: h0 has a .grad
    hyb.param_groups.pop(1)
    sd = hyb.state_dict()                            # no step since the pop
    assert len(sd["hybrid"]["fo"]["param_groups"]) == len(sd["hybrid"]["zo"]["param_groups"]) == 2
    build(h1).load_state_dict(sd)
    train_step(hyb, lambda: F.cross_entropy(h1(a(x)), y))
    assert h0.weight.grad is None and h0.bias.grad is None
    other = build(h0, h1)
    other.param_groups.pop(1)                        # popped, then loaded before any step
    other.load_state_dict(sd)
    assert [len(o.param_groups) for o in (other, other.fo, other.zo)] == [2, 2, 2]


@pytest.mark.parametrize("name,kw", [("zo_sgd_sign", dict(sign=False)), ("zo_adam_sign", dict(sign=False)),
                                     ("zo_sgd_conserve", dict(conserve=False)),
                                     ("zo_adam_conserve", dict(conserve=False))])
def test_a_keyword_that_undoes_the_named_method_is_refused(name, kw):
    """create("zo_sgd_sign", ..., sign=False) built plain ZO-SGD under the sign method's name (the
    keyword overrode the name's preset), e.g. from one kwargs dict shared by a sweep's methods;
    the same value as the preset, and scalar_sign=True for the sign methods, stay accepted."""
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=f"{name} is the method with {next(iter(kw))}=True"):
        create(name, p, **kw)
    key = next(iter(kw))
    assert getattr(create(name, p, **{key: True}), "conserve" if key == "conserve" else "param_groups") is not None
    if key == "sign":
        g = create(name, p, scalar_sign=True).param_groups[0]
        assert (g["sign"], g["scalar_sign"]) == (False, True)


@pytest.mark.parametrize("name,torch_cls", [("fo_sgd", torch.optim.SGD), ("fo_adam", torch.optim.Adam),
                                            ("fo_adam", torch.optim.AdamW)])
def test_a_first_order_step_runs_each_step_hook_once(name, torch_cls):
    """torch.optim wraps a class's step (step hooks, profiler record) once an instance of that
    class exists. The FO baselines' step, wrapped as theirs, called torch's step, wrapped too as
    soon as any plain torch.optim.SGD / Adam had been built (a baseline next to the zeroflow
    one, as in every comparison): each pre- and post-hook ran twice per step. Guards: once."""
    from zeroflow.optim import create

    torch_cls([torch.zeros(1, requires_grad=True)])            # wraps torch_cls.step
    p = torch.zeros(3, requires_grad=True)
    kw = {"weight_decay": 0.01} if torch_cls is torch.optim.AdamW else {}
    opt = create(name, [p], lr=0.1, **kw, **({"decoupled_weight_decay": True} if kw else {}))
    assert isinstance(opt, torch_cls)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    p.grad = torch.ones(3)
    opt.step()
    assert calls == ["pre", "post"] and opt.forward_passes == 1
    want = torch.zeros(3, requires_grad=True)
    ref = torch_cls([want], lr=0.1, **kw)
    want.grad = torch.ones(3)
    ref.step()
    assert torch.equal(p, want)


# ---------------------------------------------------------------- the hybrid's checks, each case its own
def test_a_hybrid_of_other_parameters_names_only_the_frozen_ones_it_holds():
    """The refusal counts the FO optimizer's frozen parameters (1 of 4 here, so neither the
    trainable count nor the total), and a mismatch with nothing frozen says no word of them."""
    model = make_mlp(6, 4, 1)
    model[0].bias.requires_grad_(False)
    ps = list(model.parameters())
    with pytest.raises(ValueError, match=r"the fo optimizer holds 1 parameter\(s\) with requires_grad=False"):
        HybridFOZO(torch.optim.SGD(ps, lr=0.1), ZOFusedSGD(ps, lr=0.1), 1)
    other = make_mlp(6, 4, 1)
    with pytest.raises(ValueError, match=r"must optimize the same parameters in the same order$"):
        HybridFOZO(torch.optim.SGD(other.parameters(), lr=0.1), ZOFusedSGD(model[2].parameters(), lr=0.1), 1)


def test_a_hybrid_over_a_named_fo_and_an_unnamed_zo_optimizer_adds_named_groups():
    """The hybrid's groups are named when either inner optimizer's are (here the FO one's only):
    a named group then goes in named where the optimizer names its groups, as tensors where not."""
    model = make_mlp(6, 4, 1)
    hyb = HybridFOZO(torch.optim.SGD(model[0].named_parameters(), lr=0.1),
                     ZOFusedSGD(model[0].parameters(), lr=0.1, seed=3), 1)
    assert hyb.param_groups[0]["param_names"] == ["weight", "bias"]
    hyb.add_param_group({"params": [("2." + k, p) for k, p in model[2].named_parameters()]})
    assert [o.param_groups[1].get("param_names") for o in (hyb, hyb.fo, hyb.zo)] == [["2.weight", "2.bias"]] * 2 + [
        None]
    _run(model, hyb, 2)


def test_a_hybrid_whose_first_group_is_all_frozen_keeps_its_groups_named():
    """A named group left empty by frozen parameters still names them (none): the hybrid's first
    group unnamed beside named ones was refused by torch.optim as mixing the two."""
    model, frozen = make_mlp(6, 4, 1), torch.nn.Linear(2, 2).requires_grad_(False)
    groups = [{"params": list(frozen.named_parameters())}, {"params": list(model.named_parameters())}]
    zo = ZOFusedSGD(groups, lr=0.1, seed=3)
    fo = torch.optim.SGD([{"params": [], "param_names": []}, {"params": list(model.named_parameters())}], lr=0.1)
    hyb = HybridFOZO(fo, zo, 1)
    assert [g["param_names"] for g in hyb.param_groups] == [[], ["0.weight", "0.bias", "2.weight", "2.bias"]]
    _run(model, hyb, 2)


def test_a_refused_rate_is_not_pushed_into_the_inner_optimizers():
    """The rates are checked before the step pushes them: the FO optimizer's group kept its lr
    (a refused nan was left in it, for a caller that steps it directly)."""
    model = make_mlp(6, 4, 1)
    hyb = create("zo_sgd", model.parameters(), hybrid_switch=2, lr=0.01, fo_lr=0.1, seed=3)
    _run(model, hyb, 1)
    hyb.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="HybridFOZO param group 0: lr=nan"):
        _run(model, hyb, 1)
    assert hyb.fo.param_groups[0]["lr"] == 0.1 and hyb.zo.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize("name", ["momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_each_parameter_shaped_buffer_of_a_first_order_state_is_checked(name):
    """Each buffer on its own (a state edited by hand: the others fit), not only the first one."""
    from zeroflow.optim import FOAdam, FOSGD
    model = make_mlp(6, 4, 1)
    opt = (FOSGD(model.parameters(), lr=0.1, momentum=0.9) if name == "momentum_buffer"
           else FOAdam(model.parameters(), lr=0.1, amsgrad=True))
    _run(model, opt, 1)
    state = copy.deepcopy(opt.state_dict())
    state["state"][2][name] = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=rf"state_dict's {name} of parameter 2 has shape \(4, 6\), the parameter "
                                         r"\(1, 4\)"):
        opt.load_state_dict(state)


def test_forward_grad_set_between_steps_with_conserve_on_is_refused():
    model = make_mlp(6, 4, 1)
    opt = ZOFusedSGD(model.parameters(), lr=0.1, seed=3, conserve=True, model=model)
    _run(model, opt, 1)
    opt.estimator = "forward_grad"
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"ZOFusedSGD\.conserve is not defined for estimator='forward_grad'"):
        _run(model, opt, 1)
    assert max_moved(model, before) == 0.0 and opt.step_count == 1


def test_a_first_order_state_with_buffers_of_no_listed_parameter_is_refused_by_its_layout():
    """The FO check reads the layout first: a state entry for an id no group lists was named as
    'the parameter None' by the shape check (or loaded, when its shapes fit nothing)."""
    model = make_mlp(6, 4, 1)
    opt = create("fo_sgd", model.parameters(), lr=0.1, momentum=0.9)
    _run(model, opt, 1)
    state = copy.deepcopy(opt.state_dict())
    state["state"][9] = {"momentum_buffer": torch.zeros(4, 6)}
    with pytest.raises(ValueError, match="state_dict's state holds parameter id\\(s\\) 9 that no"):
        opt.load_state_dict(state)


@pytest.mark.parametrize("kind", ["int", "numpy"])
def test_a_truthy_maximize_is_refused_as_true_is(kind):
    """torch.optim reads maximize as a truth value: 1 or numpy's True maximized there."""
    import numpy as np
    value = 1 if kind == "int" else np.True_
    model = make_mlp(6, 4, 1)
    with pytest.raises(ValueError, match="maximize=True: zeroflow's optimizers minimize"):
        ZOFusedSGD([{"params": list(model.parameters()), "maximize": value}], lr=0.1)


def test_a_hybrid_refuses_a_group_its_zo_optimizer_refuses_with_nothing_half_added():
    """torch.optim's FO optimizer takes a float64 parameter, the ZO one does not: the FO group
    added first is taken back, so the three optimizers keep the same groups."""
    model = make_mlp(6, 4, 1)
    hyb = create("zo_sgd", model.parameters(), hybrid_switch=2, lr=0.01, seed=3)
    with pytest.raises(ValueError, match="the fused kernels update float32, bfloat16 or float16 parameters"):
        hyb.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]})
    assert [len(o.param_groups) for o in (hyb, hyb.fo, hyb.zo)] == [1, 1, 1]
    _run(model, hyb, 3)


def test_a_hybrid_refuses_a_named_group_of_an_unnamed_one_and_a_pair_of_another_length():
    """An unnamed hybrid took a named group as tensors, dropping its names without a word; a
    3-tuple in a named group went to torch.optim as a 'parameter'."""
    model = make_mlp(6, 4, 1)
    hyb = create("zo_sgd", model.parameters(), hybrid_switch=2, lr=0.01, seed=3)
    with pytest.raises(ValueError, match="this hybrid's param groups do not name their parameters"):
        hyb.add_param_group({"params": [("w", torch.nn.Parameter(torch.zeros(3)))]})
    named = create("zo_sgd", model.named_parameters(), hybrid_switch=2, lr=0.01, seed=3)
    with pytest.raises(ValueError, match=r"give every parameter of the group as a \(name, tensor\) pair, or none"):
        named.add_param_group({"params": [("w", torch.nn.Parameter(torch.zeros(3)), 1)]})
    assert [len(o.param_groups) for o in (hyb, hyb.fo, hyb.zo, named, named.fo, named.zo)] == [1] * 6


def test_a_hybrid_whose_fo_optimizer_maximizes_is_refused_before_anything_moves():
    """torch.optim's maximize=True in the FO phase ascended until the switch, and the ZO phase
    (which minimizes) descended after it, without a word."""
    model = make_mlp(6, 4, 1)
    ps = list(model.parameters())
    with pytest.raises(ValueError, match="the FO optimizer's param group 0 has maximize=True"):
        HybridFOZO(torch.optim.SGD(ps, lr=0.1, maximize=True), ZOFusedSGD(ps, lr=0.1, seed=3), 3)
    hyb = HybridFOZO(torch.optim.SGD(ps, lr=0.1), ZOFusedSGD(ps, lr=0.1, seed=3), 3)
    _run(model, hyb, 1)
    hyb.fo.param_groups[0]["maximize"] = True
    before = snapshot(model)
    with pytest.raises(ValueError, match="the FO optimizer's param group 0 has maximize=True"):
        _run(model, hyb, 1)
    assert max_moved(model, before) == 0.0 and hyb.forward_passes == 1      # the refused step did not count
    hyb.fo.param_groups[0]["maximize"] = False
    _run(model, hyb, 1)


def test_a_hybrid_whose_fo_optimizer_maximizes_in_a_later_group_is_refused():
    # every FO group is checked, not only the first: group 1's maximize=True ascended its layer
    # through the FO phase as group 0's did the whole model
    model = make_mlp(6, 4, 1)

    def groups(**kw):
        return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), **kw}]
    with pytest.raises(ValueError, match="the FO optimizer's param group 1 has maximize=True"):
        HybridFOZO(torch.optim.SGD(groups(maximize=True), lr=0.1), ZOFusedSGD(groups(), lr=0.1, seed=3), 3)
    hyb = HybridFOZO(torch.optim.SGD(groups(), lr=0.1), ZOFusedSGD(groups(), lr=0.1, seed=3), 3)
    hyb.fo.param_groups[1]["maximize"] = True
    before = snapshot(model)
    with pytest.raises(ValueError, match="the FO optimizer's param group 1 has maximize=True"):
        _run(model, hyb, 1)
    assert max_moved(model, before) == 0.0


@pytest.mark.parametrize("cls", [ZOFusedSGD, ZOFusedAdam])
@pytest.mark.parametrize("schedule", ["swa", "one_cycle_momentum"])
def test_a_state_saved_under_swalr_or_a_momentum_cycle_loads_into_a_plain_optimizer(cls, schedule):
    # SWALR writes swa_lr, OneCycleLR with cycle_momentum base_momentum and max_momentum into the
    # groups: no options of the optimizer, so a state saved under them loads without them (and the
    # other way round), as initial_lr's does
    def build():
        model = make_mlp(6, 4, 1)
        return model, cls(model.parameters(), lr=0.1, seed=1, **({"momentum": 0.9} if cls is ZOFusedSGD else {}))

    model, opt = build()
    if schedule == "swa":
        torch.optim.swa_utils.SWALR(opt, swa_lr=0.05)
    else:
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=10, cycle_momentum=True)
    opt.step(lambda: loss_of(model))
    _, plain = build()
    plain.load_state_dict(opt.state_dict())
    assert plain.step_count == 1
    opt.load_state_dict(plain.state_dict())
    assert opt.step_count == 1


def test_a_group_added_to_a_hybrid_under_swalr_keeps_its_swa_lr():
    model = make_mlp(6, 4, 1)
    hyb = create("zo_sgd", model[0].parameters(), hybrid_switch=2, lr=0.01, fo_lr=0.1, seed=3)
    hyb.add_param_group({"params": model[2].parameters(), "lr": 0.2, "swa_lr": 0.05})
    assert hyb.param_groups[1]["swa_lr"] == 0.05


# ---------------------------------------------------------------- Adam's derived float32 scalars
def _adam_opt(kind, backend, **kw):
    torch.manual_seed(0)
    model = make_mlp(6, 4, 1)
    if kind == "zo":
        return model, ZOFusedAdam(model.parameters(), seed=3, backend=backend, **kw)
    from zeroflow.optim.fo import FOAdam, FOAdamW
    cls = FOAdamW if kw.pop("decoupled_weight_decay", False) else FOAdam
    return model, cls(model.parameters(), **kw)


def _adam_step(kind, model, opt):
    x, y = make_data(8, 6, seed=1)
    loss = lambda: F.mse_loss(model(x), y)     # noqa: E731
    if kind == "zo":
        return opt.step(loss)
    opt.zero_grad()
    loss().backward()
    return opt.step()


def _adam_step_refused(kind, model, opt, match):
    """The step raises a ValueError matching ``match`` before any parameter moved."""
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        _adam_step(kind, model, opt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind,backend", [("zo", "torch"), ("zo", "cpu"), ("fo", None)])
@pytest.mark.parametrize("kw,needle", [
    (dict(lr=3e38), r"lr=3e\+38 makes Adam step 1's bias-corrected step size lr / \(1 - beta1\*\*1\) = 3e\+39 "
                    r"\(beta1=0.9\) infinite in float32, .*give lr at most 3.40282e\+37 for this step"),
    (dict(lr=1e20, weight_decay=1e19, decoupled_weight_decay=True),
     r"lr=1e\+20 and weight_decay=1e\+19 make AdamW's decay factor 1 - lr \* weight_decay = -1e\+39 infinite"),
])
def test_an_adam_lr_whose_step_size_overflows_float32_is_refused_before_anything_is_written(kind, backend, kw,
                                                                                           needle):
    """lr=3e38 is finite in float32 (ZO-Adam's option check took it), but step 1's step size
    lr / (1 - 0.9) = 3e39 is not: ZO-Adam wrote inf / nan into every parameter, FO Adam raised
    torch's 'value cannot be converted to type float without overflow' with m, v and the step
    count advanced (its CUDA foreach path writes inf). Refused by name before anything changes."""
    model, opt = _adam_opt(kind, backend, **kw)
    _adam_step_refused(kind, model, opt, "param group 0: " + needle)
    assert not opt.state and opt.forward_passes == 0


@pytest.mark.parametrize("kind,backend", [("zo", "torch"), ("fo", None)])
def test_an_adam_lr_valid_only_from_a_later_step_is_taken_there(kind, backend):
    """The bound is the step's own: lr=5e37 overflows step 1's step size (lr / 0.1) but not step
    2's (lr / 0.19); set after a first step, it is taken, and the step is finite."""
    model, opt = _adam_opt(kind, backend, lr=1e-3)
    _adam_step(kind, model, opt)
    opt.param_groups[0]["lr"] = 5e37
    _adam_step(kind, model, opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_zo_adam_conserve_refuses_an_lr_its_frozen_moves_would_overflow():
    """conserve moves theta along the stored Adam direction with a step size up to
    2 sqrt(1 - beta2^t) 2^13.5 times the update's: lr=1e35 (step size 1e36, finite) wrote NaN
    into every parameter at its first move. Refused before the step; lr=1e33 is taken."""
    model, opt = _adam_opt("zo", "torch", lr=1e35, conserve=True)
    _adam_step_refused("zo", model, opt, r"param group 0: lr=1e\+35 .* is too large for conserve at Adam step 1: "
                                         r"its move from theta0 \+1 Delta to theta0 -1 Delta .*conserve=False")
    model, opt = _adam_opt("zo", "torch", lr=1e33, conserve=True)
    _adam_step("zo", model, opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_zo_adamw_conserve_refuses_a_decay_factor_of_0_before_the_step():
    """lr * weight_decay = 1 (AdamW): conserve's move back from theta0 - Delta divides by the decay
    factor 1 - lr * weight_decay = 0, a ZeroDivisionError mid-step with the update applied
    (whenever conserve kept theta0 or theta0 + Delta, or a closure failed). Refused first."""
    model, opt = _adam_opt("zo", "torch", lr=0.5, weight_decay=2.0, decoupled_weight_decay=True, conserve=True)
    _adam_step_refused("zo", model, opt, r"param group 0: lr=0.5 and weight_decay=2 make AdamW's decay factor "
                                         r"1 - lr \* weight_decay 0: .*give lr \* weight_decay other than 1")


def test_the_zo_adam_face_refuses_an_overflowing_step_size_before_writing():
    import zfkernels
    p, m, v = torch.ones(5), torch.zeros(5), torch.zeros(5)
    with pytest.raises(ValueError, match=r"lr=3e\+38 makes Adam step 1's bias-corrected step size"):
        zfkernels.zo_adam_update_([p], [m], [v], seeds=[1], coeffs=[1.0], lr=3e38, step=1, backend="torch")
    assert torch.equal(p, torch.ones(5)) and not m.any() and not v.any()
    zfkernels.zo_adam_update_([p], [m], [v], seeds=[1], coeffs=[1.0], lr=3e38, step=40, backend="torch")
    assert torch.isfinite(p).all()      # 1 - 0.9**40 = 0.985: a finite step size


def test_an_adam_lr_is_refused_exactly_where_float32_rounds_its_step_size_to_inf():
    """The refusal is where float32 rounds lr / (1 - beta1**step) to inf: halfway between FLT_MAX
    and 2^128 (round-to-nearest-even goes up) and beyond. An lr one double below is taken, its
    step size rounding to FLT_MAX, as is the 'lr at most' the refusal names. beta1 = 0.5 makes
    step 1's bias correction exact."""
    import zfkernels
    from zfkernels.opspec import F32_MAX, F32_OVERFLOW
    refused = F32_OVERFLOW * 0.5
    below = math.nextafter(refused, 0.0)
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float64).float())     # noqa: E731
    assert math.isinf(f32(refused / 0.5)) and f32(below / 0.5) == F32_MAX
    p, m, v = torch.ones(5), torch.zeros(5), torch.zeros(5)
    with pytest.raises(ValueError, match=r"infinite in float32, .*give lr at most 1.70141e\+38 for this step"):
        zfkernels.zo_adam_update_([p], [m], [v], seeds=[1], coeffs=[0.0], lr=refused, betas=(0.5, 0.999), step=1,
                                  backend="torch")
    for lr in (below, F32_MAX * 0.5):
        zfkernels.zo_adam_update_([p], [m], [v], seeds=[1], coeffs=[0.0], lr=lr, betas=(0.5, 0.999), step=1,
                                  backend="torch")
    assert torch.equal(p, torch.ones(5))       # a zero estimate: no move, and nothing infinite


@pytest.mark.parametrize("kind,backend", [("zo", "torch"), ("fo", None)])
def test_adamw_with_beta1_0_refuses_an_overflowing_decay_factor_too(kind, backend):
    """beta1 = 0 (no momentum, RMSprop-like) makes step 1's bias correction 1 - 0**1 = 1: the
    decay factor 1 - lr * weight_decay of AdamW overflows float32 all the same, and is refused
    before anything is written."""
    model, opt = _adam_opt(kind, backend, lr=1e20, weight_decay=1e19, decoupled_weight_decay=True,
                           betas=(0.0, 0.999))
    _adam_step_refused(kind, model, opt, r"param group 0: lr=1e\+20 and weight_decay=1e\+19 make AdamW's decay "
                                         r"factor 1 - lr \* weight_decay = -1e\+39 infinite")


def test_adam_s_l2_weight_decay_has_no_decay_factor_to_refuse():
    """The decay-factor refusal is AdamW's (decoupled): Adam's L2 weight decay adds wd * theta to
    the estimate and multiplies nothing by 1 - lr * wd, so lr * wd beyond float32 is no reason."""
    from zfkernels.opspec import adam_scalars_refusal
    assert adam_scalars_refusal(1e20, 0.9, 1, 1e19, decoupled_weight_decay=False) is None
    assert "decay factor" in adam_scalars_refusal(1e20, 0.9, 1, 1e19, decoupled_weight_decay=True)


@pytest.mark.parametrize("kind,backend", [("zo", "torch"), ("fo", None)])
def test_an_overflowing_adam_lr_in_a_later_group_is_refused_naming_that_group(kind, backend):
    """A LoRA / no-decay group with its own lr: the refusal names the group that overflows
    (param group 1), and FO AdamW's names the optimizer that computes it (torch.optim.AdamW)."""
    torch.manual_seed(0)
    model = make_mlp(6, 4, 1)
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e38}]
    if kind == "zo":
        opt = ZOFusedAdam(groups, lr=1e-3, seed=3, backend=backend)
        where = "the kernels compute"
    else:
        from zeroflow.optim.fo import FOAdamW
        opt = FOAdamW(groups, lr=1e-3)
        where = "torch.optim.AdamW computes"
    _adam_step_refused(kind, model, opt, rf"^param group 1: lr=3e\+38 makes Adam step 1's .*where {where}")


def test_fo_adam_takes_a_float32_overflowing_lr_for_float64_parameters():
    """torch.optim.Adam computes a float64 parameter's step in float64, where lr / (1 - beta1) =
    3e39 is finite: the float32 refusal is not theirs."""
    from zeroflow.optim.fo import FOAdam
    torch.manual_seed(0)
    model = make_mlp(6, 4, 1).double()
    opt = FOAdam(model.parameters(), lr=3e38)
    x, y = make_data(8, 6, seed=1)
    opt.zero_grad()
    F.mse_loss(model(x.double()), y.double()).backward()
    opt.step()
    assert opt.steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())


def test_zo_adam_conserve_refuses_an_eps_its_frozen_moves_would_overflow_unless_lr_is_0():
    """conserve's frozen move scales eps by sqrt(1 - beta2^t) 2^13.5 (366 at step 1): eps=1e37
    (finite in float32) becomes inf there, refused before the step. At lr = 0 (a warmup's first
    step) the update and every move are of length 0: the same eps is taken and nothing is infinite."""
    model, opt = _adam_opt("zo", "torch", lr=1e-3, eps=1e37, conserve=True)
    _adam_step_refused("zo", model, opt, r"param group 0: lr=0.001 \(betas=\(0.9, 0.999\), eps=1e\+37, "
                                         r"weight_decay=0\) is too large for conserve at Adam step 1")
    model, opt = _adam_opt("zo", "torch", lr=0.0, eps=1e37, conserve=True)
    _adam_step("zo", model, opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_zo_adam_conserve_with_l2_weight_decay_takes_lr_times_weight_decay_1():
    """lr * weight_decay = 1 is refused for AdamW with conserve (its decay factor 1 - lr * wd is 0,
    which conserve's move back divides by); Adam's L2 weight decay (decoupled_weight_decay=False)
    has no such factor: it steps, and the parameters stay finite."""
    model, opt = _adam_opt("zo", "torch", lr=0.5, weight_decay=2.0, conserve=True)
    for _ in range(2):
        _adam_step("zo", model, opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("build", [
    lambda ps: create("zo_sgd", ps, lr=0.1),
    lambda ps: create("zo_adam", ps, lr=0.1),
    lambda ps: create("fo_sgd", ps, lr=0.1),
    lambda ps: create("fo_adam", ps, lr=0.1),
    lambda ps: create("zo_sgd", ps, lr=0.1, hybrid_switch=1),
    lambda ps: create("zo_sgd", [{"params": ps}], lr=0.1),
    lambda ps: create("fo_sgd", [{"params": ps}], lr=0.1),
    lambda ps: create("zo_sgd", [{"params": ps}], lr=0.1, hybrid_switch=1),
    lambda ps: _added(create("zo_sgd", [torch.nn.Parameter(torch.ones(2))], lr=0.1), ps),
    lambda ps: _added(create("fo_sgd", [torch.nn.Parameter(torch.ones(2))], lr=0.1), ps),
    lambda ps: _added(create("zo_sgd", [torch.nn.Parameter(torch.ones(2))], lr=0.1, hybrid_switch=1), ps),
], ids=["zo_sgd", "zo_adam", "fo_sgd", "fo_adam", "hybrid", "zo group", "fo group", "hybrid group",
        "zo add_param_group", "fo add_param_group", "hybrid add_param_group"])
def test_a_parameter_list_is_taken_as_torch_optim_takes_it(build):
    # torch.nn.ParameterList is a Module that iterates its Parameters: torch.optim.SGD(plist) trains
    # them. The refusal of a module given as params (create("zo_sgd", model)) refused it too
    plist = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2))])
    opt = build(plist)
    assert [p for g in opt.param_groups for p in g["params"]][-2:] == list(plist)


def _added(opt, ps):
    opt.add_param_group({"params": ps})
    return opt


@pytest.mark.parametrize("name", ["fo_sgd", "fo_adam", "fo_adamw"])
def test_an_fo_optimizer_keeps_the_caller_s_group_dict_as_torch_optim_does(name):
    # torch.optim appends the dict it is given (its params made a list): a caller holding it edits the
    # group (its lr). The FO baselines' check for a tensor listed twice appended a copy instead
    from zeroflow.optim import FOAdam, FOAdamW, FOSGD
    cls = {"fo_sgd": FOSGD, "fo_adam": FOAdam, "fo_adamw": FOAdamW}[name]
    w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    g = {"params": (p for p in [w]), "lr": 0.1}
    opt = cls([g], lr=0.1)
    added = {"params": (p for p in [b]), "lr": 0.2}
    opt.add_param_group(added)
    assert opt.param_groups[0] is g and opt.param_groups[1] is added
    assert g["params"] == [w] and added["params"] == [b]
    # refused, the caller's dict is left as it was given
    twice = {"params": [torch.nn.Parameter(torch.ones(2))] * 2, "lr": 0.3}
    given = dict(twice)
    with pytest.raises(ValueError, match="param group 2 is parameter 0"):
        opt.add_param_group(twice)
    assert twice == given and len(opt.param_groups) == 2
    # a tensor as a group's params: torch.optim's [tensor] (not list(tensor), its rows)
    single = {"params": torch.nn.Parameter(torch.ones(2))}
    opt.add_param_group(single)
    assert opt.param_groups[2] is single and len(single["params"]) == 1 and single["params"][0].shape == (2,)


def test_a_closure_returning_no_model_output_gets_no_advice_about_one():
    # the advice to return a model output's .loss (and to pass labels where it is None) is for an
    # object with a loss attribute only: a tuple (loss, logits) or a string has none to return
    model = make_mlp(6, 4, 1)
    for name in ("zo_sgd", "forward_grad", "fo_sgd"):
        opt = create(name, model.parameters(), model=model, lr=0.01, seed=2)
        for bad, kind in ((lambda: (loss_of(model), 1.0), "tuple"), (lambda: "0.5", "str")):
            with pytest.raises((TypeError, ValueError), match=kind) as e:
                train_step(opt, bad)
            assert "loss" not in str(e.value).split(kind, 1)[1], str(e.value)
    # a tensor of more than one element: the message as it was, no type named
    with pytest.raises(ValueError, match=r"^the closure must return a scalar loss tensor$"):
        train_step(create("fo_sgd", model.parameters(), lr=0.01), lambda: (model(X) - Y).pow(2).mean(0).repeat(2))


def test_forward_grad_names_the_input_require_grads_hook_for_requires_grad_only():
    # the note naming Hugging Face's hook (model.disable_input_require_grads()) is for torch's
    # "call Tensor.requires_grad_() ... inside of a function being transformed by a functorch
    # transform"; another functorch refusal (a forward setting .data) is no such hook
    class SetsData(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 1)

        def forward(self, x):
            h = self.lin(x)
            h.data = torch.zeros_like(h)
            return h

    model = SetsData()
    opt = create("forward_grad", model.parameters(), model=model, lr=0.01, seed=2)
    with pytest.raises(RuntimeError, match="functorch transform") as e:
        opt.step(lambda: F.mse_loss(model(X), Y))
    assert "disable_input_require_grads" not in " ".join(getattr(e.value, "__notes__", []))


@pytest.mark.parametrize("cls", ["FOSGD", "FOAdam", "FOAdamW"])
def test_a_first_order_baseline_names_a_module_given_as_params_and_a_parameter_already_in_a_group(cls):
    """fo_*'s optimizers refuse what the ZO ones refuse, in the same words: a module as params
    (torch.optim: "'Sequential' object is not iterable"), and a tensor of an earlier group in a
    new one, said by position in both groups (torch.optim's message names neither); nothing added."""
    import zeroflow.optim as zo_optim
    model = make_mlp(6, 4, 1)
    with pytest.raises(TypeError, match=r"params is a Sequential \(a torch.nn.Module\), not an iterable"):
        getattr(zo_optim, cls)(model, lr=0.1)
    opt = getattr(zo_optim, cls)(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="parameter 1 of the new param group 1 is parameter 1 of param group 0"):
        opt.add_param_group({"params": [model[2].weight, model[0].bias]})
    assert len(opt.param_groups) == 1
