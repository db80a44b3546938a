"""What every backend of the ops shows autograd and the caller besides the bits it computes
(docs/kernel-ops.md): the version counters of the tensors an op writes, and how it takes its
arguments (checks before anything is written, in the Python face with an empty tensor list
too; scalars beyond fp32's range; stream integers outside 32 bits; written tensors that share
memory).

The backends are the ones present, each on its own device: on a CPU machine the compiled
``cpu`` op, the reference (``torch``) and Triton in its interpreter; with a GPU also ``cuda``
and native Triton (and the reference on the GPU).
"""
from __future__ import annotations

import re

import pytest
import torch

import zfkernels as zk
from conftest import backend_params, triton_package_or_skip
from zfkernels import _compiled
from zfkernels import reference as R

BACKENDS = backend_params(reference_on_cpu=True)
COMPILED = [p for p in BACKENDS if p.values[0][0] in ("cpu", "cuda")]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# The three mutating ops through the face, on a list `p` with every buffer list in use; each
# returns the lists it writes, params first.
def _perturb(p, be, dev):
    zk.perturb_(p, 3, 0.5, "rademacher", backend=be)
    return [p]


def _sgd(p, be, dev):
    mom, hist = [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p]
    zk.zo_sgd_update_(p, [3, 4], [0.5, -0.25], lr=0.1, momentum=0.9, momentum_buffers=mom,
                      history_buffers=hist, history_alpha=0.5, restore_seed=4, restore_scale=-1e-3, backend=be)
    return [p, mom, hist]


def _adam(p, be, dev):
    m, v, hist = ([torch.zeros_like(t) for t in p] for _ in range(3))
    zk.zo_adam_update_(p, m, v, [3], [0.5], lr=1e-2, step=2, history_buffers=hist, history_alpha=0.5,
                       backend=be)
    return [p, m, v, hist]


OPS = {"perturb_": _perturb, "zo_sgd_update_": _sgd, "zo_adam_update_": _adam}


# ======================================================================================
# Autograd: every written tensor's version counter moves
# ======================================================================================
@pytest.mark.parametrize("op", list(OPS))
def test_backward_over_a_saved_param_refuses_after_the_op_writes_it(backend, op):
    """A loss that saved lin.weight for its backward, then the op writes lin.weight in place:
    backward() must raise autograd's "modified by an inplace operation" (the compiled ops and
    Triton ran it on the new weight: x.grad off by up to 0.8)."""
    be, dev = backend
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3).to(dev)
    x = torch.randn(2, 4, device=dev, requires_grad=True)
    loss = lin(x).square().sum()                 # saves lin.weight for d loss / d x
    OPS[op]([lin.weight], be, dev)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("op", list(OPS))
def test_every_written_tensor_gets_a_new_version(backend, op):
    """params and every buffer the op writes (momentum, history; exp_avgs, exp_avg_sqs),
    and the base of a written view, whose counter the view shares."""
    be, dev = backend
    base = torch.zeros(40, device=dev)
    p = [base[3:20], torch.zeros(2, 5, device=dev)]
    lists = OPS[op](p, be, dev)
    for li, ts in enumerate(lists):
        for k, t in enumerate(ts):
            assert t._version >= 1, f"{op} list {li} tensor {k}: version {t._version}, not bumped by the write"
    assert base._version >= 1, f"{op}: the base of a written view keeps its version"
    before = [t._version for t in p]
    OPS[op](p, be, dev)
    assert all(t._version > b for t, b in zip(p, before)), f"{op}: a second call left a version as it was"


def _named_call(be, op, written):
    """``op`` of backend ``be`` through zk.call_op (the registered op itself for cpu/cuda: no
    face, no no_grad) on the ``written`` lists."""
    ids = list(range(len(written[0])))
    if op == "perturb_":
        zk.call_op(be, op, params=written[0], tensor_ids=ids, seed=3, scale=0.5, dist=1)
    elif op == "zo_sgd_update_":
        zk.call_op(be, op, params=written[0], momentum_buffers=written[1], tensor_ids=ids, seeds=[3], coeffs=[0.5],
                   dist=1, lr=0.1, momentum=0.9, momentum_init=True)
    else:
        zk.call_op(be, op, params=written[0], exp_avgs=written[1], exp_avg_sqs=written[2], tensor_ids=ids,
                   seeds=[3], coeffs=[0.5], dist=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=1)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", ["leaf", "view_of_leaf", "non_leaf", "buffer"])
def test_an_op_refuses_to_write_a_tensor_that_requires_grad(backend, op, case):
    """Called with grad mode on, the registered ops wrote a leaf that requires grad (torch's
    in-place ops refuse it) and a non-leaf whose grad_fn then stayed that of its old value:
    a wrong gradient, silently; Triton wrote such a leaf too, and the reference refused in its
    first copy_, after the tensors before it were written. Now every backend refuses, naming
    the tensor, before anything is written; under no_grad (what the face and the optimizers
    do) the same call runs."""
    be, dev = backend
    leaf = torch.ones(12, device=dev, requires_grad=True)
    tensor = {"leaf": leaf, "view_of_leaf": leaf[2:9], "non_leaf": leaf * 1, "buffer": torch.ones(7, device=dev)}
    target = tensor[case]
    n_lists = {"perturb_": 1, "zo_sgd_update_": 2, "zo_adam_update_": 3}[op]
    if op == "perturb_" and case == "buffer":
        pytest.skip("perturb_ writes no buffer")
    if case == "buffer":
        written = [[torch.ones(7, device=dev)], [leaf[:7]]] + [[torch.zeros(7, device=dev)]] * (n_lists - 2)
        name = "momentum_buffers[0]" if op == "zo_sgd_update_" else "exp_avgs[0]"
    else:
        written = [[torch.ones(3, device=dev), target]] + [[torch.zeros(3, device=dev), torch.zeros_like(target)]
                                                          for _ in range(n_lists - 1)]
        name = "params[1]"
    before = [[t.detach().clone() for t in ts] for ts in written]
    with pytest.raises(RuntimeError, match=rf"zfkernels::{op}: {re.escape(name)} requires grad.*torch.no_grad\(\)"):
        _named_call(be, op, written)
    for ts, bs in zip(written, before):
        assert all(torch.equal(t.detach(), b) for t, b in zip(ts, bs)), "written before the refusal"
    with torch.no_grad():
        _named_call(be, op, written)
    assert not torch.equal(written[0][0], before[0][0])


