"""docs/algorithms.md §6 on the CPU, per variant: a ZO step allocates nothing parameter-sized
beyond its declared state ("param-sized state"), and makes the passes over theta of the table
("passes over theta": 3q two_side, 2q one_side, + conserve's frozen moves, forward_grad 1).

Measured on a model of four tensors totalling 4.25 MiB (fp32; every tensor >= 128 KiB in
bf16), so that one parameter-sized buffer, even of the smallest tensor, is well above the
constant a steady step may allocate (the loss, the closure's few elements, host scalars).
Two meters per step:

* ``AllocCounter`` (benchmarks/_common.py): peak bytes of the new storages created by the ops
  that pass the dispatcher (a TorchDispatchMode): clones, ``.float()`` copies, ``torch.where``
  results, ``zeros_like`` state, whatever the Python host path makes;
* the profiler's allocation records (``profile_memory=True``): the peak extra bytes taken from
  torch's CPU allocator, which also sees what a compiled kernel allocates below the dispatcher
  (docs/kernel-ops.md: the kernels allocate nothing), where the first meter is blind.

The op calls come from ``zfkernels.call_op`` (every backend goes through it): a pass over theta
is a call whose ``params`` are the optimizer's parameters (forward_grad's tangent
materialization perturbs zeros, not theta).
"""
import contextlib
import copy

import pytest
import torch

import zfkernels
from benchmarks._common import AllocCounter
from zeroflow.optim import ZOFusedAdam, ZOFusedSGD, create, train_step
from zfkernels import _compiled

pytestmark = pytest.mark.skipif(not _compiled.cpu_available(),
                                reason=f"the compiled CPU kernels do not load: {_compiled._errors.get('cpu')}")

# 512K + 256K + 256K + 64K elements: 4.25 MiB in fp32, 2.125 MiB in bf16 / fp16
SHAPES = [(512, 1024), (256, 1024), (1024, 256), (65536,)]
# What a steady step may allocate, whatever the parameters' size: the loss tensors, the closure's
# few elements, host scalars (measured: 24 bytes fp32, 36 bf16; from the allocator 40 and 56). A
# quarter of the smallest parameter tensor (bf16: 128 KiB), so a copy of any one tensor exceeds it.
CONSTANT = 32 << 10


class Model(torch.nn.Module):
    """Parameters of SHAPES; the loss reads four elements of each (a forward that costs nothing,
    so the step's allocations are the optimizer's), in float32 whatever the parameters' dtype.
    ``curvature`` > 0 adds a quadratic term, so that a large step overshoots (conserve then keeps
    theta0 or theta0 + Delta, the two-move path)."""

    def __init__(self, dtype=torch.float32, curvature=0.0, shapes=SHAPES):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ps = torch.nn.ParameterList(
            [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(dtype)) for s in shapes])
        self.curvature = curvature

    def forward(self):
        s = sum((p.reshape(-1)[:4].float() * (k + 1)).sum() for k, p in enumerate(self.ps))
        return s + self.curvature * s * s if self.curvature else s

    def loss(self):
        """The closures' loss."""
        return self()


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.dim())


def _allocator_records_available() -> bool:
    try:
        from torch._C._profiler import _EventType  # noqa: F401
        from torch.profiler import profile  # noqa: F401
    except ImportError:
        return False
    return True


