"""PAI (dleaf/methods/pai.py): the current row's pre-softmax scores over image keys become w + alpha |w|, checked
against a hand computation from the query and key of one layer; neutral at alpha 0."""

import torch

from dleaf import engine
from dleaf.engine import kernels


@torch.no_grad()
def test_pai_is_neutral_at_zero_strength_and_acts_otherwise(organism_batch):
    model, _, _, _, batch = organism_batch
    plain = model(**batch).logits
    with engine.attached(model, "pai", alpha=0.0):
        assert torch.equal(model(**batch).logits, plain)
    with engine.attached(model, "pai", alpha=1.0, layer_start=0):
        assert not torch.equal(model(**batch).logits, plain)


@torch.no_grad()
def test_pai_boosts_the_image_scores_of_the_last_row_only(organism_batch):
    model, _, _, _, batch = organism_batch
    layer = model.model.language_model.layers[1].self_attn
    seen = {}

    def grab(module, args, kwargs, out):
        seen["weights"] = out[1]

    original = kernels.eager_weights
    calls = []

    def spy(module, query, key, mask, scaling, pre_softmax=None, softcap=None, sinks=None):
        if module is layer:
            calls.append((query, key, mask, scaling))
        return original(module, query, key, mask, scaling, pre_softmax, softcap, sinks)

    hook = layer.register_forward_hook(grab, with_kwargs=True)
    kernels.eager_weights = spy
    try:
        with engine.attached(model, "pai", alpha=0.7, layer_start=1, layer_end=2):
            model(**batch)
    finally:
        kernels.eager_weights = original
        hook.remove()
    query, key, mask, scaling = calls[0]
    w = (query @ kernels.repeat_kv(key, layer.num_key_value_groups).transpose(2, 3)) * scaling + mask
    image = (batch["input_ids"] == model.config.image_token_id)[:, None, :]  # (B, 1, K)
    last = w[:, :, -1, :]
    boosted = torch.where(image, last + 0.7 * last.abs(), last)
    want = torch.softmax(boosted.float(), dim=-1)
    torch.testing.assert_close(seen["weights"][:, :, -1], want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(seen["weights"][:, :, :-1], torch.softmax(w[:, :, :-1].float(), dim=-1),
                               rtol=1e-6, atol=1e-7)  # earlier rows untouched