def test_a_tensor_id_outside_32_bits_is_named_by_every_backend(backend):
    # the reference said "tensor id -1 is outside [0, 2**32)", naming no argument
    be, dev = backend
    p = torch.ones(3, device=dev)
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match=rf"tensor_ids\[1\]={bad} (is outside|must be an int in) \[0, 2\*\*32\)"):
            zk.call_op(be, "perturb_", params=[torch.ones(3, device=dev), p], tensor_ids=[0, bad], seed=1, scale=1.0,
                       dist=1)
    assert torch.equal(p, torch.ones(3, device=dev))


def test_every_backend_refuses_what_its_schema_cannot_take(backend):
    """Below the face (call_op): a float tensor id, which the reference truncated (id 1.5 ran
    tensor 1's stream), a list entry that is no tensor (the reference's AttributeError) and a
    sparse buffer (the reference called it "not contiguous"). Each is named, nothing written."""
    be, dev = backend
    p = [torch.ones(3, device=dev), torch.ones(5, device=dev)]
    base = dict(params=p, tensor_ids=[0, 1], seeds=[1], coeffs=[0.5], lr=0.1)
    bad = [
        (dict(tensor_ids=[0, 1.5]), r"tensor_ids"),
        (dict(params=[p[0], None]), r"params"),
        (dict(history_buffers=[torch.zeros(3, device=dev), torch.zeros(5, device=dev).to_sparse()]),
         r"history_buffers\[1\].*(layout|dense)"),
        (dict(momentum_buffers=[torch.zeros(3, device=dev), None], momentum=0.9), r"momentum_buffers"),
    ]
    for over, match in bad:
        with pytest.raises((TypeError, ValueError, RuntimeError), match=match):
            zk.call_op(be, "zo_sgd_update_", **{**base, **over})
        assert all(torch.equal(t, torch.ones_like(t)) for t in p), f"a refused call ({over}) wrote a param"


@pytest.mark.parametrize("op", list(OPS))
def test_an_inference_tensor_is_refused_outside_inference_mode(backend, op):
    """As torch's in-place ops: refused outside inference mode (where it has no version
    counter to bump), written inside it. Every backend refuses before writing anything: the
    reference, writing tensor by tensor with copy_, used to move params[0] and then refuse."""
    be, dev = backend
    with torch.inference_mode():
        inference = torch.ones(9, device=dev)
    p = [torch.ones(5, device=dev), inference]
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
        OPS[op](p, be, dev)
    for k, t in enumerate(p):
        assert torch.equal(t.cpu(), torch.ones_like(t, device="cpu")), f"{op} wrote params[{k}] before refusing"
    with torch.inference_mode():
        OPS[op](p, be, dev)
    assert not torch.equal(p[1].cpu(), torch.ones(9))


@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_ops_under_torch_compile_match_eager(backend):
    """The ADInplaceOrView kernels must not break tracing: fullgraph aot_eager of a function
    calling the three ops gives the eager bits and bumps the inputs' versions."""
    _, dev = backend
    ops = torch.ops.zfkernels

    def step(a, b, mom, m, v):
        ops.perturb_([a, b], [0, 1], 7, 0.25, 1, 0, 0)
        ops.zo_sgd_update_([a], [mom], [], [0], [7], [0.5], 1, 0, 0, 7, -0.25, 0.1, 0.0, 0.9, 0.0, False, False,
                           False, 0.0, False, False, 0)
        ops.zo_adam_update_([b], [m], [v], [], [1], [7], [0.5], 0, 0, 0, 0, 0.0, 1e-2, 0.9, 0.999, 1e-8, 0.0,
                            False, 1, False, 0.0, False, False, 0)
        return a.sum() + b.sum()

    torch.manual_seed(0)
    a, b = torch.randn(5, device=dev), torch.randn(3, 2, device=dev)
    eager = [a, b, torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(b)]
    traced = [t.clone() for t in eager]
    want = step(*eager)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*traced)
    assert torch.equal(got, want)
    for k, (g, w) in enumerate(zip(traced, eager)):
        assert torch.equal(g, w), f"input {k} differs from eager"
        assert g._version >= 1, f"input {k}: version not bumped under torch.compile"


def _compiled_matches_eager_with_dynamic_sizes(step, make):
    """``step`` compiled (fullgraph, aot_eager) on ``make(n)``'s tensors with size 0 of each
    marked dynamic, for two n: its outputs and the written inputs equal eager's."""
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for n in (6, 9):
        eager = make(n)
        traced = [t.clone() for t in eager]
        for t in traced:
            torch._dynamo.mark_dynamic(t, 0)
        want, got = step(*eager), compiled(*traced)
        for g, w in zip((got, *traced), (want, *eager)):
            assert torch.equal(g, w)