def _allocator_peak(prof) -> int:
    """Peak of the running sum of the CPU allocator's allocations and frees recorded by the
    profiler: the most memory held at any time beyond what was held when it started."""
    from torch._C._profiler import _EventType

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    recs = [n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
            if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu"]
    # by time alone (a stable sort keeps the tree's order for a tie): extra_fields.id is None for
    # every allocation record (torch 2.11 and 2.14), so a (time, id) key raised TypeError on a tie
    recs.sort(key=lambda n: n.start_time_ns)
    cur = peak = 0
    for n in recs:
        cur += n.extra_fields.alloc_size
        peak = max(peak, cur)
    return peak


class StepMeter:
    """Both memory meters and the op log over what runs inside ``with``."""

    def __init__(self, allocator: bool = True, dispatch: bool = True):
        self.allocator = allocator and _allocator_records_available()
        self.dispatch = dispatch
        self.calls: list[tuple[str, list[int]]] = []
        self.dispatch_peak = 0
        self.allocator_peak = None

    @contextlib.contextmanager
    def measure(self, monkeypatch):
        real = zfkernels.call_op

        def logged(backend, op, **args):
            self.calls.append((op, [id(t) for t in args.get("params", ())]))
            return real(backend, op, **args)

        monkeypatch.setattr(zfkernels, "call_op", logged)
        with contextlib.ExitStack() as stack:
            prof = None
            if self.allocator:
                from torch.profiler import ProfilerActivity, profile
                prof = stack.enter_context(profile(activities=[ProfilerActivity.CPU], profile_memory=True))
            counter = stack.enter_context(AllocCounter()) if self.dispatch else None
            yield self
        monkeypatch.setattr(zfkernels, "call_op", real)
        self.dispatch_peak = counter.peak if counter is not None else 0
        if prof is not None:
            self.allocator_peak = _allocator_peak(prof)

    def peak(self) -> int:
        return max(self.dispatch_peak, self.allocator_peak or 0)

    def ops(self) -> dict:
        out: dict = {}
        for op, _ in self.calls:
            out[op] = out.get(op, 0) + 1
        return out

    def passes(self, model) -> list[int]:
        """Op calls that wrote each parameter (as params), per parameter."""
        n = {id(p): 0 for p in model.parameters()}
        for _, ids in self.calls:
            for i in ids:
                if i in n:
                    n[i] += 1
        return list(n.values())


@pytest.fixture
def meter(monkeypatch):
    def run(fn, allocator=True, dispatch=True):
        m = StepMeter(allocator, dispatch)
        with m.measure(monkeypatch):
            fn()
        return m
    return run


def expected(opt) -> dict:
    """§6 for the step just taken: passes over theta, forwards, perturb_ and update calls per
    param group. Conserve: one or two frozen moves (§2: the second unless it keeps theta0 - Delta),
    each one call (SGD with momentum and nesterov: two; a group with lr 0: none)."""
    q, est = opt.q, opt.estimator
    update = "zo_adam_update_" if isinstance(opt, ZOFusedAdam) else "zo_sgd_update_"
    if est == "forward_grad":      # q tangent materializations (perturb_ on zeros) + 1 update pass
        return {"passes": 1, "forwards": q, "perturb_": q, update: 1}
    perturbs = 3 * q - 1 if est == "two_side" else 2 * q - 1
    forwards = 2 * q if est == "two_side" else q + 1
    updates = 1
    if opt.conserve:
        g = opt.param_groups[0]
        per_move = 1 if update == "zo_adam_update_" or g["momentum"] == 0 else 1 + g["nesterov"]
        updates += per_move * (1 if opt.conserve_choice == -1 else 2)
        forwards = 2 * q + 3 if est == "two_side" else q + 3
    return {"passes": perturbs + updates, "forwards": forwards, "perturb_": perturbs, update: updates}


def check_step(m, model, opt, *, groups=1, extra=0):
    """The step metered by ``m``: at most CONSTANT (+ ``extra``) bytes, §6's passes and calls."""
    want = expected(opt)
    assert m.dispatch_peak <= CONSTANT + extra, f"{m.dispatch_peak} bytes of new tensors in a step (dispatcher)"
    if m.allocator_peak is not None:
        assert m.allocator_peak <= CONSTANT + extra, f"{m.allocator_peak} bytes taken from the CPU allocator"
    assert m.passes(model) == [want["passes"]] * len(model.ps)
    assert m.ops() == {k: v * groups for k, v in want.items() if k not in ("passes", "forwards")}
    assert opt.forwards_last_step == want["forwards"]


SGD, ADAM = ZOFusedSGD, ZOFusedAdam
BF16, FP16 = torch.bfloat16, torch.float16
# (id, class, options, parameter dtype)
VARIANTS = [
    ("sgd-two_side", SGD, {}, None),
    ("sgd-one_side", SGD, dict(estimator="one_side"), None),
    ("sgd-two_side-q3", SGD, dict(q=3), None),
    ("sgd-one_side-q3", SGD, dict(q=3, estimator="one_side"), None),
    ("sgd-momentum-wd", SGD, dict(momentum=0.9, dampening=0.1, weight_decay=0.01), None),
    ("sgd-nesterov", SGD, dict(momentum=0.9, nesterov=True), None),
    ("sgd-history", SGD, dict(history=0.5), None),
    ("sgd-sign", SGD, dict(sign=True), None),
    ("sgd-scalar_sign-rademacher", SGD, dict(scalar_sign=True, perturbation="rademacher"), None),
    ("sgd-sparsity-step", SGD, dict(sparsity=0.5, momentum=0.9), None),
    ("sgd-sparsity-task", SGD, dict(sparsity=0.5, sparse_resample="task"), None),
    ("sgd-conserve", SGD, dict(conserve=True), None),
    ("sgd-conserve-momentum-history", SGD, dict(conserve=True, momentum=0.9, history=0.3, weight_decay=0.01), None),
    ("sgd-conserve-nesterov-one_side", SGD, dict(conserve=True, momentum=0.9, nesterov=True,
                                                 estimator="one_side"), None),
    ("sgd-bf16", SGD, {}, BF16),
    ("sgd-bf16-sr-momentum-f32state", SGD, dict(stochastic_rounding=True, momentum=0.9, state_dtype="float32"), BF16),
    ("sgd-fp16-sr-history", SGD, dict(stochastic_rounding=True, history=0.5), FP16),
    ("adam", ADAM, {}, None),
    ("adam-l2", ADAM, dict(weight_decay=0.01), None),
    ("adamw", ADAM, dict(weight_decay=0.1, decoupled_weight_decay=True), None),
    ("adam-one_side-q2-history-sign", ADAM, dict(estimator="one_side", q=2, history=0.5, sign=True), None),
    ("adam-sparsity", ADAM, dict(sparsity=0.3), None),
    ("adam-conserve", ADAM, dict(conserve=True), None),
    ("adamw-conserve-q2", ADAM, dict(conserve=True, q=2, weight_decay=0.1, decoupled_weight_decay=True), None),
    ("adam-bf16-sr", ADAM, dict(stochastic_rounding=True), BF16),
    ("adam-bf16-sr-f32state", ADAM, dict(stochastic_rounding=True, state_dtype="float32"), BF16),
    ("adam-fp16", ADAM, {}, FP16),
]


def build(cls, kw, dtype=None, *, backend="cpu", groups=1, curvature=0.0, lr=1e-3, shapes=SHAPES):
    model = Model(dtype or torch.float32, curvature, shapes)
    ps = list(model.parameters())
    params = ps if groups == 1 else [{"params": ps[:2]}, {"params": ps[2:], "lr": 2 * lr, "zo_eps": 2e-3}]
    if kw.get("estimator") == "forward_grad":
        kw = dict(kw, model=model)
    return model, cls(params, lr=lr, seed=11, backend=backend, **kw)


@pytest.mark.parametrize("name,cls,kw,dtype", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_a_steady_zo_step_allocates_nothing_parameter_sized_and_makes_the_tables_passes(meter, name, cls, kw, dtype):
    model, opt = build(cls, kw, dtype)
    opt.step(model.loss)                 # the first step creates the state (test below)
    if kw.get("sparse_resample") == "task":
        opt.new_task()
    m = meter(lambda: opt.step(model.loss))
    check_step(m, model, opt)


def test_several_param_groups_make_one_call_per_group_and_pass(meter):
    # two groups with their own lr and zo_eps: each pass is one call per group, every parameter
    # still gets 3q passes
    for cls, kw in ((SGD, dict(momentum=0.9)), (ADAM, dict(q=2))):
        model, opt = build(cls, kw, groups=2)
        opt.step(model.loss)
        check_step(meter(lambda: opt.step(model.loss)), model, opt, groups=2)


@pytest.mark.parametrize("cls,kw", [(SGD, dict(conserve=True)), (SGD, dict(conserve=True, momentum=0.9, nesterov=True)),
                                    (ADAM, dict(conserve=True))], ids=["sgd", "sgd-nesterov", "adam"])
def test_conserve_that_keeps_another_candidate_makes_a_second_frozen_move_and_no_buffer(meter, cls, kw):
    # §2: a second frozen move when the step does not keep theta0 - Delta; a large step on a
    # curved loss overshoots, so theta0 or theta0 + Delta is kept
    model, opt = build(cls, kw, curvature=1e4, lr=10.0)
    opt.step(model.loss)
    m = meter(lambda: opt.step(model.loss))
    assert opt.conserve_choice != -1.0
    check_step(m, model, opt)


@pytest.mark.parametrize("cls,kw,state", [
    (SGD, {}, 0), (SGD, dict(momentum=0.9), 1), (SGD, dict(history=0.5), 1),
    (SGD, dict(momentum=0.9, history=0.5), 2), (ADAM, {}, 2), (ADAM, dict(history=0.5), 3),
    (ADAM, dict(state_dtype="float32"), 2), (SGD, dict(momentum=0.9, state_dtype="float32"), 1),
], ids=["sgd", "sgd-momentum", "sgd-history", "sgd-momentum-history", "adam", "adam-history",
        "adam-bf16-f32state", "sgd-momentum-bf16-f32state"])
def test_the_first_step_allocates_exactly_the_declared_state(meter, cls, kw, state):
    # §6 "param-sized state": buf, h, m and v, each one parameter-sized buffer (float32 ones for
    # bf16 parameters with state_dtype="float32": twice the parameter bytes), created by the
    # first step and nothing besides
    dtype = BF16 if kw.get("state_dtype") == "float32" else None
    model, opt = build(cls, kw, dtype)
    m = meter(lambda: opt.step(model.loss))
    per_buffer = param_bytes(model) * (2 if dtype == BF16 else 1)
    assert state_bytes(opt) == state * per_buffer
    check_step(m, model, opt, extra=state * per_buffer)
    assert m.dispatch_peak >= state * per_buffer


@pytest.mark.parametrize("cls,kw", [(SGD, dict(momentum=0.9)), (ADAM, dict(history=0.5))], ids=["sgd", "adam"])
def test_a_skipped_step_and_the_step_after_it_allocate_nothing(meter, cls, kw):
    # §7: a non-finite loss undoes the pending perturbation with one perturb_ (no update, no
    # state); the next step is an ordinary one
    model, opt = build(cls, kw)
    opt.step(model.loss)
    before = state_bytes(opt)
    with pytest.warns(RuntimeWarning, match="step skipped"):
        m = meter(lambda: opt.step(lambda: torch.tensor(float("nan"))))
    assert m.peak() <= CONSTANT
    assert m.ops() == {"perturb_": 2} and m.passes(model) == [2] * len(model.ps)    # +eps z, then its undo
    assert state_bytes(opt) == before
    check_step(meter(lambda: opt.step(model.loss)), model, opt)


@pytest.mark.parametrize("cls,kw,dtype", [(SGD, dict(momentum=0.9, history=0.5), None), (ADAM, {}, None),
                                          (ADAM, dict(state_dtype="float32", stochastic_rounding=True), BF16)],
                         ids=["sgd", "adam", "adam-bf16-f32state"])
def test_a_step_after_load_state_dict_allocates_nothing(meter, cls, kw, dtype):
    # the loaded buffers are the state: the next step creates none (a float32 buffer of a bf16
    # parameter stays float32, so no cast is made at the step either)
    model, opt = build(cls, kw, dtype)
    opt.step(model.loss)
    model2, opt2 = build(cls, kw, dtype)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert state_bytes(opt2) == state_bytes(opt)
    m = meter(lambda: opt2.step(model2.loss))
    check_step(m, model2, opt2)


@pytest.mark.parametrize("cls,kw", [(SGD, {}), (SGD, dict(momentum=0.9, history=0.5)),
                                    (ADAM, dict(q=2)), (ADAM, dict(q=2, sparsity=0.5, sign=True))],
                         ids=["sgd", "sgd-momentum-history", "adam-q2", "adam-q2-sparsity-sign"])
def test_forward_grad_holds_one_querys_tangents_at_a_time(meter, cls, kw):
    # §3/§6: forward_grad materializes the tangents m z(s_j) of every parameter for its jvp (one
    # parameter-sized set, freed before the next query's), then one update pass over theta
    model, opt = build(cls, dict(kw, estimator="forward_grad"))
    opt.step(model.loss)
    m = meter(lambda: opt.step(model.loss))
    check_step(m, model, opt, extra=param_bytes(model))


@pytest.mark.parametrize("name,kw", [("zo_sgd", dict(momentum=0.9)), ("zo_adam", {})])
def test_the_hybrid_in_its_zo_phase_holds_and_allocates_only_the_zo_state(meter, name, kw):
    # §4/§6: after the switch the hybrid is its ZO optimizer: the FO phase's .grad tensors and
    # its optimizer state (momentum, Adam's m and v: never read again) are freed at the switch;
    # a ZO-phase step allocates what the ZO method's does
    model = Model()
    hyb = create(name, list(model.parameters()), hybrid_switch=2, lr=1e-3, seed=11, backend="cpu", **kw)
    for _ in range(3):
        train_step(hyb, model.loss)              # two FO steps, the first ZO one (creates the ZO state)
    assert hyb.zeroth_order and all(p.grad is None for p in model.parameters())
    zo_state = (2 if name == "zo_adam" else 1) * param_bytes(model)
    assert state_bytes(hyb.zo) == zo_state
    assert state_bytes(hyb.fo) == 0, "the FO optimizer's state outlived the switch"
    m = meter(lambda: train_step(hyb, model.loss))
    check_step(m, model, hyb.zo)


def test_start_zo_and_a_load_in_the_zo_phase_free_the_fo_state_too():
    model = Model()
    hyb = create("zo_adam", list(model.parameters()), hybrid_switch=5, lr=1e-3, seed=11, backend="cpu")
    train_step(hyb, model.loss)
    assert state_bytes(hyb.fo) == 2 * param_bytes(model)
    saved = copy.deepcopy(hyb.state_dict())     # in the FO phase: its state is part of the run
    hyb.start_zo()
    assert state_bytes(hyb.fo) == 0
    train_step(hyb, model.loss)
    resumed = create("zo_adam", list(Model().parameters()), hybrid_switch=5, lr=1e-3, seed=11, backend="cpu")
    resumed.load_state_dict(saved)              # a load into the FO phase keeps the FO state
    assert not resumed.zeroth_order and state_bytes(resumed.fo) == 2 * param_bytes(model)
    resumed.load_state_dict(copy.deepcopy(hyb.state_dict()))
    assert resumed.zeroth_order and state_bytes(resumed.fo) == 0


def test_a_zo_phase_checkpoint_that_still_holds_the_fo_state_loads_without_it(monkeypatch):
    # §4: a load that lands in the ZO phase drops the loaded FO state. A checkpoint saved in the
    # ZO phase before 435b561 (which kept Adam's m and v past the switch) carries it: resumed,
    # the hybrid held the FO state beside ZO-Adam's for the rest of the run
    model = Model()
    old = create("zo_adam", list(model.parameters()), hybrid_switch=1, lr=1e-3, seed=11, backend="cpu")
    with monkeypatch.context() as m:        # the switch as it was: only the .grad tensors freed
        m.setattr(type(old), "_free_fo", lambda self: self.fo.zero_grad(set_to_none=True))
        for _ in range(2):
            train_step(old, model.loss)
    saved = copy.deepcopy(old.state_dict())
    assert old.zeroth_order and state_bytes(old.fo) == 2 * param_bytes(model)
    resumed = create("zo_adam", list(Model().parameters()), hybrid_switch=1, lr=1e-3, seed=11, backend="cpu")
    resumed.load_state_dict(saved)
    assert resumed.zeroth_order and state_bytes(resumed.fo) == 0
    assert state_bytes(resumed.zo) == 2 * param_bytes(model)


@pytest.mark.parametrize("name,kw", [("fo_sgd", dict(momentum=0.9)), ("fo_adam", {})])
def test_the_fo_baselines_allocate_their_gradients_and_torchs_temporaries(meter, name, kw):
    # §6 measured: train_step sets .grad to None, so every backward allocates the gradients (one
    # parameter-sized set); torch.optim.SGD updates in place, torch.optim.Adam's per-tensor path
    # (the CPU default) makes two temporaries of the tensor it updates (sqrt(v), then / sqrt(bc2))
    model = Model()
    opt = create(name, list(model.parameters()), lr=1e-3, **kw)
    train_step(opt, model.loss)
    m = meter(lambda: train_step(opt, model.loss))
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    extra = param_bytes(model) + (2 * largest if name == "fo_adam" else 0)
    assert param_bytes(model) <= m.dispatch_peak <= m.peak() <= extra + CONSTANT
    assert not m.calls


@pytest.mark.parametrize("cls,kw,dtype", [(SGD, dict(momentum=0.9, sparsity=0.5), None),
                                          (ADAM, dict(stochastic_rounding=True, history=0.5, sparsity=0.5), FP16)],
                         ids=["sgd", "adam-fp16-sr"])
def test_the_reference_backend_allocates_per_span_not_per_parameter(meter, monkeypatch, cls, kw, dtype):
    # zfkernels/reference.py: backend="torch" materializes z, masks and Philox words for one span
    # of SPAN elements at a time (measured 68-159 bytes per element, fp16 Adam with stochastic
    # rounding, history and a mask the most): bounded by the span, not by the parameters; the same
    # passes as the compiled backend. A smaller model and span: the reference is slow (each of its
    # ops passes the dispatch meter's Python mode).
    import zfkernels.reference as ref

    span = 1 << 12
    monkeypatch.setattr(ref, "SPAN", span)
    model, opt = build(cls, kw, dtype, shapes=[(32, 1024)])
    opt.step(model.loss)                 # state created with the compiled backend (the same bits)
    opt.backend = "torch"
    m = meter(lambda: opt.step(model.loss), allocator=False)
    assert m.dispatch_peak <= 192 * span
    assert m.passes(model) == [expected(opt)["passes"]] * len(model.ps)


def test_the_meters_see_a_parameter_sized_copy(meter):
    # the checks above can fail: a copy of one parameter made during a step is seen by the
    # dispatch meter, and one made below the dispatcher (as a kernel's scratch buffer would be)
    # by the allocator meter
    model, opt = build(SGD, {})
    opt.step(model.loss)
    small = model.ps[3]
    kept = []

    def clone_in_step():
        kept.append(small.detach().clone())
        return opt.step(model.loss)

    m = meter(clone_in_step)
    assert m.dispatch_peak >= small.numel() * 4 > CONSTANT
    if not _allocator_records_available():
        pytest.skip("torch's profiler has no allocation records here")
    assert m.allocator_peak >= small.numel() * 4
    kept.clear()

    def below_the_dispatcher():
        with torch._C._DisableTorchDispatch():
            kept.append(small.detach().clone())
        return opt.step(model.loss)

    m = meter(below_the_dispatcher)
    assert m.dispatch_peak <= CONSTANT < small.numel() * 4 <= m.allocator_peak


@pytest.mark.parametrize("cls,kw", [(ADAM, dict(history=0.5)), (SGD, dict(momentum=0.9))], ids=["adam", "sgd"])
def test_a_float32_state_of_bf16_parameters_loads_without_a_copy(cls, kw):
    # torch.optim's load shares a saved buffer whose dtype already matches its parameter's; a
    # float32 buffer of a bf16 parameter (state_dtype="float32") was copied instead, so loading
    # held the state twice, four times the bf16 parameters' bytes for Adam, until the caller
    # dropped the dict. Like torch's, the loaded state is the saved tensors.
    model, opt = build(cls, dict(kw, state_dtype="float32"), BF16)
    opt.step(model.loss)
    saved = copy.deepcopy(opt.state_dict())
    model2, opt2 = build(cls, dict(kw, state_dtype="float32"), BF16)
    opt2.load_state_dict(saved)
    loaded = [(t, saved["state"][i][k]) for i, p in enumerate(opt2.param_groups[0]["params"])
              for k, t in opt2.state[p].items() if k != "step"]
    assert loaded and all(t.dtype == torch.float32 for t, _ in loaded)
    assert all(t.data_ptr() == s.data_ptr() for t, s in loaded)
