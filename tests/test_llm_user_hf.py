"""A MeZO-style user of transformers models (tiny, random weights, built from configs): what they
hit passing a model, tied weights, or resizing the vocabulary after the optimizer was built."""
import pytest
import torch

from zeroflow.optim import FOAdam, FOSGD, HybridFOZO, ZOFusedAdam, ZOFusedSGD, create

transformers = pytest.importorskip("transformers")


def _tiny_llama(tie: bool = True, dtype=torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(dtype).eval()


_IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _loss(model):
    return lambda: model(input_ids=_IDS, labels=_IDS).loss.float()


@pytest.mark.parametrize("build", [
    lambda m: create("zo_sgd", m, lr=1e-3),
    lambda m: create("zo_adam", m, lr=1e-3),
    lambda m: create("zo_sgd", m, lr=1e-3, hybrid_switch=2),
    lambda m: create("fo_adam", m, lr=1e-3),
    lambda m: ZOFusedSGD(m, lr=1e-3),
    lambda m: ZOFusedAdam(m),
    lambda m: FOSGD(m),
    lambda m: FOAdam(m),
    lambda m: create("zo_sgd", [{"params": m}], lr=1e-3),
    lambda m: create("fo_sgd", [{"params": m}], lr=1e-3),
    lambda m: create("zo_sgd", [{"params": m}], lr=1e-3, hybrid_switch=1),
    lambda m: create("zo_sgd", [m.lm_head.weight], lr=1e-3).add_param_group({"params": m}),
    lambda m: create("fo_sgd", [m.lm_head.weight], lr=1e-3).add_param_group({"params": m}),
    lambda m: create("zo_sgd", [m.lm_head.weight], lr=1e-3, hybrid_switch=1).add_param_group({"params": m}),
], ids=["zo_sgd", "zo_adam", "hybrid", "fo_adam", "ZOFusedSGD", "ZOFusedAdam", "FOSGD", "FOAdam", "zo group",
        "fo group", "hybrid group", "zo add_param_group", "fo add_param_group", "hybrid add_param_group"])
def test_a_model_given_as_params_is_refused_naming_params_and_the_fix(build):
    # create("zo_sgd", model): torch said only "'LlamaForCausalLM' object is not iterable"
    model = _tiny_llama()
    with pytest.raises(TypeError, match=r"params'?\]? is a LlamaForCausalLM.*torch\.nn\.Module.*model\.parameters\(\)"):
        build(model)
    # as torch.optim's: a TypeError, and the same optimizer built from model.parameters() works
    assert isinstance(create("zo_sgd", model.parameters(), lr=1e-3), ZOFusedSGD)
    assert isinstance(create("zo_sgd", model.parameters(), lr=1e-3, hybrid_switch=1), HybridFOZO)


def test_a_tied_weight_given_twice_is_refused_by_name_with_the_fix():
    # tie_word_embeddings=True: lm_head.weight is model.embed_tokens.weight. model.parameters() and
    # named_parameters() list it once; named_parameters(remove_duplicate=False) twice. Perturbed
    # twice a query (2 eps z) and updated twice, the estimate would be wrong: refused, but as
    # "parameter 20 of param group 0 overlaps parameter 0", which named neither tensor
    model = _tiny_llama()
    named = list(model.named_parameters(remove_duplicate=False))
    with pytest.raises(ValueError, match=r"parameter 20 \('lm_head\.weight'\) of param group 0 overlaps parameter 0 "
                                         r"\('model\.embed_tokens\.weight'\) .*tied.*named_parameters\(\) list a tied"):
        create("zo_sgd", named, lr=1e-3)
    # unnamed: by index, and the same advice
    with pytest.raises(ValueError, match=r"parameter 20 of param group 0 overlaps parameter 0 .*tied.*parameters\(\)"):
        create("zo_sgd", [p for _, p in named], lr=1e-3)
    # the HF recipe over remove_duplicate=False, with the two names in two groups: torch.optim said only
    # "some parameters appear in more than one parameter group", naming none
    decay = [(n, p) for n, p in named if "embed" not in n and "norm" not in n]
    no_decay = [(n, p) for n, p in named if "embed" in n or "norm" in n]
    for build in (lambda gs: create("zo_sgd", gs, lr=1e-3), lambda gs: create("zo_adam", gs, lr=1e-3),
                  lambda gs: create("zo_sgd", gs, lr=1e-3, hybrid_switch=1)):
        with pytest.raises(ValueError, match=r"some parameters appear in more than one parameter group: "
                                             r"parameter 0 \('model\.embed_tokens\.weight'\) of the new param group "
                                             r"1 is parameter \d+ \('lm_head\.weight'\) of param group 0.*tied.*"
                                             r"named_parameters\(\) list a tied"):
            build([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}])
    opt = create("zo_sgd", [p for n, p in named if "embed" not in n], lr=1e-3)
    with pytest.raises(ValueError, match=r"more than one parameter group: parameter 0 of the new param group 1 is "
                                         r"parameter 19 of param group 0"):
        opt.add_param_group({"params": [model.model.embed_tokens.weight]})
    assert len(opt.param_groups) == 1
    hyb = create("zo_sgd", [(n, p) for n, p in named if "embed" not in n], lr=1e-3, hybrid_switch=1)
    with pytest.raises(ValueError, match=r"more than one parameter group: parameter 0 \('model\.embed_tokens\."
                                         r"weight'\) of the new param group 1 is parameter 19 \('lm_head\.weight'\) "
                                         r"of param group 0"):
        hyb.add_param_group({"params": [("model.embed_tokens.weight", model.model.embed_tokens.weight)]})
    assert [len(o.param_groups) for o in (hyb, hyb.fo, hyb.zo)] == [1, 1, 1]
    # deduplicated, it trains the one tensor once per query
    opt = create("zo_sgd", model.named_parameters(), lr=1e-3, seed=1)
    opt.step(_loss(model))
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("name,kw,buffer", [
    ("zo_adam", {}, "exp_avg"), ("zo_sgd", {"momentum": 0.9}, "momentum_buffer"),
    ("zo_sgd", {"history": 0.5}, "history")])
