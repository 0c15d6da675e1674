import math

import numpy as np
import pytest
import torch

from dleaf.organism import build, world
from dleaf.organism.profile import (ProfileProtocol, _prompt_batch, generate, object_word_attention, patch_labels,
                                    premise_from_records, profile_markdown, profile_model)


@pytest.fixture(scope="module")
def organism():
    return build.load_organism()


def test_object_word_rows_are_the_rows_that_predict_the_word(organism):
    model, processor = organism
    scenes = world.scenes("adversarial", 6)
    prompt = world.CAPTION_PROMPTS[0]
    captions, sequences = generate(model, processor, scenes, [prompt] * 6, 60, batch_size=4)
    prompt_len = _prompt_batch(processor, scenes[:1], [prompt])["input_ids"].shape[1]
    records, share = object_word_attention(model, processor, sequences, lambda out: prompt_len, scenes)
    n_words = sum(sum(w in world.THEME_OF for w in c.split()) for c in captions)
    assert len(records) == n_words and n_words > 0
    # brute force for the first object word of the first caption: find it, run the model on the prefix that
    # predicts it, and compute LIAE and head-mean image mass with explicit loops over heads and keys
    out, pix = sequences[0]
    ids = out[0].tolist()
    t = next(i for i in range(prompt_len, len(ids)) if processor.tokenizer.convert_ids_to_tokens(ids[i]) in world.THEME_OF)
    prefix = out[:1, :t]
    with torch.no_grad():
        res = model(input_ids=prefix, attention_mask=(prefix != processor.tokenizer.pad_token_id).long(),
                    pixel_values=pix[:1], output_attentions=True)
    assert int(res.logits[0, -1].argmax()) == ids[t]  # greedy: this row produced the word
    img = [k for k in range(t) if ids[k] == model.config.image_token_id]
    rec = records[0]
    assert rec["word"] == processor.tokenizer.convert_ids_to_tokens(ids[t])
    assert rec["hallucinated"] == (rec["word"] not in scenes[0].object_set)
    for layer, att in enumerate(res.attentions):
        row = att[0, :, -1].double()  # (H, K)
        heads = row.shape[0]
        masses = [sum(float(row[h, k]) for k in img) for h in range(heads)]
        mixed = [sum(float(row[h, k]) / masses[h] for h in range(heads)) / heads for k in img]
        ent = -sum(p * math.log(p) for p in mixed if p > 0)
        assert rec["liae"][layer] == pytest.approx(ent, rel=1e-4, abs=1e-5)
        assert rec["mass"][layer] == pytest.approx(sum(masses) / heads, rel=1e-4, abs=1e-6)
    assert len(share) == model.config.text_config.num_hidden_layers
    assert all(0.0 <= s <= 1.0 for s in share)


def test_premise_orientation_on_synthetic_records():
    rng = np.random.default_rng(0)
    records = []
    for i in range(200):
        hall = i % 4 == 0
        records.append({"hallucinated": hall, "liae": [rng.normal(1.0 if hall else 0.0), rng.normal()],
                        "mass": [rng.normal(-1.0 if hall else 0.0), rng.normal()]})
    rows = {(r.signal, r.layer): r for r in premise_from_records(records, n_bootstrap=200)}
    assert rows[("liae", 0)].auroc > 0.7 and rows[("image_mass_deficit", 0)].auroc > 0.7
    assert 0.3 < rows[("liae", 1)].auroc < 0.7
    assert premise_from_records([]) == []


def test_patch_labels_mark_object_patches():
    scene = world.Scene(("fork", "cow"), (0, 8), 1)
    labels = patch_labels([scene], 36)[0]
    assert labels[[0, 1, 6, 7]].tolist() == [world.OBJECTS.index("fork")] * 4
    assert labels[[28, 29, 34, 35]].tolist() == [world.OBJECTS.index("cow")] * 4
    assert int((labels == len(world.OBJECTS)).sum()) == 28


def test_profile_runs_end_to_end_on_a_few_images(organism):
    model, processor = organism
    protocol = ProfileProtocol(n_images=4, batch_size=4, n_bootstrap=50)
    res = profile_model(model, processor, protocol)
    assert set(res["captions"]) == {"indist", "adversarial", "replication"}
    assert set(res["pope"]) == set(world.POPE_NEGATIVES)
    assert res["pope"]["random"]["n"] == 8
    md = profile_markdown({"protocol": {"n_images": 4}, "models": {"organism": res}})
    assert "| organism | adversarial |" in md


def test_protocol_rejects_training_split():
    with pytest.raises(ValueError, match="not a held-out split"):
        ProfileProtocol(caption_splits=("train",))
    with pytest.raises(ValueError, match="must be positive"):
        ProfileProtocol(n_images=0)


def test_design_targets_table_judges_each_target_from_the_numbers():
    from dleaf.organism.profile import _checks

    caption = dict(chair_s=0.2, recall=0.9, partner_share=0.8, partner_chance=0.4, n_additions=3, n_substitutions=1)
    premise_rows = [dict(signal="liae", layer=0, auroc=0.66, ci_low=0.52, ci_high=0.70),
                    dict(signal="liae", layer=1, auroc=float("nan"), ci_low=float("nan"), ci_high=float("nan"))]
    profile = {"models": {"organism": {"captions": {"adversarial": caption, "indist": dict(caption, recall=0.99)},
                                       "premise": {"adversarial": premise_rows}},
                          "control": {"captions": {"adversarial": dict(caption, chair_s=0.01)}}}}
    rows = [r for r in _checks(profile) if r.startswith("| ") and not r.startswith("| target")]
    assert len(rows) == 7 and all(r.endswith("| yes |") for r in rows)
    assert "best liae layer 0: 0.660 [0.520, 0.700]" in rows[4]
    premise_rows[0].update(auroc=0.66, ci_low=0.49)  # interval touches 0.5: not met
    caption.update(partner_share=0.55)  # mostly partners but not 1.5 x chance: not met
    rows = [r for r in _checks(profile) if r.startswith("| ") and not r.startswith("| target")]
    assert [r.endswith("| **no** |") for r in rows] == [False, False, True, False, True, False, False]
