"""How the engine plugs into transformers: the model helpers, the weak registry of attached modules."""

import gc
import weakref

import pytest
import torch

from dleaf import engine
from transformers import LlamaConfig, LlamaForCausalLM


def test_models_without_an_image_token_get_a_clear_error():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match="image_token_id"):
        engine.attach(model, "dleaf")


def test_a_model_dropped_without_detach_leaves_nothing_registered(tiny_organism_factory):
    """The registry holds neither the modules nor the interventions: a dropped model, its attention modules and its
    intervention are all collected (an entry kept for a dead module could be matched by a later one)."""
    model = tiny_organism_factory(seed=2)
    iv = engine.attach(model, "dleaf")
    assert engine.attached_interventions() == [iv]
    refs = [weakref.ref(x) for x in (model, iv, *engine.text_attention_modules(model))]
    del model, iv
    gc.collect()
    assert all(ref() is None for ref in refs) and engine.attached_interventions() == []


def test_a_module_of_an_unattached_model_runs_plain_eager_attention(tiny_organism_factory):
    """The registered attention function serves any module: one that no intervention is attached to (a model whose
    attention implementation names the engine, without attach) gets plain eager attention."""
    model = tiny_organism_factory(seed=3)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        model.set_attn_implementation({"text_config": engine.ATTENTION_NAME})
        assert torch.equal(model(input_ids=ids).logits, plain)
