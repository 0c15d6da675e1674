"""SPIN (dleaf/methods/spin.py): the heads with the least image mass are damped, checked against the model's own
attention weights; neutral at scale 1."""

import pytest
import torch

from dleaf import engine


@pytest.fixture()
def tiny(organism_batch):
    """The tiny organism (3 layers, 4 heads, eager) and a left-padded batch of three prompts."""
    return organism_batch


@torch.no_grad()
def test_spin_damps_the_heads_with_least_image_mass(tiny):
    model, _, _, _, batch = tiny
    o_proj = model.model.language_model.layers[0].self_attn.o_proj
    seen = []
    hook = o_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    plain = model(**batch, output_attentions=True)
    with engine.attached(model, "spin", keep_ratio=0.5, scale=0.1, layer_start=0, layer_end=1):
        model(**batch)
    hook.remove()
    before, after = (x.reshape(x.shape[0], x.shape[1], 4, -1) for x in seen)  # (B, T, H, D) head outputs
    att = plain.attentions[0][:, :, -1]  # layer 0, last row, (B, H, K)
    img = batch["input_ids"] == model.config.image_token_id
    mass = (att * img[:, None, :]).sum(-1)  # (B, H)
    for b in range(mass.shape[0]):
        kept = set(mass[b].argsort(descending=True)[:2].tolist())  # floor(0.5 * 4) heads
        for h in range(4):
            want = before[b, -1, h] * (1.0 if h in kept else 0.1)
            torch.testing.assert_close(after[b, -1, h], want)
    torch.testing.assert_close(after[:, :-1], before[:, :-1])  # earlier rows untouched


@torch.no_grad()
def test_spin_is_neutral_at_scale_one_and_acts_otherwise(tiny):
    model, _, _, _, batch = tiny
    plain = model(**batch).logits
    with engine.attached(model, "spin", scale=1.0):
        assert torch.equal(model(**batch).logits, plain)
    with engine.attached(model, "spin", keep_ratio=0.5, scale=0.0):
        assert not torch.equal(model(**batch).logits, plain)