def test_resizing_the_embedding_after_the_optimizer_names_the_parameter_and_the_fix(name, kw, buffer):
    # transformers' resize_token_embeddings resizes the input embedding in place (the same Parameter,
    # .data replaced): its Adam / momentum / history state keeps the old shape, and the next step's
    # update said only "zfkernels: exp_avgs[0] has shape [64, 32] but params[0] has shape [80, 32]"
    # (params[0] of the kernel's list, not the optimizer's parameter), and nothing of the fix
    model = _tiny_llama()
    opt = create(name, model.named_parameters(), lr=1e-3, seed=1, **kw)
    opt.step(_loss(model))
    model.resize_token_embeddings(80, mean_resizing=False)
    with pytest.raises(ValueError, match="buffers must match their param") as e:
        opt.step(_loss(model))
    note = " ".join(getattr(e.value, "__notes__", []))
    assert (f"parameter 0 ('model.embed_tokens.weight') of param group 0 is (80, 32) now, its {buffer} (64, 32)"
            in note), note
    assert "resize_token_embeddings" in note and "build the optimizer after resizing" in note
    # the fix the note gives: built after resizing, it steps
    opt = create(name, model.named_parameters(), lr=1e-3, seed=1, **kw)
    opt.step(_loss(model))
    assert opt.state[model.model.embed_tokens.weight][buffer].shape == (80, 32)


def test_zo_sgd_without_state_trains_an_embedding_resized_in_place():
    # no buffer to outgrow: the tied embedding keeps its tensor, and z follows its new shape
    model = _tiny_llama()
    opt = create("zo_sgd", model.parameters(), lr=1e-2, seed=1)
    opt.step(_loss(model))
    model.resize_token_embeddings(80, mean_resizing=False)
    before = model.model.embed_tokens.weight.detach().clone()
    opt.step(_loss(model))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(before[64:], model.model.embed_tokens.weight[64:])


