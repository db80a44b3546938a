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
    lambda m: create("zo_sgd", [m.lm_head.weight], lr=1e-3).add_param_group({"params": m}),
    lambda m: create("fo_sgd", [m.lm_head.weight], lr=1e-3).add_param_group({"params": m}),
    lambda m: create("zo_sgd", [m.lm_head.weight], lr=1e-3, hybrid_switch=1).add_param_group({"params": m}),
], ids=["zo_sgd", "zo_adam", "hybrid", "fo_adam", "ZOFusedSGD", "ZOFusedAdam", "FOSGD", "FOAdam", "zo group",
        "fo group", "zo add_param_group", "fo add_param_group", "hybrid add_param_group"])
def test_a_model_given_as_params_is_refused_naming_params_and_the_fix(build):
    # create("zo_sgd", model): torch said only "'LlamaForCausalLM' object is not iterable"
    model = _tiny_llama()
    with pytest.raises(TypeError, match=r"params'?\]? is a LlamaForCausalLM.*torch\.nn\.Module.*model\.parameters\(\)"):
        build(model)
    # as torch.optim's: a TypeError, and the same optimizer built from model.parameters() works
    assert isinstance(create("zo_sgd", model.parameters(), lr=1e-3), ZOFusedSGD)
    assert isinstance(create("zo_sgd", model.parameters(), lr=1e-3, hybrid_switch=1), HybridFOZO)
