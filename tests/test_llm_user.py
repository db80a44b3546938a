"""What a MeZO-style user (a language model fine-tuned in bf16 / fp16 with ZOFusedSGD /
ZOFusedAdam, docs/algorithms.md §0, §7, §11) runs into, on tiny CPU stand-ins."""
import contextlib
import re
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
    # once per optimizer (not per step or per group), when it is built: before a step moved anything
    w = torch.nn.Parameter(torch.zeros(8, dtype=torch.float16))
    v = torch.nn.Parameter(torch.zeros(8, dtype=torch.float16))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt = ZOFusedAdam([{"params": [w]}, {"params": [v]}], lr=1e-3)
        assert len(seen) == 1 and "exp_avg_sq) is float16" in str(seen[0].message)
        for _ in range(3):
            opt.step(lambda: (w.float() + v.float()).sum())
    assert len(seen) == 1
    # a model made float16 after the optimizer was built: said when v is created
    w = torch.nn.Parameter(torch.zeros(8))
    opt = ZOFusedAdam([w], lr=1e-3)
    w.data = w.data.half()
    with pytest.warns(RuntimeWarning, match=r"exp_avg_sq\) is float16"):
        opt.step(lambda: w.float().sum())


def test_the_fp16_v_warning_comes_at_the_build_for_a_group_that_keeps_some_parameters_float32():
    """A half model that keeps its norms in float32 (mixed precision's usual exception): the
    group's float16 weights get a float16 v all the same, and the warning comes when the
    optimizer is built, before a step moves anything."""
    w = torch.nn.Parameter(torch.zeros(8, dtype=torch.float16))
    norm = torch.nn.Parameter(torch.ones(8))
    with pytest.warns(RuntimeWarning, match=r"exp_avg_sq\) is float16"):
        ZOFusedAdam([w, norm], lr=1e-3)


@pytest.mark.parametrize("beta2", [0.999, 0.99])
def test_the_fp16_v_warning_names_the_gradient_below_which_v_underflows(beta2):
    """'(1 - beta2) g^2 rounds to 0 for |g| below X': below X (5% under) float16's v of one
    estimate is 0, above it (5% over) it is not: X is where the underflow starts."""
    w = torch.nn.Parameter(torch.zeros(8, dtype=torch.float16))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ZOFusedAdam([w], lr=1e-3, betas=(0.9, beta2))
    said = [str(x.message) for x in seen if "exp_avg_sq) is float16" in str(x.message)]
    assert len(said) == 1, said
    x = float(re.search(r"for \|g\| below ([0-9.e+-]+) \(beta2=", said[0]).group(1))

    def v16(g):
        return float(torch.tensor((1 - beta2) * g * g, dtype=torch.float32).half())
    assert v16(0.95 * x) == 0.0 and v16(1.05 * x) > 0.0, x


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


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


class _LoRA(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter((torch.randn(4, base.in_features) * 0.1).to(base.weight.dtype))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, 4, dtype=base.weight.dtype))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t()


@pytest.mark.parametrize("name,kw", [("zo_sgd", {}), ("zo_adam", {"state_dtype": "float32"})])
def test_a_mezo_style_bf16_run_resumes_bit_for_bit(name, kw):
    """bf16 tied-embedding Llama, the usual no-decay groups over named_parameters(), a LoRA group
    added after the build, stochastic rounding, transformers' warmup schedule, and a
    torch.save / torch.load of model, optimizer and scheduler in the middle of the run."""
    pytest.importorskip("transformers")
    import io

    from transformers import get_linear_schedule_with_warmup
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def build(seed):
        model = _tiny_llama(seed)
        named = list(model.named_parameters())
        groups = [{"params": [(n, p) for n, p in named if "norm" not in n], "weight_decay": 0.01},
                  {"params": [(n, p) for n, p in named if "norm" in n], "weight_decay": 0.0}]
        opt = create(name, groups, lr=1e-3, zo_eps=2.0 ** -8, perturbation="rademacher", stochastic_rounding=True,
                     seed=7, **kw)
        torch.manual_seed(seed + 1)
        attn = model.model.layers[0].self_attn
        attn.q_proj = _LoRA(attn.q_proj)
        opt.add_param_group({"params": [("lora.A", attn.q_proj.A), ("lora.B", attn.q_proj.B)], "weight_decay": 0.0})
        return model, opt, get_linear_schedule_with_warmup(opt, 2, 8)

    def run(resume_at=None):
        model, opt, sched = build(0)
        losses = []
        for i in range(6):
            if i == resume_at:
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
                buf.seek(0)
                saved = torch.load(buf)
                model, opt, sched = build(1)       # other weights, overwritten by the load
                model.load_state_dict(saved["model"])
                opt.load_state_dict(saved["opt"])
                sched.load_state_dict(saved["sched"])
            losses.append(float(opt.step(lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss)))
            sched.step()
        assert model.lm_head.weight is model.model.embed_tokens.weight
        return losses, [p.detach().clone() for p in model.parameters()]

    straight, resumed = run(), run(resume_at=3)
    assert straight[0] == resumed[0]
    assert all(torch.equal(a, b) for a, b in zip(straight[1], resumed[1]))
    # it trained: the (tied) embedding, the first parameter, moved
    assert not torch.equal(straight[1][0], _tiny_llama(0).model.embed_tokens.weight)
