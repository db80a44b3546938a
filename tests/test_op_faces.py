"""What every backend of the ops shows autograd and the caller besides the bits it computes
(docs/kernel-ops.md): the version counters of the tensors an op writes, and how it takes its
arguments (checks before anything is written, in the Python face with an empty tensor list
too; scalars beyond fp32's range; stream integers outside 32 bits).

The backends are the ones present, each on its own device: on a CPU machine the compiled
``cpu`` op, the reference (``torch``) and Triton in its interpreter; with a GPU also ``cuda``
and native Triton (and the reference on the GPU).
"""
from __future__ import annotations

import pytest
import torch

import zfkernels as zk
from conftest import backend_params
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


@pytest.mark.parametrize("op", list(OPS))
def test_an_inference_tensor_is_refused_outside_inference_mode(backend, op):
    """As torch's in-place ops: refused outside inference mode (where it has no version
    counter to bump), written inside it. The compiled and Triton ops refuse before writing."""
    be, dev = backend
    with torch.inference_mode():
        p = [torch.ones(9, device=dev)]
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
        OPS[op](p, be, dev)
    if be != "torch":                            # the reference writes with copy_, which checks after
        assert torch.equal(p[0].cpu(), torch.ones(9)), f"{op} wrote an inference tensor before refusing it"
    with torch.inference_mode():
        OPS[op](p, be, dev)
    assert not torch.equal(p[0].cpu(), torch.ones(9))


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