@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_updates_under_torch_compile_keep_dynamic_sizes_symbolic(backend):
    """The meta kernels of the updates compare each buffer's shape with its param's
    symbolically: a size marked dynamic stays dynamic. They compared sizes(), which
    specialized every size to its traced value: a recompile per param shape, and
    torch.compile refused a size marked dynamic (ConstraintViolationError)."""
    _, dev = backend
    ops = torch.ops.zfkernels

    def step(a, mom, m, v):
        ops.zo_sgd_update_([a], [mom], [], [0], [7], [0.5], 1, 0, 0, 7, -0.25, 0.1, 0.0, 0.9, 0.0, False, False,
                           False, 0.0, False, False, 0)
        ops.zo_adam_update_([a], [m], [v], [], [1], [7], [0.5], 0, 0, 0, 0, 0.0, 1e-2, 0.9, 0.999, 1e-8, 0.0,
                            False, 1, False, 0.0, False, False, 0)
        return a * 2

    def make(n):
        a = torch.randn(n, device=dev)
        return [a, torch.zeros_like(a), torch.zeros_like(a), torch.zeros_like(a)]

    _compiled_matches_eager_with_dynamic_sizes(step, make)


@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_philox_under_torch_compile_keeps_a_dynamic_n_symbolic(backend):
    """philox4x32_10's meta kernel gives the output N rows symbolically: it read N with
    size(0), which specialized it (ConstraintViolationError for an N marked dynamic)."""
    _, dev = backend
    ops = torch.ops.zfkernels
    _compiled_matches_eager_with_dynamic_sizes(
        lambda c: ops.philox4x32_10(c, 3, 4) + 1,
        lambda n: [torch.randint(0, 2**32, (n, 4), dtype=torch.int64, device=dev)])


# ======================================================================================
# Adam's betas
# ======================================================================================
BAD_BETAS = [((1.0, 0.999), "beta1"), ((0.9, 1.5), "beta2"), ((1.5, 0.999), "beta1"), ((-0.1, 0.999), "beta1"),
             ((0.9, float("nan")), "beta2"), ((0.9, 1.0), "beta2")]


@pytest.mark.parametrize("betas,name", BAD_BETAS)
def test_adam_betas_outside_0_1_are_refused_before_anything_is_written(backend, betas, name):
    """Every backend names the beta and the range (the cpu op wrote NaN into params, m and v;
    the reference and Triton crashed with ZeroDivisionError / OverflowError / complex)."""
    be, dev = backend
    p = [torch.randn(6, device=dev)]
    m, v = [torch.randn(6, device=dev)], [torch.rand(6, device=dev)]
    before = [t.clone() for t in p + m + v]
    with pytest.raises(ValueError, match=rf"{name}=.*outside \[0, 1\)"):
        zk.zo_adam_update_(p, m, v, [1], [0.5], lr=0.1, step=5000, betas=betas, backend=be)
    for t, b in zip(p + m + v, before):
        assert torch.equal(t, b), "a refused call wrote a tensor"


def test_adam_step_beyond_int64_is_refused_by_every_backend(backend):
    """docs/kernel-ops.md "Errors": ``1 <= step < 2^63`` (an int64) on every backend. The
    compiled schema cannot take 2^63; the reference and Triton ran with it (the face refuses
    it, call_op does not check). Called below the face, before anything is written."""
    be, dev = backend
    p = [torch.randn(6, device=dev)]
    m, v = [torch.randn(6, device=dev)], [torch.rand(6, device=dev)]
    before = [t.clone() for t in p + m + v]
    with pytest.raises((ValueError, RuntimeError), match="step"):
        zk.call_op(be, "zo_adam_update_", params=p, exp_avgs=m, exp_avg_sqs=v, tensor_ids=[0], seeds=[1],
                   coeffs=[0.5], lr=0.1, step=2**63)
    for t, b in zip(p + m + v, before):
        assert torch.equal(t, b), "a refused call wrote a tensor"
    zk.call_op(be, "zo_adam_update_", params=p, exp_avgs=m, exp_avg_sqs=v, tensor_ids=[0], seeds=[1],
               coeffs=[0.5], lr=0.1, step=2**63 - 1)       # the largest int64 runs
    assert torch.isfinite(p[0]).all()


def test_adam_beta_just_below_one_is_accepted_everywhere(backend):
    """The range is on the argument, not its fp32 rounding: 1 - 2^-27 (the optimizers' frozen
    move, zeroflow.optim) rounds to 1.0f and must still pass."""
    be, dev = backend
    p, m, v = [torch.randn(6, device=dev)], [torch.zeros(6, device=dev)], [torch.zeros(6, device=dev)]
    beta = 1.0 - 2.0 ** -27
    zk.zo_adam_update_(p, m, v, [1], [0.5], lr=0.1, step=1, betas=(beta, beta), backend=be)
    assert torch.isfinite(p[0]).all()