@pytest.mark.filterwarnings("ignore::FutureWarning")     # transformers 5: gradient_checkpointing_* renamed
def test_forward_grad_names_hugging_face_s_input_require_grads_hook_and_the_fix():
    # gradient_checkpointing_enable() (or enable_input_require_grads(), PEFT's preparation) registers a
    # forward hook that calls requires_grad_() on the input embeddings' output, which torch.func.jvp
    # refuses: torch said only "You are attempting to call Tensor.requires_grad_() ... inside of a
    # function being transformed by a functorch transform", no note (gradient_checkpointing_disable()
    # leaves the hook in place)
    model = _tiny_llama()
    expected = create("forward_grad", model.parameters(), model=model, lr=0.0, seed=5)
    expected.step(_loss(model))
    for prepare in ("gradient_checkpointing_enable", "enable_input_require_grads"):
        model = _tiny_llama()
        getattr(model, prepare)()
        start = [p.detach().clone() for p in model.parameters()]
        opt = create("forward_grad", model.parameters(), model=model, lr=1e-3, seed=5)
        with pytest.raises(RuntimeError, match=r"requires_grad_\(\)") as e:
            opt.step(_loss(model))
        note = " ".join(getattr(e.value, "__notes__", []))
        assert "model.disable_input_require_grads()" in note and "two_side" in note, note
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
        # the fix the note gives: the same directional derivative as the model without the hook
        model.disable_input_require_grads()
        opt = create("forward_grad", model.parameters(), model=model, lr=0.0, seed=5)
        opt.step(_loss(model))
        assert opt.last_projected == expected.last_projected


@pytest.mark.parametrize("name", ["zo_sgd", "zo_sgd_conserve", "forward_grad", "fo_adam"])
def test_a_closure_returning_the_model_output_is_told_to_return_its_loss(name):
    # lambda: model(**batch) (the output, not .loss), the usual first closure of a Hugging Face user:
    # the ZO steps said "returned an object of type ...CausalLMOutputWithPast", forward_grad "a number
    # carries no derivative; return loss, not loss.item()" (no number was returned), and train_step's
    # first-order step "the closure must return a scalar loss tensor", none naming .loss or labels
    from zeroflow.optim import train_step
    model = _tiny_llama()
    opt = create(name, model.parameters(), model=model, lr=1e-3, seed=1)
    with pytest.raises((TypeError, ValueError), match=r"CausalLMOutputWithPast.*return its loss, e\.g\. "
                                                      r"lambda: model\(\*\*batch\)\.loss"):
        train_step(opt, lambda: model(input_ids=_IDS, labels=_IDS))
    with pytest.raises((TypeError, ValueError), match=r"CausalLMOutputWithPast.*loss is None.*labels"):
        train_step(opt, lambda: model(input_ids=_IDS))
    # the fix: it steps
    assert train_step(opt, lambda: model(input_ids=_IDS, labels=_IDS).loss) > 0
    if name == "forward_grad":      # a number still gets the advice that fits it
        with pytest.raises(TypeError, match=r"returned float\): a number carries no derivative"):
            opt.step(lambda: float(model(input_ids=_IDS, labels=_IDS).loss))


