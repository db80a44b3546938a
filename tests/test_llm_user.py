"""What a MeZO-style user (a language model fine-tuned in bf16 / fp16 with ZOFusedSGD /
ZOFusedAdam, docs/algorithms.md §0, §7, §11) runs into, on tiny CPU stand-ins."""
import contextlib
import warnings

import pytest
import torch

from zeroflow.optim import ZOFusedAdam, create


def _flat_fp16_run(dtype, **kw):
    """One ZO-Adam step on a weight whose loss is nearly flat (the estimate g = c z is ~1e-3,
    below the ~5.5e-3 where (1 - beta2) g^2 underflows float16); returns the largest move."""
    w = torch.nn.Parameter(torch.full((256,), 0.5, dtype=dtype))
    start = w.detach().float().clone()
    opt = ZOFusedAdam([w], lr=1e-3, zo_eps=2.0 ** -6, perturbation="rademacher", seed=3, **kw)
    opt.step(lambda: (w.float() * 1e-5).sum())
    return float((w.detach().float() - start).abs().max())


def test_zo_adam_warns_once_that_float16_v_underflows_and_names_state_dtype():
    # v = fp16((1 - beta2) g^2) = 0 while m = 0.1 g is not: the first step moved those
    # coordinates by lr |g| / eps (~0.1 here, 100x lr), silently
    with pytest.warns(RuntimeWarning, match=r"exp_avg_sq\) is float16.*state_dtype='float32'"):
        moved = _flat_fp16_run(torch.float16)
    assert moved > 50 * 1e-3
    # float32 state: Adam's first step moves each coordinate by about lr, and nothing is said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _flat_fp16_run(torch.float16, state_dtype="float32") <= 2 * 1e-3
        assert _flat_fp16_run(torch.bfloat16) <= 2 * 1e-3    # bf16 has float32's range: v does not underflow
    # once per optimizer, not per step or per group
    w = torch.nn.Parameter(torch.zeros(8, dtype=torch.float16))
    v = torch.nn.Parameter(torch.zeros(8, dtype=torch.float16))
    opt = ZOFusedAdam([{"params": [w]}, {"params": [v]}], lr=1e-3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(lambda: (w.float() + v.float()).sum())
    assert sum("exp_avg_sq) is float16" in str(x.message) for x in seen) == 1


def test_forward_grad_names_inference_mode_in_the_closure_and_the_fix():
    # MeZO-style closures run the forward under torch.inference_mode(); the ZO estimators take
    # it, forward_grad's jvp cannot, and torch said only "Cannot set version_counter for
    # inference tensor"
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 1)
    x = torch.randn(8, 4)
    start = [p.detach().clone() for p in lin.parameters()]

    def closure():
        with torch.inference_mode():
            return lin(x).pow(2).mean()

    opt = create("forward_grad", lin.parameters(), model=lin, lr=1e-2, seed=1)
    with pytest.raises(RuntimeError, match="inference tensor") as e:
        opt.step(closure)
    note = " ".join(getattr(e.value, "__notes__", []))
    assert "torch.inference_mode() inside the closure" in note and "torch.no_grad()" in note
    assert all(torch.equal(p, s) for p, s in zip(lin.parameters(), start))
    # the fix the note gives: the same directional derivative as a closure without a context
    d = []
    for ctx in (torch.no_grad, contextlib.nullcontext):
        opt = create("forward_grad", lin.parameters(), model=lin, lr=0.0, seed=1)

        def closure_with(ctx=ctx):
            with ctx():
                return lin(x).pow(2).mean()

        opt.step(closure_with)
        d.append(opt.last_projected)
    assert d[0] == d[1] and d[0][0] != 0.0
    # and the finite-difference estimators take inference_mode as it is
    assert torch.isfinite(create("zo_sgd", lin.parameters(), lr=1e-2).step(closure))


def test_a_wholly_frozen_model_is_refused_with_the_fix():
    # forward-only training invites model.requires_grad_(False); the optimizer trains only
    # parameters that require grad, and the error said what was missing but not what to do
    model = torch.nn.Linear(4, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameter with requires_grad=True.*requires_grad_\(True\).*no_grad"):
        create("zo_sgd", model.parameters(), lr=1e-3)