# ======================================================================================
# The face with an empty tensor list checks what it checks with tensors
# ======================================================================================
T = torch.zeros(3)
# (call(params, backend), what the error names): the call with params = [] must raise the
# same error as with one tensor
EMPTY_CASES = {
    "perturb_ seed": (lambda ps, be: zk.perturb_(ps, -1, 1.0, backend=be), "seed"),
    "perturb_ dist": (lambda ps, be: zk.perturb_(ps, 1, 1.0, dist="bogus", backend=be), "dist"),
    "perturb_ sparsity": (lambda ps, be: zk.perturb_(ps, 1, 1.0, sparsity=2.0, backend=be), "sparsity"),
    "perturb_ mask_seed": (lambda ps, be: zk.perturb_(ps, 1, 1.0, mask_seed=-2, backend=be), "mask_seed"),
    "perturb_ backend": (lambda ps, be: zk.perturb_(ps, 1, 1.0, backend="bogus"), "backend"),
    "sgd dist": (lambda ps, be: zk.zo_sgd_update_(ps, [1], [0.5], lr=0.1, dist="bogus", backend=be), "dist"),
    "sgd restore_seed": (lambda ps, be: zk.zo_sgd_update_(ps, [], [], lr=0.1, restore_seed=-5, backend=be),
                         "restore_seed"),
    "sgd round_seed": (lambda ps, be: zk.zo_sgd_update_(ps, [], [], lr=0.1, round_seed=-5, backend=be),
                       "round_seed"),
    "sgd sparsity": (lambda ps, be: zk.zo_sgd_update_(ps, [], [], lr=0.1, sparsity=-0.5, backend=be), "sparsity"),
    "sgd backend": (lambda ps, be: zk.zo_sgd_update_(ps, [], [], lr=0.1, backend="bogus"), "backend"),
    "adam step": (lambda ps, be: zk.zo_adam_update_(ps, [t.clone() for t in ps], [t.clone() for t in ps], [], [],
                                                    lr=0.1, step=0, backend=be), "step"),
    "adam betas": (lambda ps, be: zk.zo_adam_update_(ps, [t.clone() for t in ps], [t.clone() for t in ps], [], [],
                                                     lr=0.1, step=1, betas=(1.0, 0.9), backend=be), "beta1"),
    "adam dist": (lambda ps, be: zk.zo_adam_update_(ps, [t.clone() for t in ps], [t.clone() for t in ps], [], [],
                                                    lr=0.1, step=1, dist=3, backend=be), "dist"),
}


@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_face_checks_its_arguments_with_an_empty_list_too(backend, case):
    """zfkernels returned on an empty list before checking anything but seeds/coeffs and ids:
    a misconfigured optimizer whose param group happened to be empty got no error."""
    be, dev = backend
    call, name = EMPTY_CASES[case]
    with pytest.raises((ValueError, TypeError), match=name) as with_tensor:
        call([T.clone().to(dev)], be)
    with pytest.raises((ValueError, TypeError), match=name) as empty:
        call([], be)
    assert empty.type is with_tensor.type
    if "beta" not in name:                       # checked by the face itself: the same text
        assert str(empty.value) == str(with_tensor.value)


def test_face_refuses_buffers_without_params():
    """Buffers given for no params: the same refusal as buffers of another length."""
    with pytest.raises(ValueError, match="momentum_buffers"):
        zk.zo_sgd_update_([], [], [], lr=0.1, momentum_buffers=[T.clone()])
    with pytest.raises(ValueError, match="history_buffers"):
        zk.zo_sgd_update_([], [], [], lr=0.1, history_buffers=[T.clone()])
    with pytest.raises(ValueError, match="exp_avgs"):
        zk.zo_adam_update_([], [T.clone()], [], [], [], lr=0.1, step=1)


FACE_MISUSES = {
    # int() took them: id 0.9 ran as id 0, step 1.9 as 1, float counters as truncated ones
    "float_id": (lambda p: zk.perturb_(p, 3, 1.0, tensor_ids=[0.9]), TypeError,
                 r"tensor_ids\[0\]=0.9 must be an integer"),
    "bool_id": (lambda p: zk.perturb_(p, 3, 1.0, tensor_ids=[True]), TypeError, r"tensor_ids\[0\]=True"),
    "float_step": (lambda p: zk.zo_adam_update_(p, [torch.zeros(4)], [torch.zeros(4)], [3], [0.5], lr=0.1, step=1.9),
                   TypeError, "step=1.9 must be an integer"),
    "float_key": (lambda p: zk.philox4x32_10(torch.zeros(1, 4, dtype=torch.int64), (1.5, 2)), TypeError, r"key\[0\]"),
    "float_counters": (lambda p: zk.philox4x32_10(torch.tensor([[1.7, 2.2, 3.9, 0.5]]), (1, 2)), TypeError,
                       "counters must be an integer tensor"),
    # the buffers turn a feature on: its weight without them was dropped (plain SGD ran)
    "momentum_without_buffers": (lambda p: zk.zo_sgd_update_(p, [3], [0.5], lr=0.1, momentum=0.9), ValueError,
                                 "momentum=0.9 without momentum_buffers"),
    "nesterov_without_buffers": (lambda p: zk.zo_sgd_update_(p, [3], [0.5], lr=0.1, nesterov=True), ValueError,
                                 "nesterov=True without momentum_buffers"),
    "history_without_buffers": (lambda p: zk.zo_adam_update_(p, [torch.zeros(4)], [torch.zeros(4)], [3], [0.5],
                                                             lr=0.1, step=1, history_alpha=0.9),
                                ValueError, "history_alpha=0.9 without history_buffers"),
    "three_betas": (lambda p: zk.zo_adam_update_(p, [torch.zeros(4)], [torch.zeros(4)], [3], [0.5], lr=0.1, step=1,
                                                 betas=(0.9, 0.999, 0.5)), ValueError, "must be two numbers"),
}


@pytest.mark.parametrize("case", list(FACE_MISUSES))
def test_face_refuses_what_it_would_otherwise_change_or_drop(case):
    call, error, needle = FACE_MISUSES[case]
    p = [torch.ones(4)]
    with pytest.raises(error, match=needle):
        call(p)
    assert torch.equal(p[0], torch.ones(4))