@pytest.mark.parametrize("tie", [True, False])
def test_a_run_saved_with_save_pretrained_resumes_bit_for_bit(tie, tmp_path):
    """model.save_pretrained + torch.save of the optimizer's and the scheduler's state mid-run, the
    model then from_pretrained (safetensors: a tied weight stored once), the optimizer built anew
    over it and loaded: the same losses and bits as the run that went straight on. (Every model
    comes from from_pretrained: one built with .to(bfloat16) holds its rotary inv_freq in bf16,
    from_pretrained(dtype=bfloat16) in float32, another forward, whatever the optimizer does.)"""
    from transformers import LlamaForCausalLM, get_linear_schedule_with_warmup
    _tiny_llama(tie=tie, dtype=torch.bfloat16).save_pretrained(tmp_path / "start")

    def build(path):
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        named = list(model.named_parameters())
        groups = [{"params": [(n, p) for n, p in named if "norm" not in n], "weight_decay": 0.1},
                  {"params": [(n, p) for n, p in named if "norm" in n], "weight_decay": 0.0}]
        opt = create("zo_adam", groups, lr=1e-3, zo_eps=2.0 ** -8, stochastic_rounding=True, state_dtype="float32",
                     decoupled_weight_decay=True, seed=3)
        return model, opt, get_linear_schedule_with_warmup(opt, 2, 10)

    def run(resume_at=None):
        model, opt, sched = build(tmp_path / "start")
        losses = []
        for i in range(5):
            if i == resume_at:
                model.save_pretrained(tmp_path / "mid")
                torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "mid" / "opt.pt")
                model, opt, sched = build(tmp_path / "mid")
                saved = torch.load(tmp_path / "mid" / "opt.pt")
                opt.load_state_dict(saved["opt"])
                sched.load_state_dict(saved["sched"])
            losses.append(float(opt.step(_loss(model))))
            sched.step()
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
        return losses, [p.detach().clone() for p in model.parameters()]

    straight, resumed = run(), run(resume_at=2)
    assert straight[0] == resumed[0]
    assert all(torch.equal(a, b) for a, b in zip(straight[1], resumed[1]))


@pytest.mark.parametrize("name", ["fo_sgd", "fo_adam"])
def test_the_fo_baselines_refuse_a_tied_weight_given_twice(name):
    # torch.optim only warns ("optimizer contains a parameter group with duplicate parameters") and
    # then updates the tensor twice a step: fo_sgd moved a tied embedding by 2 lr g, the baseline a
    # sweep compares the ZO methods with (which refuse the list) at twice its lr there
    model = _tiny_llama()
    named = list(model.named_parameters(remove_duplicate=False))
    with pytest.raises(ValueError, match=r"parameter 20 \('lm_head\.weight'\) of param group 0 is parameter 0 "
                                         r"\('model\.embed_tokens\.weight'\).*tied.*named_parameters\(\) list a tied"):
        create(name, named, lr=1e-3)
    with pytest.raises(ValueError, match=r"parameter 20 of param group 0 is parameter 0 .*updates it twice"):
        create(name, [p for _, p in named], lr=1e-3)
    # the no-decay recipe over remove_duplicate=False: the two names in two groups, which torch.optim
    # refused as "some parameters appear in more than one parameter group", naming neither
    decay = [(n, p) for n, p in named if "embed" not in n and "norm" not in n]
    no_decay = [(n, p) for n, p in named if "embed" in n or "norm" in n]
    with pytest.raises(ValueError, match=r"some parameters appear in more than one parameter group: "
                                         r"parameter 0 \('model\.embed_tokens\.weight'\) of the new param group "
                                         r"1 is parameter \d+ \('lm_head\.weight'\) of param group 0.*tied"):
        create(name, [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)
    opt = create(name, [p for n, p in named if "embed" not in n], lr=1e-3)
    with pytest.raises(ValueError, match=r"more than one parameter group: parameter 0 of the new param group 1 is "
                                         r"parameter 19 of param group 0"):
        opt.add_param_group({"params": model.model.embed_tokens.weight})     # a tensor, torch.optim's [tensor]
    with pytest.raises(ValueError, match=r"parameter 1 of param group 1 is parameter 0"):
        opt.add_param_group({"params": [model.model.norm.weight, model.model.norm.weight]})
    assert len(opt.param_groups) == 1
    # listed once, a step moves it once: SGD's lr * grad
    w = torch.nn.Parameter(torch.ones(2))
    opt = create("fo_sgd", [w], lr=0.1)
    w.grad = torch.ones(2)
    opt.step()
    assert torch.equal(w.detach(), torch.full((2,), 0.9))
