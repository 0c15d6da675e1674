"""Tests for dleaf.generation: the one generate loop against a hand loop, EOS trimming, the sentence rule, per-item
sampling seeds, the method really attached, the engine's extra generate arguments, flag counts."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from dleaf import engine, generation, models
from dleaf.settings import Setting
from margins import GREEDY_GAP, assert_greedy_gap

PROMPTS = ["describe the image in detail .", "what do you see in this picture ?", "is there a cup in the image ?"]


def _items(n=6):
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (250, 250, 0), (0, 0, 0), (120, 60, 30)]
    return [SimpleNamespace(id=f"s/{i}", prompt=PROMPTS[i % 3],
                            image=(lambda c=colours[i % 6]: Image.new("RGB", (48, 48), c))) for i in range(n)]


class ForceAt(LogitsProcessor):
    """Forces ``token`` at generated step ``step`` in every row."""

    def __init__(self, prompt_len, step, token):
        self.prompt_len, self.step, self.token = prompt_len, step, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len == self.step:
            scores = torch.full_like(scores, -1e9)
            scores[:, self.token] = 0
        return scores


def test_rows_equal_a_hand_loop(tiny_organism):
    model, processor = tiny_organism
    items = _items(4)
    rows = list(generation.generate(model, processor, items, Setting(), max_new_tokens=7, batch_size=3))
    assert [r["id"] for r in rows] == [it.id for it in items]
    tok = processor.tokenizer
    for it, row in zip(items, rows):
        text = models.chat_prompt(processor, it.prompt)
        batch = processor(text=[text], images=[it.image()], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=7, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        # the batched rows are computed with padding, this one alone: the same tokens only where no choice is a tie
        assert_greedy_gap(gen.logits, GREEDY_GAP)
        out = gen.sequences[0, batch["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in out:
            out = out[:out.index(tok.eos_token_id)]
        assert row["raw"] == tok.decode(out, skip_special_tokens=True).strip()
        assert row["n_tokens"] == len(out)
        assert row["stopped"] == ("length" if len(out) == 7 else "eos")
        assert row["text"] == row["raw"]  # rule "keep"


def test_eos_trimming_and_the_engine_generate_hook(tiny_organism, monkeypatch):
    model, processor = tiny_organism
    eos = processor.tokenizer.eos_token_id
    seen = []

    def generation_kwargs(intervention, inputs):
        seen.append(intervention)
        return {"logits_processor": LogitsProcessorList([ForceAt(inputs["input_ids"].shape[1], 3, eos)])}

    monkeypatch.setattr(engine, "generation_kwargs", generation_kwargs, raising=False)
    rows = list(generation.generate(model, processor, _items(3), Setting("pai"), max_new_tokens=9, batch_size=2))
    assert [r["n_tokens"] for r in rows] == [3, 3, 3] and {r["stopped"] for r in rows} == {"eos"}
    assert len(seen) == 2 and all(iv is not None for iv in seen)  # the attached method is passed, once per batch


def test_sentence_rule_cuts_only_replies_cut_by_the_limit(tiny_organism, monkeypatch):
    model, processor = tiny_organism
    tok = processor.tokenizer
    dot = tok.convert_tokens_to_ids(".")

    def generation_kwargs(intervention, inputs):
        return {"logits_processor": LogitsProcessorList([ForceAt(inputs["input_ids"].shape[1], 2, dot)])}

    monkeypatch.setattr(engine, "generation_kwargs", generation_kwargs, raising=False)
    rows = list(generation.generate(model, processor, _items(2), Setting("pai"), max_new_tokens=6,
                                    sentence_rule="drop"))
    for r in rows:
        if r["stopped"] == "length" and not r["raw"].endswith((".", "!", "?")):
            assert r["text"] == r["raw"][: r["raw"].rfind(".") + 1].strip() and r["text"].endswith(".")
            assert len(r["text"]) < len(r["raw"])
    assert any(r["stopped"] == "length" for r in rows)


def test_apply_sentence_rule_by_hand():
    rule = generation.apply_sentence_rule
    assert rule("a fork . a knife is on the", True, "drop") == "a fork ."
    assert rule("a fork . a knife is on the", False, "drop") == "a fork . a knife is on the"
    assert rule("no sentence end", True, "drop") == "no sentence end"
    assert rule("Done! And then", True, "keep") == "Done! And then"
    assert rule("Is it? yes", True, "drop") == "Is it?"
    assert rule("One. Two! Three? four", True, "drop") == "One. Two! Three?"
    assert rule("ends well.", True, "drop") == "ends well."
    with pytest.raises(ValueError, match="trailing-sentence rule"):
        rule("x", True, "cut")


def test_sampling_seeds_are_per_item(tiny_organism):
    model, processor = tiny_organism
    items = _items(5)
    s = Setting(strategy="sample", seed=3)
    a = list(generation.generate(model, processor, items, s, max_new_tokens=6, batch_size=4))
    b = list(generation.generate(model, processor, items[::-1], s, max_new_tokens=6, batch_size=1))[::-1]
    assert a == b  # independent of batching and order
    c = list(generation.generate(model, processor, items, Setting(strategy="sample", seed=4), max_new_tokens=6))
    assert a != c
    assert generation.item_seed(3, "s/0") == int.from_bytes(
        __import__("hashlib").sha256(b"3:s/0").digest()[:4], "little")


def test_the_method_is_attached(tiny_organism):
    model, processor = tiny_organism
    items = _items(6)
    plain = [r["raw"] for r in generation.generate(model, processor, items, Setting(), max_new_tokens=8)]
    steered = [r["raw"] for r in generation.generate(model, processor, items,
                                                      Setting("spin", {"keep_ratio": 0.25, "scale": 0.0}),
                                                      max_new_tokens=8)]
    assert steered != plain
    # PAI's boost moves no greedy token of this random model (uniform images); that it acts, on a left-padded batch
    # (alpha > 1 once made masked keys NaN), is checked on the logits
    batch = models.model_inputs(processor, [it.prompt for it in items[:2]], [it.image() for it in items[:2]], model)
    assert (batch["attention_mask"] == 0).any()  # padded
    with torch.no_grad():
        base = model(**batch).logits[:, -1]
        with engine.attached(model, "pai", alpha=5.0, layer_start=0):
            boosted = model(**batch).logits[:, -1]
    assert torch.isfinite(boosted).all() and (boosted - base).abs().max() > 1e-3
    gamma0 = Setting("dleaf", {"gamma": 0.0})
    assert [r["raw"] for r in generation.generate(model, processor, items, gamma0, max_new_tokens=8)] == plain


def test_flag_counts_sum_to_the_flag_rate(tiny_organism):
    model, processor = tiny_organism
    items = _items(4)
    s = Setting("dleaf", {"gamma": 1.0, "warmup": 1, "kappa": 0.0, "layer_start": 1})
    rows = list(generation.generate(model, processor, items, s, max_new_tokens=7, batch_size=4, flags=True))
    flagged, watched = map(sum, zip(*(r["flags"] for r in rows)))
    with s.attached(model, trace=True) as iv:
        batch = models.model_inputs(processor, [it.prompt for it in items], [it.image() for it in items], model)
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=7, do_sample=False)
    assert flagged / watched == pytest.approx(iv.flag_rate()) and flagged > 0
    greedy = list(generation.generate(model, processor, items, Setting(), max_new_tokens=7, flags=True))
    assert all("flags" not in r for r in greedy)


def test_generate_texts(tiny_organism):
    model, processor = tiny_organism
    items = _items(2)
    texts = generation.generate_texts(model, processor, [it.prompt for it in items], [it.image() for it in items],
                                      max_new_tokens=5)
    assert texts == [r["text"] for r in generation.generate(model, processor, items, max_new_tokens=5)]