def test_face_empty_lists_still_run_as_no_ops():
    zk.perturb_([], 1, 1.0)
    zk.zo_sgd_update_([], [1], [0.5], lr=0.1, momentum=0.9, backend="cpu" if _compiled.cpu_available() else "torch")
    zk.zo_adam_update_([], [], [], [], [], lr=0.1, step=1, backend="auto")
    zk.perturb_([], 1, 1.0, backend="cuda")       # a valid name; an empty list needs no device


# ======================================================================================
# Scalars beyond fp32's range
# ======================================================================================
def test_finite_coefficient_beyond_fp32_rounds_to_inf_on_every_backend(backend):
    """docs/kernel-ops.md "Scalars": rounded to fp32 once, overflow gives inf (Triton refused
    coeffs=[1e39] with "must be a float representable in float32")."""
    be, dev = backend
    for c in (1e39, -1e39, 3.4028235e38):          # the last rounds to FLT_MAX, finite
        got = [torch.randn(5, generator=torch.Generator().manual_seed(2))]
        want = [got[0].clone()]
        got = [got[0].to(dev)]
        zk.zo_sgd_update_(got, [1, 2], [c, 0.5], lr=1e-3, dist="rademacher", backend=be)
        zk.zo_sgd_update_(want, [1, 2], [c, 0.5], lr=1e-3, dist="rademacher", backend="torch")
        gb, wb = got[0].cpu().view(torch.int32), want[0].view(torch.int32)
        assert torch.equal(gb, wb), f"coeffs=[{c}]: {got[0].cpu()} != {want[0]}"


# ======================================================================================
# Stream integers outside 32 bits are refused, never wrapped
# ======================================================================================
@pytest.mark.parametrize("tensor_id", [2**32, -1, 2**40])
@pytest.mark.parametrize("sparsity", [0.5, 0.0])
def test_sparse_mask_refuses_an_id_outside_32_bits(tensor_id, sparsity):
    """sparse_mask(tensor_id=2**32) returned tensor 0's mask, -1 tensor 2**32-1's."""
    with pytest.raises(ValueError, match=r"tensor_id.*outside \[0, 2\*\*32\)"):
        zk.sparse_mask(1, 64, sparsity, tensor_id=tensor_id)
    with pytest.raises(ValueError, match=r"tensor_id.*outside \[0, 2\*\*32\)"):
        zk.perturbation(1, 64, "rademacher", tensor_id=tensor_id, sparsity=sparsity, mask_seed=1)
    assert zk.sparse_mask(1, 64, sparsity, tensor_id=2**32 - 1).shape == (64,)


def test_sparse_mask_refuses_a_bad_mask_seed_even_without_sparsity():
    with pytest.raises(ValueError, match="mask_seed"):
        zk.sparse_mask(-1, 64, 0.0)


@pytest.mark.parametrize("row", [[2**32, 0, 0, 0], [0, 0, 0, -1], [0, 2**40, 0, 0]])
def test_philox_refuses_counters_outside_32_bits(backend, row):
    """The reference masked them with 0xFFFFFFFF (backend 'torch' computed on value mod 2^32)
    where the compiled and Triton ops refuse them."""
    be, dev = backend
    c = torch.tensor([[1, 2, 3, 4], row], dtype=torch.int64, device=dev)
    with pytest.raises(ValueError, match=r"counters values must lie in \[0, 2\*\*32\)"):
        zk.philox4x32_10(c, (0, 0), backend=be)


def test_reference_philox_refuses_keys_and_counters_outside_32_bits():
    ok = torch.tensor([[1, 2, 3, 4]], dtype=torch.int64)
    with pytest.raises(ValueError, match="key0"):
        R.philox4x32_10(ok, 2**32, 0)
    with pytest.raises(ValueError, match="key1"):
        R.philox4x32_10(ok, 0, -1)
    with pytest.raises(ValueError, match="counters values"):
        R.philox4x32_10(torch.tensor([[1, 2, 3, 4]], dtype=torch.int32) - 2, 0, 0)
    assert R.philox4x32_10(torch.zeros(0, 4, dtype=torch.int64), 0, 0).shape == (0, 4)


def test_philox_of_meta_counters_gives_the_shape_as_the_compiled_meta_kernel_does():
    """backend='auto' sends meta tensors to the reference, whose range check called .item()
    on them ("Tensor.item() cannot be called on meta tensors"); perturb_ and the updates ran."""
    c = torch.zeros(3, 4, dtype=torch.int64, device="meta")
    for backend in ("auto", "torch"):
        out = zk.philox4x32_10(c, (1, 2), backend=backend)
        assert out.device.type == "meta" and out.shape == (3, 4) and out.dtype == torch.int64


# ======================================================================================
# Written tensors that share memory are refused, on every backend, before anything is written
# ======================================================================================
N = 16


def _mk(dev, n=N):
    return torch.randn(n, device=dev)


def _sgd_call(p, be, mom=(), hist=()):
    zk.zo_sgd_update_(p, [1, 2], [0.5, -0.25], lr=0.1, momentum=0.9 if mom else 0.0, momentum_buffers=list(mom),
                      history_buffers=list(hist), history_alpha=0.5 if hist else 0.0, restore_seed=1,
                      restore_scale=-0.5, backend=be)


