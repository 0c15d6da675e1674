"""Every decoding mode transformers offers: exact against the reference (DynamicCache, cached greedy) or refused with
a clear error, never silently wrong. Each test compares D-LEAF at gamma > 0, with layers flagged."""

import math
import sys

import pytest
import torch
from transformers import AttentionInterface, GptOssConfig, GptOssForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from dleaf import engine
from margins import (FLAG_MARGIN, GREEDY_GAP, assert_greedy_gap, assert_margin, assert_same_decisions, decisions,
                     sharpen_attention, spin_selection_gap)
from model_families import FAMILIES

STRONG = dict(gamma=0.9, warmup=1, kappa=0.0)
GEN = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, max_new_tokens=6)


def _close(a, b, tol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


@torch.no_grad()
def _reference(model, batch, **knobs):
    with engine.attached(model, "dleaf", trace=True, **{**STRONG, **knobs}) as iv:
        out = model.generate(**batch, **GEN)
    assert iv.flag_rate() > 0
    return out, iv.trace


@torch.no_grad()
def test_static_cache_with_a_batch_of_three_equals_the_dynamic_cache(sharp_organism_batch):
    """A preallocated static cache: every row keeps its own image positions and running statistics. (On the
    sharpened organism: the flags, head choices and greedy tokens compared are each decided by a clear margin.)"""
    model, _, _, _, batch = sharp_organism_batch
    ref, ref_trace = _reference(model, batch)
    with engine.attached(model, "dleaf", trace=True, **STRONG) as iv:
        static = model.generate(**batch, cache_implementation="static", **GEN)
    decided = {"dynamic": decisions(ref_trace), "static": decisions(iv.trace)}
    assert min(assert_margin(d, FLAG_MARGIN) for d in decided.values()) >= FLAG_MARGIN
    assert_same_decisions(decided)
    assert_greedy_gap(ref.logits, GREEDY_GAP)
    assert torch.equal(static.sequences, ref.sequences)
    _close(static.logits, ref.logits)
    for i in range(3):
        assert torch.equal(iv.trace.sample(i)["flag"], ref_trace.sample(i)["flag"])


@torch.no_grad()
@pytest.mark.parametrize("method,knobs", [("dleaf", STRONG), ("pai", {"alpha": 0.5, "layer_start": 0}),
                                          ("spin", {"keep_ratio": 0.5})])
def test_generate_without_a_cache_equals_the_cached_run(sharp_organism_batch, method, knobs):
    """generate(use_cache=False) runs the whole sequence at every step: the same logits as the cached run. (On the
    sharpened organism: the flags, kept heads and greedy tokens compared are each decided by a clear margin.)"""
    model, _, _, _, batch = sharp_organism_batch
    n = batch["input_ids"].shape[1]
    plain = model.generate(**batch, **GEN)
    with engine.attached(model, method, trace=method == "dleaf", **knobs) as iv:
        cached = model.generate(**batch, **GEN)
        cached_trace = iv.trace.sample(1) if iv.trace is not None else None
        cached_decisions = decisions(iv.trace) if iv.trace is not None else None
    with engine.attached(model, method, trace=method == "dleaf", **knobs) as iv:
        uncached = model.generate(**batch, use_cache=False, **GEN)
    assert_greedy_gap(cached.logits, GREEDY_GAP)
    if cached_decisions is not None:
        decided = {"cached": cached_decisions, "uncached": decisions(iv.trace)}
        assert min(assert_margin(d, FLAG_MARGIN) for d in decided.values()) >= FLAG_MARGIN
        assert_same_decisions(decided)
    if method == "spin":
        full = {**batch, "input_ids": cached.sequences[:, :-1],
                "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(cached.sequences[:, n:-1])], 1)}
        spin_selection_gap(model, full, knobs, n - 1)
    assert torch.equal(uncached.sequences, cached.sequences)
    _close(uncached.logits, cached.logits)
    assert not all(torch.equal(a, b) for a, b in zip(cached.logits, plain.logits))  # the method acted
    if cached_trace is not None:
        trace = iv.trace.sample(1)
        assert torch.equal(trace["positions"], cached_trace["positions"])
        assert torch.equal(trace["flag"], cached_trace["flag"]) and trace["flag"].any()


@torch.no_grad()
def test_generate_without_a_cache_refuses_random_draws(organism_batch):
    model, _, _, _, batch = organism_batch
    with engine.attached(model, "random_layers", gamma=0.5):
        with pytest.raises(NotImplementedError, match="use_cache=False"):
            model.generate(**batch, use_cache=False, max_new_tokens=3, do_sample=False)


def _text_model_with_image_tokens(seed=0):
    """A tiny Llama whose token 7 stands for image tokens (transformers' prompt lookup and assisted decoding run on
    it, which they do not on the LLaVA organism), and a left-padded batch whose prompts repeat an n-gram, so that
    prompt lookup proposes candidates."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.image_token_id = 7
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
    ids = torch.tensor([[1, 7, 7, 7, 7, 9, 12, 13, 9, 12]])
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
@pytest.mark.parametrize("mode", ["prompt_lookup", "assisted"])
def test_assisted_and_prompt_lookup_decoding_are_refused(mode):
    """Both verify candidate tokens several at a time, the first time in the same call as the prompt: refused (on
    the previous engine they silently changed the greedy output)."""
    model, inputs = _text_model_with_image_tokens()
    extra = {"prompt_lookup_num_tokens": 3} if mode == "prompt_lookup" else \
        {"assistant_model": _text_model_with_image_tokens(seed=1)[0]}
    plain = model.generate(**inputs, max_new_tokens=6, do_sample=False, **extra)  # transformers runs the mode
    assert plain.shape[1] == inputs["input_ids"].shape[1] + 6
    with engine.attached(model, "dleaf", **STRONG):
        with pytest.raises(NotImplementedError, match="assisted and prompt-lookup decoding"):
            model.generate(**inputs, max_new_tokens=6, do_sample=False, **extra)


@torch.no_grad()
def test_chunked_prefill_is_refused(organism_batch):
    model, _, _, _, batch = organism_batch
    with engine.attached(model, "dleaf", **STRONG):
        with pytest.raises((NotImplementedError, ValueError), match="chunked prefill|prefill_chunk_size"):
            model.generate(**batch, prefill_chunk_size=16, max_new_tokens=3, do_sample=False)


@torch.no_grad()
def test_a_cached_call_with_several_new_tokens_is_refused(organism_batch):
    model, _, _, _, batch = organism_batch
    with engine.attached(model, "dleaf", **STRONG):
        out = model(**batch, use_cache=True)
        ids = torch.full((3, 2), 5)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(ids)], 1)
        with pytest.raises(NotImplementedError, match="one decoding step at a time"):
            model(input_ids=ids, attention_mask=mask, use_cache=True, **{engine.cache_kwarg(model): out.cache})


@torch.no_grad()
def test_a_crop_into_folded_positions_stops_the_sequence(organism_batch):
    """Rolling the cache back over positions D-LEAF already counted cannot be undone: continuing is an error."""
    model, _, _, _, batch = organism_batch
    with engine.attached(model, "dleaf", **STRONG):
        out = model(**batch, use_cache=True)
        cache, mask = out.cache, batch["attention_mask"]
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(2):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=mask, use_cache=True, cache=cache)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        cache.crop(-1)
        with pytest.raises(RuntimeError, match="cropped back"):
            model(input_ids=token, attention_mask=mask, use_cache=True, cache=cache)


def _gpt_oss():
    """A tiny GPT-OSS (attention sinks on every layer), one of its tokens taken as the image token."""
    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                       sliding_window=8, max_position_embeddings=64, pad_token_id=0, eos_token_id=1)
    cfg.image_token_id = 7
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)
    model.set_attn_implementation("eager")
    ids = torch.tensor([[0, 0, 3, 7, 7, 7, 9, 4], [2, 5, 3, 7, 7, 7, 11, 4]])
    return model, {"input_ids": ids, "attention_mask": (ids != 0).long() | (torch.arange(8) >= 2).long()}


@torch.no_grad()
def test_attention_sinks_are_honoured():
    """GPT-OSS's sinks (s_aux): at gamma 0 D-LEAF reproduces the model's own eager attention; D-LEAF acts otherwise."""
    model, inputs = _gpt_oss()
    plain = model.generate(**inputs, **GEN)
    with engine.attached(model, "dleaf", gamma=0.0):
        zero = model.generate(**inputs, **GEN)
    with engine.attached(model, "dleaf", trace=True, **STRONG) as iv:
        strong = model.generate(**inputs, **GEN)
    assert torch.equal(zero.sequences, plain.sequences)
    _close(zero.logits, plain.logits, 1e-6)
    assert iv.flag_rate() > 0 and any((a - b).abs().max() > 1e-4 for a, b in zip(strong.logits, plain.logits))


class HandWrittenDLeaf:
    """D-LEAF written out by hand on top of the model file's own ``eager_attention_forward`` (which applies the
    model's softcap or attention sinks): at the last query row of every call (the prompt's last row at prefill, the
    new row at each cached step), per sample and layer, the mixed LIAE normalised by log |I|, flagged when it exceeds
    the mean + ``kappa`` std of the sample's earlier values in that layer (after ``warmup`` of them); in a flagged
    layer the heads whose image mass is below the heads' mean take ``(1 - gamma) a[h] + gamma a[h*]``, ``h*`` the
    head of largest image mass. Registered as an attention implementation of its own; ``fused`` counts the corrected
    (sample, layer, row) sites; ``decided`` lists every decision, ``(where, value, threshold)`` (each flag's signal
    and threshold; where flagged, the largest image mass and the next, each head's mass and the mean), for
    :func:`margins.assert_margin`."""

    NAME = "dleaf_hand_written_reference"

    def __init__(self, image: torch.Tensor, gamma: float, kappa: float = 0.0, warmup: int = 1):
        self.image, self.gamma, self.kappa, self.warmup = image, gamma, kappa, warmup
        self.history: dict[tuple[int, int], list[float]] = {}
        self.fused = 0
        self.decided: list[tuple] = []
        AttentionInterface.register(self.NAME, self)
        AttentionMaskInterface.register(self.NAME, eager_mask)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        own = sys.modules[type(module).__module__].eager_attention_forward
        _, weights = own(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0, **kwargs)
        weights = weights.clone()
        B, H, Q, K = weights.shape
        for b in range(B):
            img = [k for k in range(min(K, self.image.shape[1])) if self.image[b, k]]
            row = weights[b, :, Q - 1].double()
            mass = [float(row[h, img].sum()) for h in range(H)]
            mixed = [sum(float(row[h, k]) / mass[h] for h in range(H)) / H for k in img]
            signal = -sum(p * math.log(p) for p in mixed if p > 0) / math.log(len(img))
            earlier = self.history.setdefault((b, module.layer_idx), [])
            flagged = False
            if len(earlier) >= self.warmup:
                mean = sum(earlier) / len(earlier)
                std = math.sqrt(sum((x - mean) ** 2 for x in earlier) / len(earlier))
                flagged = signal > mean + self.kappa * std
                self.decided.append(((b, module.layer_idx, len(earlier), "flag"), signal, mean + self.kappa * std))
            earlier.append(signal)
            if flagged:
                best = max(range(H), key=lambda h: (mass[h], -h))  # the first head of largest mass
                top = sorted(mass, reverse=True)
                self.decided.append(((b, module.layer_idx, len(earlier) - 1, "h*"), top[0], top[1]))
                self.decided += [((b, module.layer_idx, len(earlier) - 1, h), mass[h], sum(mass) / H) for h in range(H)]
                for h in range(H):
                    if mass[h] < sum(mass) / H:
                        weights[b, h, Q - 1] = ((1 - self.gamma) * row[h] + self.gamma * row[best]).to(weights.dtype)
                self.fused += 1
        groups = module.num_key_value_groups
        v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
        return torch.matmul(weights, v).transpose(1, 2).contiguous(), weights


def _set_text_attention(model, name):
    if getattr(model.config, "text_config", None) is not None:
        model.set_attn_implementation({"text_config": name})
    else:
        model.set_attn_implementation(name)


@torch.no_grad()
@pytest.mark.parametrize("feature", ["softcap", "sinks"])
def test_softcapped_and_sink_attention_under_dleaf_equal_a_hand_written_reference(feature):
    """D-LEAF at gamma > 0 with layers flagged, on PaliGemma 2 (Gemma-2 decoder, attention logits softcapped) and on
    GPT-OSS (attention sinks), cached greedy decoding: the logits equal :class:`HandWrittenDLeaf`, built on the model
    file's own attention function. (The engine before softcap and sinks were honoured dropped both, so the weights it
    fused were not the model's.)"""
    if feature == "softcap":
        model, inputs = FAMILIES["paligemma2"][1]()  # its queries and keys already scaled up to reach the cap
    else:  # sharpened: the random GPT-OSS attends so evenly that a flag comes within 3e-6 of its threshold
        model, inputs = _gpt_oss()
        sharpen_attention(model, 4.0)
    image = inputs["input_ids"] == engine.image_token_id(model)
    plain = model.generate(**inputs, **GEN)
    with engine.attached(model, "dleaf", trace=True, **STRONG) as iv:
        ours = model.generate(**inputs, **GEN)
    assert iv.flag_rate() > 0

    zero = HandWrittenDLeaf(image, gamma=0.0)  # the reference itself: at gamma 0 it is the model's own decoding
    _set_text_attention(model, HandWrittenDLeaf.NAME)
    try:
        _close(model.generate(**inputs, **GEN).logits, plain.logits, 1e-6)
        reference = HandWrittenDLeaf(image, gamma=STRONG["gamma"], kappa=STRONG["kappa"], warmup=STRONG["warmup"])
        ref = model.generate(**inputs, **GEN)
    finally:
        _set_text_attention(model, "eager")
    assert zero.fused > 0 and reference.fused > 0
    # every flag, head choice and greedy token compared decided by a clear margin, not by the two computations' rounding
    assert assert_margin(reference.decided, FLAG_MARGIN, "the hand-written D-LEAF's decisions") >= FLAG_MARGIN
    assert_greedy_gap(ours.logits, GREEDY_GAP)
    assert torch.equal(ours.sequences, ref.sequences)
    _close(ours.logits, ref.logits)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(ours.logits, plain.logits))  # D-LEAF acted


@torch.no_grad()
def test_sampling_and_beam_search_run_under_dleaf(organism_batch):
    model, _, _, _, batch = organism_batch
    torch.manual_seed(3)
    plain = model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=10)
    with engine.attached(model, "dleaf", gamma=0.0):
        torch.manual_seed(3)
        same = model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=10)
        beams0 = model.generate(**batch, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(plain, same)
    assert torch.equal(beams0, model.generate(**batch, max_new_tokens=6, num_beams=3, do_sample=False))
    with engine.attached(model, "dleaf", **STRONG):
        beams = model.generate(**batch, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 6
