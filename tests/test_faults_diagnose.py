"""The signal diagnosis (dleaf/faults/diagnose.py): the LIAE it reads against entropies computed by a loop from the
model's own attention weights, the exact value 1 under a full diffuse fault, and the table's arithmetic."""

import math

import numpy as np
import pytest
import torch

from dleaf.faults import diagnose
from dleaf.models import teacher_forced_inputs
from dleaf.organism import world


@pytest.fixture(scope="module")
def inputs(tiny_organism):
    model, processor = tiny_organism
    scenes = world.scenes("adversarial", 3)
    prompts = [world.CAPTION_PROMPTS[0]] * 3
    replies = ["a red cup and a fork .", "a dog .", "two cats on a mat and a red cup ."]
    return model, processor, prompts, [world.render(s) for s in scenes], replies


def _entropy(p):
    p = np.asarray(p, float)
    return -sum(x * math.log(x) for x in p if x > 0)


@torch.no_grad()
def test_signals_equal_entropies_of_the_models_own_attention(inputs):
    model, processor, prompts, images, replies = inputs
    full, n, reply_ids = teacher_forced_inputs(processor, prompts, images, replies, model)
    lengths = [len(r) for r in reply_ids]
    att = model(**full, output_attentions=True).attentions
    image = full["input_ids"] == model.config.image_token_id
    got = {v: diagnose.reply_signals(model, processor, prompts, images, replies, v, 0.0, batch_size=2)
           for v in diagnose.VARIANTS}
    for b, length in enumerate(lengths):
        img = [k for k in range(full["input_ids"].shape[1]) if image[b, k]]
        for j in range(length):
            t = n + j - 1  # the row that predicts reply token j
            for layer in range(len(att)):
                a = att[layer][b, :, t].double().numpy()
                profiles = [a[h, img] / a[h, img].sum() for h in range(a.shape[0])]
                mixed = _entropy(np.mean(profiles, axis=0)) / math.log(len(img))
                mean_head = np.mean([_entropy(p) for p in profiles]) / math.log(len(img))
                assert got["mixed"][0][b][j, layer] == pytest.approx(mixed, abs=1e-5)
                assert got["mean_head"][0][b][j, layer] == pytest.approx(mean_head, abs=1e-5)
                assert got["mixed"][1][b][j, layer] == pytest.approx(np.mean([a[h, img].sum() for h in
                                                                              range(a.shape[0])]), abs=1e-6)


def test_sensitivity_table(inputs):
    model, processor, prompts, images, replies = inputs
    diag = diagnose.signal_sensitivity(model, processor, prompts, images, replies, strengths=(0.5, 1.0),
                                       batch_size=3)
    L = model.config.text_config.num_hidden_layers
    for v in diagnose.VARIANTS:
        e = diag["variants"][v]
        base, _ = diagnose.reply_signals(model, processor, prompts, images, replies, v, 0.0)
        np.testing.assert_allclose(e["unfaulted_mean"], np.concatenate(base).mean(0), rtol=1e-9)
        sd = np.mean([s.std(0) for s in base], axis=0)
        np.testing.assert_allclose(e["within_reply_std"], sd, rtol=1e-9)
        # a diffuse fault of strength 1 makes every head's image profile uniform: both variants read 1
        np.testing.assert_allclose(e["faulted_mean"]["1"], np.ones(L), atol=1e-5)
        np.testing.assert_allclose(e["headroom"], 1 - np.asarray(e["unfaulted_mean"]), rtol=1e-9)
        np.testing.assert_allclose(e["rise_in_sd"]["0.5"],
                                   (np.asarray(e["faulted_mean"]["0.5"]) - e["unfaulted_mean"]) / sd, rtol=1e-9)
        assert all(0 < r for r in e["rise_in_sd"]["0.5"])  # mixing toward uniform raises the entropy
    # concavity: the entropy of the mixture is at least the mean entropy
    assert all(m >= h - 1e-9 for m, h in zip(diag["variants"]["mixed"]["unfaulted_mean"],
                                             diag["variants"]["mean_head"]["unfaulted_mean"]))
    md = diagnose.sensitivity_markdown(diag)
    assert md.count("\n") == L + 1 and "mean_head rise at s=1 (sd)" in md