def _adam_call(p, m, v, be, hist=()):
    zk.zo_adam_update_(p, m, v, [1], [0.5], lr=0.1, step=3, history_buffers=list(hist),
                       history_alpha=0.5 if hist else 0.0, restore_seed=1, restore_scale=-0.5, backend=be)


def _alias_cases():
    """name -> make(dev) -> (call(backend), every tensor the call could write, the pair the error
    names). Before the check every backend accepted these and wrote other bits."""
    def sgd_param_is_mom(dev):
        p = _mk(dev)
        return lambda be: _sgd_call([p], be, mom=[p]), [p], ("momentum_buffers", 0, "params", 0)

    def sgd_param_is_hist(dev):
        p = _mk(dev)
        return lambda be: _sgd_call([p], be, hist=[p]), [p], ("history_buffers", 0, "params", 0)

    def sgd_hist_is_mom(dev):
        p, b = _mk(dev), _mk(dev)
        return lambda be: _sgd_call([p], be, mom=[b], hist=[b]), [p, b], ("history_buffers", 0, "momentum_buffers", 0)

    def sgd_mom_is_other_param(dev):
        p0, p1, b0 = _mk(dev), _mk(dev), _mk(dev)
        return (lambda be: _sgd_call([p0, p1], be, mom=[b0, p0]), [p0, p1, b0],
                ("momentum_buffers", 1, "params", 0))

    def sgd_mom_shared(dev):
        p0, p1, b = _mk(dev), _mk(dev), _mk(dev)
        return (lambda be: _sgd_call([p0, p1], be, mom=[b, b]), [p0, p1, b],
                ("momentum_buffers", 1, "momentum_buffers", 0))

    def sgd_param_twice_parallel(dev):
        # 2 x 2^16 elements: the cpu op runs its chunks on the thread pool (a race, not only other bits)
        p = torch.randn(1 << 16, device=dev)
        return lambda be: _sgd_call([p, p], be), [p], ("params", 1, "params", 0)

    def sgd_buffer_overlaps_param_view(dev):
        base = torch.randn(2 * N, device=dev)
        p, b = base[:N], base[N // 2:N // 2 + N]
        return lambda be: _sgd_call([p], be, mom=[b]), [base], ("momentum_buffers", 0, "params", 0)

    def sgd_fp32_buffer_over_bf16_param(dev):
        # other dtypes, shared bytes: an fp32 buffer whose first bytes are the bf16 param's last
        base = torch.randn(2 * N, device=dev)
        p = base[:N // 2].view(torch.bfloat16)             # N bf16 elements: bytes [0, 2N)
        b = base[N // 4:N // 4 + N]                        # N fp32 elements: bytes [N, 5N)
        return lambda be: _sgd_call([p], be, mom=[b]), [base], ("momentum_buffers", 0, "params", 0)

    def adam_m_is_param(dev):
        p, v = _mk(dev), _mk(dev).abs()
        return lambda be: _adam_call([p], [p], [v], be), [p, v], ("exp_avgs", 0, "params", 0)

    def adam_v_is_param(dev):
        p, m = _mk(dev), _mk(dev)
        return lambda be: _adam_call([p], [m], [p], be), [p, m], ("exp_avg_sqs", 0, "params", 0)

    def adam_m_is_v(dev):
        p, m = _mk(dev), _mk(dev).abs()
        return lambda be: _adam_call([p], [m], [m], be), [p, m], ("exp_avg_sqs", 0, "exp_avgs", 0)

    def adam_hist_is_param(dev):
        p, m, v = _mk(dev), _mk(dev), _mk(dev).abs()
        return lambda be: _adam_call([p], [m], [v], be, hist=[p]), [p, m, v], ("history_buffers", 0, "params", 0)

    def adam_hist_is_m(dev):
        p, m, v = _mk(dev), _mk(dev), _mk(dev).abs()
        return lambda be: _adam_call([p], [m], [v], be, hist=[m]), [p, m, v], ("history_buffers", 0, "exp_avgs", 0)

    def adam_far_apart(dev):
        # the pair is far apart in the call (first param, last list): found by the sorted ranges
        ps = [_mk(dev) for _ in range(5)]
        m, v, h = ([_mk(dev).abs() for _ in ps] for _ in range(3))
        h[4] = ps[0]
        return (lambda be: _adam_call(ps, m, v, be, hist=h), ps + m + v + h[:4],
                ("history_buffers", 4, "params", 0))

    def perturb_param_twice(dev):
        p = _mk(dev)
        return lambda be: zk.perturb_([p, p], 1, 0.5, backend=be), [p], ("params", 1, "params", 0)

    def perturb_overlapping_views(dev):
        base = _mk(dev, 3 * N)
        views = [base[:N], base[2 * N:], base[N // 2:N // 2 + N]]   # the third overlaps the first
        return lambda be: zk.perturb_(views, 1, 0.5, backend=be), [base], ("params", 2, "params", 0)

    return {f.__name__: f for f in (
        sgd_param_is_mom, sgd_param_is_hist, sgd_hist_is_mom, sgd_mom_is_other_param, sgd_mom_shared,
        sgd_param_twice_parallel, sgd_buffer_overlaps_param_view, sgd_fp32_buffer_over_bf16_param, adam_m_is_param,
        adam_v_is_param, adam_m_is_v, adam_hist_is_param, adam_hist_is_m, adam_far_apart, perturb_param_twice,
        perturb_overlapping_views)}


ALIAS_CASES = _alias_cases()


def _overlap_text(name, k, other, j):
    return (f"{name}[{k}] overlaps {other}[{j}] in memory (the same tensor, or views of one storage); every tensor "
            "an op writes needs memory of its own, or the backends would write different bits: pass each param "
            "once and give each buffer its own storage (e.g. torch.zeros_like(param))")


@pytest.mark.parametrize("case", list(ALIAS_CASES))
def test_written_tensors_sharing_memory_are_refused_before_anything_is_written(backend, case):
    """docs/kernel-ops.md "Errors": every backend refuses the call with the same words, naming
    the pair, and writes nothing (before: accepted, and the cpu op, the reference and Triton each
    wrote other bits; one tensor twice raced on the cpu thread pool and on GPUs)."""
    be, dev = backend
    call, tensors, (name, k, other, j) = ALIAS_CASES[case](dev)
    before = [t.clone() for t in tensors]
    with pytest.raises(ValueError) as err:
        call(be)
    msg = str(err.value)
    assert msg.endswith(": " + _overlap_text(name, k, other, j)), msg
    assert msg.split(": ")[0] in ("zfkernels", "perturb_", "zo_sgd_update_", "zo_adam_update_"), msg
    for t, b in zip(tensors, before):
        assert torch.equal(t.view(torch.uint8), b.view(torch.uint8)), f"{case}: a refused call wrote a tensor"


def _touching(dev):
    """Eight views of one storage that touch and never overlap (two params and their buffers),
    and a zero-element view inside the first."""
    base = torch.randn(8 * N, device=dev)
    views = [base[i * N:(i + 1) * N] for i in range(8)]
    for v in views[2:]:
        v.abs_()                                   # Adam's v >= 0
    return views, base[N // 2:N // 2]


@pytest.mark.parametrize("op", ["perturb_", "zo_sgd_update_", "zo_adam_update_"])
def test_touching_views_of_one_storage_are_accepted_and_give_the_separate_tensors_bits(backend, op):
    """The refusal is on shared bytes, not on shared storage: views that only touch give the
    bits of separately allocated tensors (the reference on CPU copies)."""
    be, dev = backend
    views, empty = _touching(dev)
    copies = [v.cpu().clone() for v in views]

    def run(ts, e, b):      # e: a zero-element tensor, the same one in every list (it overlaps nothing)
        p = [ts[0], e, ts[1]]
        if op == "perturb_":
            zk.perturb_(p, 1, 0.5, backend=b)
        elif op == "zo_sgd_update_":
            _sgd_call(p, b, mom=[ts[2], e, ts[3]], hist=[ts[4], e, ts[5]])
        else:
            _adam_call(p, [ts[2], e, ts[3]], [ts[4], e, ts[5]], b, hist=[ts[6], e, ts[7]])

    run(views, empty, be)
    run(copies, torch.zeros(0), "torch")
    for k, (v, c) in enumerate(zip(views, copies)):
        assert torch.equal(v.cpu().view(torch.int32), c.view(torch.int32)), f"{op}: view {k} differs"


@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_meta_kernels_refuse_shared_storage_and_accept_separate_tensors(backend):
    """The meta kernels (torch.compile's fake tensors) run the same check on meta tensors, whose
    data pointers are all null: placed by storage and offset, separate tensors do not collide."""
    ops = torch.ops.zfkernels
    a, b = torch.empty(N, device="meta"), torch.empty(N, device="meta")
    ops.perturb_([a, b], [0, 1], 1, 0.5, 1, 0, 0)
    base = torch.empty(2 * N, device="meta")
    ops.perturb_([base[:N], base[N:]], [0, 1], 1, 0.5, 1, 0, 0)
    with pytest.raises(ValueError, match=r"params\[1\] overlaps params\[0\]"):
        ops.perturb_([a, a], [0, 1], 1, 0.5, 1, 0, 0)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] overlaps exp_avgs\[0\]"):
        ops.zo_adam_update_([a], [b], [b], [], [0], [1], [0.5], 1, 0, 0, 0, 0.0, 1e-2, 0.9, 0.999, 1e-8, 0.0,
                            False, 1, False, 0.0, False, False, 0)
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] overlaps params\[0\]"):
        ops.zo_sgd_update_([base[:N]], [base[N - 1:2 * N - 1]], [], [0], [1], [0.5], 1, 0, 0, 0, 0.0, 0.1, 0.0, 0.9,
                           0.0, False, False, False, 0.0, False, False, 0)


def test_python_check_places_meta_tensors_by_storage():
    """zfkernels/_overlap.py (the reference and Triton; the SASS census runs Triton's host code
    on meta tensors): the same rule on meta tensors as the meta kernels."""
    from zfkernels._overlap import overlapping_pair

    a, b = torch.empty(N, device="meta"), torch.empty(N, device="meta")
    assert overlapping_pair([("params", [a, b]), ("exp_avgs", [b[N:], a[N:]])]) is None
    assert overlapping_pair([("params", [a[:4], a[4:]])]) is None
    assert overlapping_pair([("params", [a, b]), ("exp_avgs", [b[2:], torch.empty(N - 2, device="meta")])]) == (
        ("exp_avgs", 0), ("params", 1))


PHILOX_FIXES = {
    # each refusal names the argument, what it got and what to give, in the same words on every
    # backend after its prefix ("zfkernels: ", Triton's "philox4x32_10: "): they said only what
    # was wrong ("counters values must lie in [0, 2**32)")
    "counters": (dict(counters=torch.tensor([[1, 2, 3, 4], [-1, 0, 0, 2**32]]), key0=1, key1=2),
                 "counters values must lie in [0, 2**32), got values from -1 to 4294967296; each value is one "
                 "32-bit word of a counter: split a wider counter n over the words, e.g. (n & 0xFFFFFFFF, n >> 32, "
                 "0, 0)"),
    "key0": (dict(counters=torch.zeros(1, 4, dtype=torch.int64), key0=2**32, key1=2),
             "key0=4294967296 must be a 32-bit unsigned integer in [0, 2**32); give one 32-bit word of the key, "
             "e.g. key0 = seed & 0xFFFFFFFF and key1 = seed >> 32 for a 64-bit seed"),
    "key1": (dict(counters=torch.zeros(1, 4, dtype=torch.int64), key0=1, key1=-1),
             "key1=-1 must be a 32-bit unsigned integer in [0, 2**32); give one 32-bit word of the key, "
             "e.g. key0 = seed & 0xFFFFFFFF and key1 = seed >> 32 for a 64-bit seed"),
    "shape": (dict(counters=torch.zeros(2, 3, dtype=torch.int64), key0=1, key1=2),
              "counters must have shape [N, 4], got [2, 3]; give one row of four 32-bit counter words "
              "(c0, c1, c2, c3) per output row"),
}


@pytest.mark.parametrize("case", list(PHILOX_FIXES))
def test_philox_refusals_say_the_fix_on_every_backend(backend, case):
    be, dev = backend
    args, want = PHILOX_FIXES[case]
    args = dict(args, counters=args["counters"].to(dev))
    with pytest.raises(ValueError) as err:
        zk.call_op(be, "philox4x32_10", **args)
    assert str(err.value).split(": ", 1)[1] == want, str(err.value)
    # each backend's own prefix, the same for all its refusals (Triton's names its op)
    assert str(err.value).startswith("philox4x32_10: " if be == "triton" else "zfkernels: "), str(err.value)
    with pytest.raises(ValueError, match=r"has dtype .*; use an int64 tensor \(values in \[0, 2\*\*32\)\), "
                                         r"e\.g\. counters\.to\(torch\.int64\)"):
        zk.call_op(be, "philox4x32_10", counters=torch.zeros(1, 4, device=dev), key0=1, key1=2)


def test_philox_face_refusals_say_the_fix():
    ok = torch.zeros(1, 4, dtype=torch.int64)
    split = r"a 64-bit seed is key=\(seed & 0xFFFFFFFF, seed >> 32\)"
    with pytest.raises(TypeError, match=rf"key=7 must be a pair \(k0, k1\) of 32-bit unsigned integers; {split}"):
        zk.philox4x32_10(ok, 7)
    with pytest.raises(ValueError, match=rf"key\[1\]=-1 must be a 32-bit unsigned integer in \[0, 2\*\*32\); give one "
                                         rf"32-bit word of the key in each entry \({split}\)"):
        zk.philox4x32_10(ok, (1, -1))
    with pytest.raises(TypeError, match=r"got list; give torch\.tensor\(rows, dtype=torch\.int64\), one row of four "
                                        r"32-bit counter words per output row"):
        zk.philox4x32_10([[1, 2, 3, 4]], (1, 2))
    with pytest.raises(TypeError, match=r"truncated to another one; build the counters as integers "
                                        r"\(dtype=torch\.int64\), each value in \[0, 2\*\*32\)"):
        zk.philox4x32_10(ok.float(), (1, 2))


def test_philox_refusals_check_dtype_before_shape_and_take_the_bounds_on_every_backend(backend):
    # the compiled ops check the dtype first (csrc/ops_common.h check_counters): a float [2, 3]
    # is named for its dtype everywhere; 0 and 2**32 - 1 are counter words and key words
    be, dev = backend
    with pytest.raises(ValueError, match=r"has dtype .*; use an int64 tensor"):
        zk.call_op(be, "philox4x32_10", counters=torch.zeros(2, 3, device=dev), key0=1, key1=2)
    edge = torch.tensor([[0, 2**32 - 1, 0, 2**32 - 1]], device=dev)
    got = zk.call_op(be, "philox4x32_10", counters=edge, key0=2**32 - 1, key1=0)
    assert torch.equal(got.cpu(), R.philox4x32_10(edge.cpu(), 2**32 - 1, 0))


def test_philox_backends_refuse_a_sparse_counters_tensor_by_name(backend):
    # the reference ran aten::min on it (NotImplementedError: "Could not run 'aten::min' with
    # arguments from the 'SparseCPU' backend"), the compiled ops' dispatcher sent it to the
    # composite kernel ("no compiled philox4x32_10 kernel for device cpu", where there is one),
    # the face's .contiguous() said "unsupported memory format option Contiguous"; each names
    # the layout and what to give, as Triton's op did
    be, dev = backend
    sparse = torch.zeros(2, 4, dtype=torch.int64, device=dev).to_sparse()
    dense = r"counters must be a dense tensor; give a strided one \(counters\.to_dense\(\)\)"
    with pytest.raises(ValueError, match=dense):
        zk.call_op(be, "philox4x32_10", counters=sparse, key0=1, key1=2)
    with pytest.raises(ValueError, match=dense):
        zk.philox4x32_10(sparse, (1, 2), backend=be)


def test_philox_triton_op_refuses_a_bool_key():
    # True is an int to Python: the Triton op refuses it by name rather than take it as key 1
    # (host code only: a skip, with its reason, where the interpreter cannot run the kernels)
    TP = triton_package_or_skip().philox
    with pytest.raises(ValueError, match=r"key0=True must be an int \(a 32-bit unsigned integer\)"):
        TP.philox4x32_10(torch.zeros(1, 4, dtype=torch.int64), True, 2)
