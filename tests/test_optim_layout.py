"""The ZO optimizers' cached parameter layout (issue 13, host work per step).

``_ZOBase._buckets`` validates a group's parameter list once (tensor ids, device split, the
concrete backend) and the step reuses it; state dicts are re-read every step. Each test
here changes something a user may change between steps and fails if the step used a stale
cache: the kernels must see the new parameter list, the new tensors, the new backend, the
new state, the new options. Bit-identity of whole trajectories with the uncached code is
tests/test_optim.py's and tests/test_parity.py's (they did not change)."""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import zfkernels
from conftest import make_data, make_mlp
from zeroflow.optim import ZOFusedAdam, ZOFusedSGD
from zfkernels import _compiled
from zfkernels.stream import QUERY_MASK_PER_STEP, QUERY_MASK_PER_TASK, QUERY_ROUNDING

warnings.filterwarnings("ignore", message="zfkernels: the compiled")
BACKEND = os.environ.get("ZF_TEST_BACKEND", "auto")
X, Y = make_data(16, 6)


def _model():
    return make_mlp(6, 4, 1, 0)


def _closure(model):
    return lambda: F.mse_loss(model(X), Y)


def _snap(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _record_calls(monkeypatch):
    """Every zfkernels.call_op of the optimizers: (backend, op, args)."""
    calls = []
    real = zfkernels.call_op

    def spy(backend, op, **args):
        calls.append((backend, op, args))
        return real(backend, op, **args)

    monkeypatch.setattr(zfkernels, "call_op", spy)
    return calls


def test_edited_param_list_is_used_at_the_next_step():
    model = _model()
    ps = list(model.parameters())
    opt = ZOFusedSGD(ps, lr=0.05, zo_eps=1e-2, seed=3, backend=BACKEND)
    opt.step(_closure(model))
    opt.param_groups[0]["params"] = ps[2:]          # the first layer is no longer optimized
    before = _snap(model)
    opt.step(_closure(model))
    after = _snap(model)
    assert _same(before[:2], after[:2])              # a stale layout would perturb and update them
    assert not any(torch.equal(b, a) for b, a in zip(before[2:], after[2:]))
    # a parameter the optimizer was never given: a clear error, nothing changed
    opt.param_groups[0]["params"] = ps[2:] + [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="not given to the optimizer"):
        opt.step(_closure(model))
    assert _same(after, _snap(model))


def test_same_list_edited_in_place_is_seen():
    model = _model()
    ps = list(model.parameters())
    opt = ZOFusedSGD(ps, lr=0.05, zo_eps=1e-2, seed=3, backend=BACKEND)
    opt.step(_closure(model))
    group_params = opt.param_groups[0]["params"]
    del group_params[:2]                             # the same list object, shorter
    before = _snap(model)
    opt.step(_closure(model))
    assert _same(before[:2], _snap(model)[:2])


def test_swapped_data_tensors_are_the_ones_updated():
    """``p.data = new`` between steps (what checkpoint loading code does): the kernels write
    the new tensors, the old ones are left alone, and the trajectory is the unswapped one."""
    ref, swp = _model(), _model()
    opt_r = ZOFusedAdam(ref.parameters(), lr=0.01, seed=4, backend=BACKEND)
    opt_s = ZOFusedAdam(swp.parameters(), lr=0.01, seed=4, backend=BACKEND)
    for m, o in ((ref, opt_r), (swp, opt_s)):
        o.step(_closure(m))
    old = [p.data for p in swp.parameters()]
    old_vals = [t.clone() for t in old]
    for p in swp.parameters():
        p.data = p.data.clone()
    for m, o in ((ref, opt_r), (swp, opt_s)):
        o.step(_closure(m))
    assert _same(old, old_vals)
    assert _same(_snap(ref), _snap(swp))


def test_dtype_changed_between_steps():
    """bf16 after an fp32 step: the same bits as an optimizer built on the bf16 params and
    resumed from the fp32 run's state; float64: refused before anything changes."""
    m1, m2 = _model(), _model()
    opt1 = ZOFusedSGD(m1.parameters(), lr=0.05, zo_eps=1e-2, seed=6, backend=BACKEND)
    opt1.step(_closure(m1))
    sd = copy.deepcopy(opt1.state_dict())
    with torch.no_grad():
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            p1.data = p1.data.to(torch.bfloat16)
            p2.data = p1.data.clone()
    opt2 = ZOFusedSGD(m2.parameters(), lr=0.05, zo_eps=1e-2, seed=6, backend=BACKEND)
    opt2.load_state_dict(sd)
    bf_loss = lambda m: lambda: F.mse_loss(m(X.bfloat16()).float(), Y)  # noqa: E731
    opt1.step(bf_loss(m1))
    opt2.step(bf_loss(m2))
    assert all(p.dtype == torch.bfloat16 for p in m1.parameters())
    assert _same(_snap(m1), _snap(m2))
    for p in m1.parameters():
        p.data = p.data.double()
    before = _snap(m1)
    with pytest.raises((ValueError, RuntimeError), match="dtype"):
        opt1.step(lambda: F.mse_loss(m1(X.double()), Y.double()))
    assert _same(before, _snap(m1))


@pytest.mark.skipif(not _compiled.cpu_available(), reason="compiled CPU ops missing")
def test_backend_attribute_changed_between_steps(monkeypatch):
    calls = _record_calls(monkeypatch)
    model, ref = _model(), _model()
    opt = ZOFusedSGD(model.parameters(), lr=0.05, zo_eps=1e-2, momentum=0.9, seed=8, backend="cpu")
    opt_ref = ZOFusedSGD(ref.parameters(), lr=0.05, zo_eps=1e-2, momentum=0.9, seed=8, backend="cpu")
    opt.step(_closure(model))
    opt_ref.step(_closure(ref))
    assert {c[0] for c in calls} == {"cpu"}
    calls.clear()
    opt.backend = "torch"
    opt.step(_closure(model))
    assert calls and {c[0] for c in calls} == {"torch"}      # a stale layout would still say "cpu"
    opt_ref.step(_closure(ref))
    assert _same(_snap(model), _snap(ref))                  # one arithmetic


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the model moves to it between steps")
def test_model_moved_to_the_gpu_between_steps():
    cpu_m, mov_m = _model(), _model()
    opt_c = ZOFusedAdam(cpu_m.parameters(), lr=0.01, seed=9, backend="auto")
    opt_m = ZOFusedAdam(mov_m.parameters(), lr=0.01, seed=9, backend="auto")
    opt_c.step(_closure(cpu_m))
    opt_m.step(_closure(mov_m))
    mov_m.to("cuda")
    for st in opt_m.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim():
                st[k] = v.cuda()
    xc, yc = X.cuda(), Y.cuda()
    for _ in range(2):
        opt_c.step(_closure(cpu_m))
        opt_m.step(lambda: F.mse_loss(mov_m(xc), yc))
    assert all(p.is_cuda for p in mov_m.parameters())
    assert _same(_snap(cpu_m), [p.cpu() for p in _snap(mov_m)])


def test_state_replaced_between_steps():
    """A buffer replaced in opt.state, and load_state_dict into the same (warm) optimizer:
    the step reads the state anew."""
    model = _model()
    opt = ZOFusedAdam(model.parameters(), lr=0.01, seed=10, backend=BACKEND)
    opt.step(_closure(model))
    p0 = next(iter(model.parameters()))
    old_m = opt.state[p0]["exp_avg"]
    old_vals = old_m.clone()
    opt.state[p0]["exp_avg"] = torch.zeros_like(p0)
    opt.step(_closure(model))
    assert torch.equal(old_m, old_vals) and not torch.equal(opt.state[p0]["exp_avg"], torch.zeros_like(p0))

    # rewind: load an earlier state into the same optimizer, the replayed steps are bit-identical
    sd, params = copy.deepcopy(opt.state_dict()), _snap(model)
    first = []
    for _ in range(2):
        opt.step(_closure(model))
        first.append(_snap(model))
    with torch.no_grad():
        for p, v in zip(model.parameters(), params):
            p.copy_(v)
    opt.load_state_dict(sd)
    for want in first:
        opt.step(_closure(model))
        assert _same(want, _snap(model))


def test_added_param_group_is_stepped():
    model = _model()
    ps = list(model.parameters())
    opt = ZOFusedSGD(ps[:2], lr=0.05, zo_eps=1e-2, seed=12, backend=BACKEND)
    opt.step(_closure(model))
    opt.add_param_group({"params": ps[2:], "lr": 0.1})
    before = _snap(model)
    opt.step(_closure(model))
    assert not any(torch.equal(b, a) for b, a in zip(before, _snap(model)))


def test_bad_option_of_a_later_group_raises_before_any_group_changes():
    model = _model()
    ps = list(model.parameters())
    opt = ZOFusedSGD([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.05, zo_eps=1e-2, seed=13, backend=BACKEND)
    opt.step(_closure(model))
    before = _snap(model)
    for key, bad in (("perturbation", "gausian"), ("sparsity", 1.5)):
        good = opt.param_groups[1][key]
        opt.param_groups[1][key] = bad
        with pytest.raises(ValueError, match=key if key == "sparsity" else "gausian"):
            opt.step(_closure(model))
        assert _same(before, _snap(model))           # group 0 was not perturbed first
        opt.param_groups[1][key] = good


def test_mask_and_rounding_seeds_follow_the_options_of_each_step(monkeypatch):
    """The mask seed is derived only when a group has sparsity > 0 and the stream §9 rounding seed
    only for a group with stochastic_rounding: switching either on between steps must give
    the kernels the seeds of the schedule for that step."""
    calls = _record_calls(monkeypatch)
    model = _model()
    opt = ZOFusedSGD(model.parameters(), lr=0.05, zo_eps=1e-2, seed=14, backend=BACKEND)
    opt.step(_closure(model))
    assert all(a.get("mask_threshold", 0) == 0 and a.get("round_seed", 0) == 0 for _, _, a in calls)
    calls.clear()
    opt.param_groups[0]["sparsity"] = 0.5
    opt.param_groups[0]["stochastic_rounding"] = True
    opt.step(_closure(model))
    mask = zfkernels.derive_seed(14, 1, QUERY_MASK_PER_STEP)
    assert [a["mask_seed"] for _, _, a in calls] == [mask] * 3
    assert [a["mask_threshold"] for _, _, a in calls] == [1 << 23] * 3
    assert [a["round_seed"] for _, op, a in calls if op != "perturb_"] == [zfkernels.derive_seed(14, 1, QUERY_ROUNDING)]


def test_task_mask_seed_follows_new_task_and_set_mask_epoch(monkeypatch):
    """sparse_resample="task": every kernel call of a step takes the mask seed
    derive_seed(S, task, 2^32 - 2) (docs/algorithms.md §0, docs/perturbation-stream.md §8),
    task moved by new_task() and set_mask_epoch(k) alone. Wrong implementations: the per-step
    query 2^32 - 1 with the task index, a new_task() that does not advance, a negative epoch
    accepted (a seed no run could reproduce)."""
    calls = _record_calls(monkeypatch)
    model = _model()
    opt = ZOFusedSGD(model.parameters(), lr=0.05, zo_eps=1e-2, sparsity=0.5, sparse_resample="task", seed=15,
                     backend=BACKEND)

    def mask_seeds():
        calls.clear()
        opt.step(_closure(model))
        return {a["mask_seed"] for _, _, a in calls}

    assert mask_seeds() == mask_seeds() == {zfkernels.derive_seed(15, 0, QUERY_MASK_PER_TASK)}
    opt.new_task()
    assert mask_seeds() == {zfkernels.derive_seed(15, 1, QUERY_MASK_PER_TASK)}
    opt.set_mask_epoch(5)
    assert mask_seeds() == {zfkernels.derive_seed(15, 5, QUERY_MASK_PER_TASK)}
    with pytest.raises(ValueError, match="mask epoch"):
        opt.set_mask_epoch(-1)
    assert mask_seeds() == {zfkernels.derive_seed(15, 5, QUERY_MASK_PER_TASK)}
    opt.new_task()
    assert mask_seeds() == {zfkernels.derive_seed(15, 6, QUERY_MASK_PER_TASK)}


@pytest.mark.parametrize("kw", [dict(lr=0.5), dict(lr=0.05, momentum=0.9, nesterov=True)])
def test_conserve_moves_round_with_their_own_seeds(monkeypatch, kw):
    """docs/perturbation-stream.md §8: the k-th parameter-writing update call of step n (k = 0
    the update, then conserve's moves in order; nesterov: two calls per move) rounds with
    seed(S, n, 2^32 - 3 - k). Moves reusing the update's seed would add correlated rounding
    noise (and replay would round differently from a schedule counting every call); a count
    not reset per step would shift k at the next step. Both runs make the second move (back
    from theta0 - Delta) at some step: lr 0.5 keeps theta0, nesterov keeps it at step 3."""
    calls = _record_calls(monkeypatch)
    model = _model().to(torch.bfloat16)
    opt = ZOFusedSGD(model.parameters(), zo_eps=2**-6, seed=14, conserve=True, stochastic_rounding=True,
                     backend=BACKEND, **kw)
    choices = []
    for n in range(4):
        calls.clear()
        opt.step(lambda: F.mse_loss(model(X.bfloat16()).float(), Y))
        got = [a["round_seed"] for _, op, a in calls if op != "perturb_"]
        choices.append(opt.conserve_choice)
        assert len(got) >= 2                         # the update and at least the move to theta0 - Delta
        assert got == [zfkernels.derive_seed(14, n, QUERY_ROUNDING - k) for k in range(len(got))]
    assert any(c != -1.0 for c in choices)


def test_face_list_checks_name_the_bad_item():
    t = torch.zeros(3)
    with pytest.raises(TypeError, match=r"tensors\[1\] is a int"):
        zfkernels.perturb_([t, 3], 1, 0.1, backend=BACKEND)
    with pytest.raises(TypeError, match="wrap a single tensor"):
        zfkernels.perturb_(t, 1, 0.1, backend=BACKEND)
    with pytest.raises(TypeError, match=r"momentum_buffers\[0\] is a str"):
        zfkernels.zo_sgd_update_([t], [1], [0.5], lr=0.1, momentum_buffers=["x"], momentum=0.9, backend=BACKEND)
    assert torch.equal(t, torch.zeros(3))
