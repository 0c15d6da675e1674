import math

import numpy as np
import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration)

from dleaf import engine
from dleaf.config import DLeafConfig, PAIConfig, SPINConfig, method_config
from dleaf.organism import build, world
from dleaf.organism.profile import _prompt_batch

GEN = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def tiny(tiny_organism):
    model, processor = tiny_organism
    scenes = world.scenes("adversarial", 3)
    prompts = [world.CAPTION_PROMPTS[0], world.QUESTION_TEMPLATE.format(obj="fork"), world.CAPTION_PROMPTS[1]]
    batch = _prompt_batch(processor, scenes, prompts)
    assert (batch["attention_mask"] == 0).any()  # the batch really is left-padded
    return model, processor, scenes, prompts, batch


STRONG = dict(gamma=1.0, warmup=1, kappa=0.0)  # flags often on an untrained model


def _same_logits(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@torch.no_grad()
def test_gamma_zero_and_no_flags_equal_plain_eager_decoding(tiny):
    model, _, _, _, batch = tiny
    plain = model.generate(**batch, max_new_tokens=8, **GEN)
    with engine.attached(model, "dleaf", gamma=0.0, warmup=1, kappa=0.0, trace=True) as iv:
        zero = model.generate(**batch, max_new_tokens=8, **GEN)
    assert iv.flag_rate() > 0  # heads were selected and "corrected" with gamma 0
    with engine.attached(model, "dleaf", gamma=1.0, kappa=1e9, trace=True) as iv:
        none = model.generate(**batch, max_new_tokens=8, **GEN)
    assert iv.flag_rate() == 0
    with engine.attached(model, "dleaf", **STRONG) as iv:
        strong = model.generate(**batch, max_new_tokens=8, **GEN)
    for out in (zero, none):
        assert torch.equal(out.sequences, plain.sequences) and _same_logits(out.logits, plain.logits)
    assert not _same_logits(strong.logits, plain.logits)


@torch.no_grad()
def test_detach_leaves_the_model_exactly_as_it_was(tiny):
    model, _, _, _, batch = tiny
    before = model(**batch).logits
    impl = model.config.text_config._attn_implementation
    vision_impl = model.config.vision_config._attn_implementation
    iv = engine.attach(model, "dleaf", **STRONG)
    assert model.config.text_config._attn_implementation == engine.ATTENTION_NAME
    assert model.config.vision_config._attn_implementation == vision_impl  # the vision tower is never touched
    with pytest.raises(RuntimeError, match="already has"):
        engine.attach(model, "pai")
    iv.detach()
    assert model.config.text_config._attn_implementation == impl
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not engine._MODULES
    assert torch.equal(model(**batch).logits, before)


@torch.no_grad()
def test_batch_with_padding_equals_each_sample_alone(tiny):
    model, processor, scenes, prompts, batch = tiny
    n = batch["input_ids"].shape[1]
    with engine.attached(model, "dleaf", **STRONG):
        together = model.generate(**batch, max_new_tokens=8, **GEN)
        for i in range(len(scenes)):
            one = _prompt_batch(processor, scenes[i:i + 1], prompts[i:i + 1])
            alone = model.generate(**one, max_new_tokens=8, **GEN)
            m = one["input_ids"].shape[1]
            assert torch.equal(alone.sequences[0, m:], together.sequences[i, n:])
            for a, b in zip(alone.logits, together.logits):
                torch.testing.assert_close(a[0], b[i], atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("method,knobs", [("dleaf", STRONG), ("dleaf", dict(STRONG, layer_signal="mass_deficit",
                                                                            threshold="best", iaf_variant="focus")),
                                          ("pai", {"alpha": 0.5, "layer_start": 0}), ("spin", {"keep_ratio": 0.5})])
def test_teacher_forced_scoring_equals_step_by_step_decoding(tiny, method, knobs):
    model, _, _, _, batch = tiny
    n = batch["input_ids"].shape[1]
    with engine.attached(model, method, **knobs) as iv:
        out = model.generate(**batch, max_new_tokens=10, **GEN)
        full = {**batch, "input_ids": out.sequences,
                "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, n:])], 1)}
        scored, mask = engine.response_logprobs(model, full, [n] * out.sequences.shape[0], iv)
    plain_scored, _ = engine.response_logprobs(model, full, [n] * out.sequences.shape[0])
    stepwise = torch.stack([torch.log_softmax(l.float(), -1).gather(-1, out.sequences[:, n + i, None])[:, 0]
                            for i, l in enumerate(out.logits)], 1)
    assert mask[:, n:].all() and not mask[:, :n].any()
    torch.testing.assert_close(scored[:, n:], stepwise, atol=1e-5, rtol=1e-5)
    assert (scored - plain_scored).abs().max() > 1e-4  # the method did act in scoring


VARIANTS = {  # every formula of the layer signal and of IAF, each checked by the brute-force loop below
    "mixed_focus": dict(liae_normalize=False, iaf_variant="focus"),
    "mean_head_normalized_mass": dict(liae_variant="mean_head", liae_normalize=True, iaf_variant="mass"),
    "mass_deficit": dict(layer_signal="mass_deficit", iaf_variant="mass"),
}


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("path", ["scoring", "generation"])
def test_trace_statistics_equal_brute_force_from_output_attentions(tiny, path, variant):
    """Every traced statistic against a loop over output_attentions, for the multi-row path (one-pass scoring) and
    the one-row path (each decoding step), for every signal and IAF formula."""
    model, _, _, _, batch = tiny
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    n = batch["input_ids"].shape[1]
    full = {**batch, "input_ids": out,
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(out[:, n:])], 1)}
    cfg = DLeafConfig(gamma=0.0, warmup=1, kappa=0.5, **VARIANTS[variant])
    with engine.attached(model, cfg, trace=True) as iv:
        if path == "scoring":
            engine.response_logprobs(model, full, [n] * out.shape[0], iv)
            last = out.shape[1]
        else:
            assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), out)  # gamma 0
            last = out.shape[1] - 1  # the last token is never fed back
    attentions = model(**full, output_attentions=True).attentions
    image_id = model.config.image_token_id
    for b in range(out.shape[0]):
        tr = iv.trace.sample(b)
        assert tr["positions"].tolist() == list(range(n - 1, last))
        img = [k for k in range(out.shape[1]) if int(out[b, k]) == image_id]
        for j, t in enumerate(tr["positions"].tolist()):
            for layer, att in enumerate(attentions):
                row = att[b, :, t].double()
                heads = row.shape[0]
                masses = [sum(float(row[h, k]) for k in img) for h in range(heads)]
                entropies = []
                for h in range(heads):
                    prof = [float(row[h, k]) / masses[h] for k in img]
                    entropies.append(-sum(p * math.log(p) for p in prof if p > 0))
                    focus = masses[h] * (1 - entropies[h] / math.log(len(img)))
                    want = focus if cfg.iaf_variant == "focus" else masses[h]
                    assert float(tr["iaf"][j, layer, h]) == pytest.approx(want, rel=1e-4, abs=1e-6)
                if cfg.layer_signal == "mass_deficit":
                    signal = -sum(masses) / heads
                elif cfg.liae_variant == "mixed":
                    mixed = [sum(float(row[h, k]) / masses[h] for h in range(heads)) / heads for k in img]
                    signal = -sum(p * math.log(p) for p in mixed if p > 0)
                else:
                    signal = sum(entropies) / heads
                if cfg.layer_signal == "liae" and cfg.liae_normalize:
                    signal /= math.log(len(img))
                assert float(tr["signal"][j, layer]) == pytest.approx(signal, rel=1e-4, abs=1e-5)
        # the running threshold, recomputed with a loop over earlier positions of the same layer
        sig = tr["signal"].double().numpy()
        for layer in range(sig.shape[1]):
            for j in range(sig.shape[0]):
                earlier = sig[:j, layer]
                if len(earlier) < cfg.warmup:
                    assert math.isnan(float(tr["tau"][j, layer])) and not tr["flag"][j, layer]
                    continue
                tau = earlier.mean() + cfg.kappa * earlier.std()
                assert float(tr["tau"][j, layer]) == pytest.approx(tau, rel=1e-6, abs=1e-9)
                assert bool(tr["flag"][j, layer]) == (sig[j, layer] > tau)
                # corrected heads: below the layer mean IAF, only where the layer is flagged
                iaf = tr["iaf"][j, layer].double()
                want = (iaf < iaf.mean()) & bool(tr["flag"][j, layer])
                assert torch.equal(tr["corrected"][j, layer], want)


def test_select_heads_and_fusion_on_a_hand_worked_example():
    iaf = torch.tensor([0.1, 0.6, 0.2, 0.5]).reshape(1, 4, 1)  # mean 0.35: heads 0 and 2 below it, h* = 1
    best, sel = engine.select_heads(iaf, "below_mean")
    assert best.item() == 1 and sel.flatten().tolist() == [True, False, True, False]
    assert engine.select_heads(iaf, "all_but_best")[1].flatten().tolist() == [True, False, True, True]
    assert engine.select_heads(iaf, "bottom_k", 1)[1].flatten().tolist() == [True, False, False, False]
    assert engine.select_heads(iaf, "bottom_k", 3)[1].flatten().tolist() == [True, False, True, True]
    rows = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8], [1.0, 0.0, 0.0], [0.3, 0.3, 0.4]]).reshape(1, 4, 1, 3)
    fused = engine.fuse_heads(rows, best, sel, 0.25)
    # head 0: 0.75 * [0.5, 0.5, 0] + 0.25 * [0, 0.2, 0.8] = [0.375, 0.425, 0.2]
    assert fused[0, 0, 0].tolist() == pytest.approx([0.375, 0.425, 0.2])
    # head 2: 0.75 * [1, 0, 0] + 0.25 * [0, 0.2, 0.8] = [0.75, 0.05, 0.2]
    assert fused[0, 2, 0].tolist() == pytest.approx([0.75, 0.05, 0.2])
    assert torch.equal(fused[0, 1], rows[0, 1]) and torch.equal(fused[0, 3], rows[0, 3])
    assert fused.sum(-1).flatten().tolist() == pytest.approx([1.0] * 4)
    torch.testing.assert_close(engine.fuse_heads(rows, best, sel, 1.0)[0, 0], rows[0, 1])
    # the random-target null: target (h* + shift) mod H, and the target itself is never corrected
    target, cor = engine.random_target(best, engine.select_heads(iaf, "all_but_best")[1], torch.tensor([[[2]]]))
    assert target.item() == 3 and cor.flatten().tolist() == [True, False, True, False]
    fused = engine.fuse_heads(rows, target, cor, 0.5)
    assert fused[0, 2, 0].tolist() == pytest.approx([0.65, 0.15, 0.2])  # 0.5 [1, 0, 0] + 0.5 [0.3, 0.3, 0.4]


@torch.no_grad()
def test_random_fusion_target_draws_a_head_other_than_the_best(tiny):
    """fusion_target="random" on the one-row path: with gamma 1 and every head but h* corrected, each corrected
    head's row becomes exactly the row of head (h* + shift) mod H, a head other than h*, which itself is left alone;
    with gamma 0 the output equals plain decoding."""
    model, _, _, _, batch = tiny
    seen = []

    def spy(rows, *args, **kwargs):
        before = rows.clone()
        out = step(rows, *args, **kwargs)
        seen.append((before, out[0].clone(), out[3], out[4], kwargs["target_shift"]))
        return out

    step = engine.one_row_step
    engine.one_row_step = spy
    try:
        with engine.attached(model, "dleaf", gamma=1.0, localization="everywhere", head_selection="all_but_best",
                             fusion_target="random", seed=3):
            model.generate(**batch, max_new_tokens=3, do_sample=False)
    finally:
        engine.one_row_step = step
    assert seen
    shifts = set()
    for before, after, iaf, corrected, shift in seen:
        H = before.shape[1]
        for b in range(before.shape[0]):
            best, s = int(iaf[b].argmax()), int(shift[b])
            target = (best + s) % H
            shifts.add(s)
            assert 1 <= s < H and target != best
            assert corrected[b, :, 0].tolist() == [h not in (best, target) for h in range(H)]
            for h in range(H):
                assert torch.equal(after[b, h], before[b, target if h not in (best, target) else h])
    assert len(shifts) > 1  # the draws vary
    plain = model.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    with engine.attached(model, "dleaf", gamma=0.0, localization="everywhere", fusion_target="random"):
        zero = model.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    assert _same_logits(zero.logits, plain.logits)


@torch.no_grad()
def test_state_follows_a_beam_style_cache_reordering(tiny):
    """Start with the batch in one order, swap the two cache rows before the first decoding step (as beam search
    reorders them): every later step must equal decoding the batch in the other order from the start."""
    model, processor, scenes, prompts, _ = tiny

    def run(order, swap_after):
        batch = _prompt_batch(processor, [scenes[i] for i in order], [prompts[i] for i in order])
        with engine.attached(model, "dleaf", trace=True, **STRONG) as iv:
            out = model(**batch, use_cache=True)
            cache, mask = out.cache, batch["attention_mask"]
            logits = []
            for step in range(6):
                nxt = out.logits[:, -1].argmax(-1)
                if step == swap_after:
                    cache.reorder_cache(torch.tensor([1, 0]))
                    nxt, mask = nxt.flip(0), mask.flip(0)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                out = model(input_ids=nxt[:, None], attention_mask=mask, cache=cache, use_cache=True)
                logits.append(out.logits[:, -1])
        return torch.stack(logits, 1), iv

    straight, iv_straight = run([0, 2], swap_after=None)
    swapped, iv_swapped = run([2, 0], swap_after=0)
    torch.testing.assert_close(swapped, straight, atol=1e-5, rtol=1e-5)
    for i in range(2):
        assert torch.equal(iv_swapped.trace.sample(i)["flag"], iv_straight.trace.sample(i)["flag"])


@torch.no_grad()
def test_sampling_and_beam_search_run_under_dleaf(tiny):
    model, _, _, _, batch = tiny
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


@torch.no_grad()
def test_baselines_are_neutral_at_zero_strength_and_act_otherwise(tiny):
    model, _, _, _, batch = tiny
    plain = model(**batch).logits
    for name, neutral, strong in [("pai", {"alpha": 0.0}, {"alpha": 1.0, "layer_start": 0}),
                                  ("spin", {"scale": 1.0}, {"keep_ratio": 0.5, "scale": 0.0}),
                                  ("no_localization", {"gamma": 0.0}, {"gamma": 1.0}),
                                  ("random_layers", {"gamma": 0.0}, {"gamma": 1.0, "random_rate": 1.0})]:
        with engine.attached(model, name, **neutral):
            assert torch.equal(model(**batch).logits, plain), name
        with engine.attached(model, name, **strong):
            assert not torch.equal(model(**batch).logits, plain), name


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


def _qwen(config_cls, model_cls, vision):
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=60, video_token_id=61,
                     vision_start_token_id=62, vision_end_token_id=63)
    model = model_cls(cfg).eval()
    model.set_attn_implementation("eager")
    ids = torch.tensor([[0, 0, 5, 62] + [60] * 4 + [63, 7, 8], [3, 4, 5, 62] + [60] * 4 + [63, 7, 9]])
    inputs = dict(input_ids=ids, attention_mask=(torch.arange(11) >= torch.tensor([[2], [0]])).long(),
                  pixel_values=torch.randn(32, 3 * 2 * 4 * 4), image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]),
                  mm_token_type_ids=(ids == 60).int())
    return model, inputs


QWENS = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                 dict(depth=1, embed_dim=16, num_heads=2, hidden_size=32, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2)),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                   dict(depth=1, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, patch_size=4,
                        spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0], window_size=8)),
}


def _llava_next():
    from PIL import Image
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = build.build_tokenizer()
    pinpoints = [[16, 32], [32, 16], [32, 32]]
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                        image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=8, image_token="<image>",
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("eager")
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray((rng.random((24, 30, 3)) * 255).astype("uint8")),
                Image.fromarray((rng.random((32, 20, 3)) * 255).astype("uint8"))]
    inputs = processor(text=["<image> describe the image .", "user : <image> what is in the image ?"],
                       images=pictures, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()  # different image sizes give different numbers of image tokens
    return model, dict(inputs)


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(QWENS) + ["llava_next"])
def test_other_vision_language_models(name):
    """LLaVA-NeXT (ragged image tokens per sample), Qwen2-VL and Qwen2.5-VL (M-RoPE, GQA): exact at gamma 0,
    acting otherwise, vision tower untouched."""
    model, inputs = _llava_next() if name == "llava_next" else _qwen(*QWENS[name])
    plain = model.generate(**inputs, max_new_tokens=5, **GEN)
    with engine.attached(model, "dleaf", gamma=0.0):
        zero = model.generate(**inputs, max_new_tokens=5, **GEN)
    with engine.attached(model, "dleaf", trace=True, **STRONG) as iv:
        strong = model.generate(**inputs, max_new_tokens=5, **GEN)
    assert torch.equal(zero.sequences, plain.sequences) and _same_logits(zero.logits, plain.logits)
    assert iv.flag_rate() > 0 and not _same_logits(strong.logits, plain.logits)
    assert model.config.vision_config._attn_implementation != engine.ATTENTION_NAME


def test_models_without_an_image_token_get_a_clear_error():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match="image_token_id"):
        engine.attach(model, "dleaf")


@torch.no_grad()
def test_a_sample_without_image_tokens_is_an_error(tiny):
    model, processor, _, _, _ = tiny
    ids = processor.tokenizer(["describe the image ."], return_tensors="pt")
    with engine.attached(model, "dleaf"), pytest.raises(ValueError, match="no image token"):
        model(**ids)


def test_configs_validate_their_knobs():
    with pytest.raises(ValueError, match="gamma"):
        DLeafConfig(gamma=1.5)
    with pytest.raises(ValueError, match="threshold"):
        DLeafConfig(threshold="cross_layer")
    with pytest.raises(ValueError, match="layer_end"):
        DLeafConfig(layer_start=3, layer_end=2)
    with pytest.raises(ValueError, match="fusion_target"):
        DLeafConfig(fusion_target="worst")
    with pytest.raises(ValueError, match="keep_ratio"):
        SPINConfig(keep_ratio=0)
    with pytest.raises(ValueError, match="alpha"):
        PAIConfig(alpha=-1)
    with pytest.raises(ValueError, match="unknown method"):
        method_config("vcd")
    with pytest.raises(ValueError, match="no knob"):
        method_config("pai", gamma=0.5)
    assert method_config("no_localization").localization == "everywhere"


def test_layer_range_must_fit_the_model(tiny):
    model = tiny[0]
    with pytest.raises(ValueError, match="does not fit"):
        engine.attach(model, "dleaf", layer_start=1, layer_end=9)
    assert not engine._MODULES


@torch.no_grad()
def test_scoring_rejects_mismatched_or_out_of_range_response_starts(tiny):
    model, _, _, _, batch = tiny
    n = batch["input_ids"].shape[1]
    with engine.attached(model, "dleaf") as iv:
        with pytest.raises(ValueError, match="2 entries for a batch of 3"):
            engine.response_logprobs(model, batch, [n - 1, n - 1], iv)
        with pytest.raises(ValueError, match="must lie in"):
            engine.response_logprobs(model, batch, [0, n - 1, n - 1], iv)
    with pytest.raises(ValueError, match="detached"):
        engine.response_logprobs(model, batch, [n - 1] * 3, iv)


def _responses(model, batch, length=9):
    """Responses that D-LEAF itself decoded (random tokens can put a layer's signal on its running threshold to the
    last float bit, where one-pass and step-by-step rounding may flag differently), one of them right-padded."""
    n = batch["input_ids"].shape[1]
    with engine.attached(model, "dleaf", **STRONG):
        response = model.generate(**batch, max_new_tokens=length, min_new_tokens=length, do_sample=False)[:, n:]
    mask = torch.ones_like(response)
    mask[1, length - 3:] = 0
    full = {**batch, "input_ids": torch.cat([batch["input_ids"], response], 1),
            "attention_mask": torch.cat([batch["attention_mask"], mask], 1)}
    return response, mask, full


@torch.no_grad()
@pytest.mark.parametrize("method,knobs", [("dleaf", STRONG), ("pai", {"alpha": 0.5, "layer_start": 0}),
                                          ("spin", {"keep_ratio": 0.5}), (None, {})])
def test_prompt_cache_scoring_equals_one_pass_and_step_by_step_scoring(tiny, method, knobs):
    model, _, _, _, batch = tiny
    n = batch["input_ids"].shape[1]
    response, mask, full = _responses(model, batch)
    plain, _ = engine.response_logprobs(model, full, [n] * 3)
    with engine.attached(model, method, trace=method == "dleaf", **knobs) as iv:
        prompt = engine.PromptCache(model, batch)  # made with the intervention attached: it is set aside meanwhile
        assert prompt.cache.get_seq_length() == n - 1
        ref, ref_mask = engine.response_logprobs(model, full, [n] * 3, iv)
        ref_trace = iv.trace.sample(0) if iv is not None and iv.trace is not None else None
    with engine.attached(model, method, trace=method == "dleaf", **knobs) as iv:  # a fresh trace
        once = engine.cached_response_logprobs(prompt, response, mask, iv)
        once_trace = iv.trace.sample(0) if ref_trace is not None else None
        again = engine.cached_response_logprobs(prompt, response, mask, iv)
        steps = engine.cached_stepwise_logprobs(prompt, response, mask, iv)
    assert prompt.cache.get_seq_length() == n - 1  # cropped back after every call
    assert torch.equal(ref_mask[:, n:], mask.bool())
    torch.testing.assert_close(once, ref[:, n:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps, ref[:, n:], atol=1e-5, rtol=1e-5)
    assert torch.equal(again, once) and (once[mask == 0] == 0).all()
    if method is not None:
        assert (ref - plain).abs().max() > 1e-4  # the method acted, and the cached scorers reproduce it
    if ref_trace is not None:  # the same rows flagged and heads corrected
        assert torch.equal(once_trace["positions"], ref_trace["positions"])
        assert torch.equal(once_trace["flag"], ref_trace["flag"]) and ref_trace["flag"].any()
        assert torch.equal(once_trace["corrected"], ref_trace["corrected"])


@torch.no_grad()
def test_prompt_cache_on_llava_next_with_ragged_image_tokens():
    model, inputs = _llava_next()
    n = inputs["input_ids"].shape[1]
    response = torch.randint(5, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], response], 1),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(response)], 1)}
    prompt = engine.PromptCache(model, inputs)
    with engine.attached(model, "dleaf", **STRONG) as iv:
        ref, _ = engine.response_logprobs(model, full, [n, n], iv)
    with engine.attached(model, "dleaf", **STRONG) as iv:
        once = engine.cached_response_logprobs(prompt, response, intervention=iv)
        steps = engine.cached_stepwise_logprobs(prompt, response, intervention=iv)
    plain, _ = engine.response_logprobs(model, full, [n, n])
    torch.testing.assert_close(once, ref[:, n:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps, ref[:, n:], atol=1e-5, rtol=1e-5)
    assert (plain - ref).abs().max() > 1e-5  # D-LEAF acted


@torch.no_grad()
def test_prompt_cache_refuses_what_it_cannot_score_right(tiny):
    model, _, _, _, batch = tiny
    response, mask, _ = _responses(model, batch)
    prompt = engine.PromptCache(model, batch)
    with pytest.raises(ValueError, match=r"response must have shape \(3, length >= 1\)"):
        engine.cached_response_logprobs(prompt, response[:2])
    with pytest.raises(ValueError, match="response_mask has shape"):
        engine.cached_response_logprobs(prompt, response, mask[:, :2])
    with engine.attached(model, "dleaf") as iv:
        with pytest.raises(ValueError, match="pass it to the cached scorer"):
            engine.cached_response_logprobs(prompt, response)
    with pytest.raises(ValueError, match="not the one attached"):
        engine.cached_stepwise_logprobs(prompt, response, intervention=iv)
    assert prompt.cache.get_seq_length() == batch["input_ids"].shape[1] - 1
    image = engine.image_token_id(model)
    ends_in_image = {**batch, "input_ids": torch.cat([batch["input_ids"][:, :-1],
                                                      torch.full_like(batch["input_ids"][:, :1], image)], 1)}
    with pytest.raises(ValueError, match="ends with an image token"):
        engine.PromptCache(model, ends_in_image)
    with pytest.raises(ValueError, match="length >= 2"):
        engine.PromptCache(model, {"input_ids": batch["input_ids"][:, :1]})
    qwen, inputs = _qwen(*QWENS["qwen2_vl"])
    with pytest.raises(ValueError, match="M-RoPE"):
        engine.PromptCache(qwen, inputs)


SYNCING_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal"}  # .item(), bool(), int(), ...


@torch.no_grad()
@pytest.mark.parametrize("method,knobs", [
    ("dleaf", {}), ("dleaf", STRONG), ("dleaf", dict(STRONG, unwatched="sdpa")),
    ("dleaf", dict(layer_signal="mass_deficit", threshold="best", iaf_variant="focus", head_selection="bottom_k")),
    ("dleaf", dict(localization="random", fusion_target="random")), ("pai", {}), ("spin", {})])
def test_a_decoding_step_never_waits_for_the_device(tiny, method, knobs):
    """No operator that copies a tensor value to the host (``.item()``, ``bool()``, ``nonzero``) in a cached
    decoding step of a left-padded batch, beam-style reordering check included: on a GPU the step stays
    asynchronous (a trace, a diagnostic, copies its records to the CPU and is left out)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model, _, _, _, batch = tiny
    with engine.attached(model, method, **knobs):
        out = model(**batch, use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        mask = batch["attention_mask"]
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(2):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            with Ops():
                out = model(input_ids=token, attention_mask=mask, use_cache=True,
                            **{engine.cache_kwarg(model): cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    assert "lerp_" in Ops.seen or method != "dleaf"  # the mode saw the engine's work
    assert not Ops.seen & SYNCING_OPS, sorted(Ops.seen & SYNCING_OPS)


@torch.no_grad()
def test_fast_unwatched_path_agrees_with_the_exact_one(tiny):
    model, _, _, _, batch = tiny
    with engine.attached(model, "dleaf", layer_start=1, layer_end=2, **STRONG):
        exact = model.generate(**batch, max_new_tokens=8, **GEN)
    with engine.attached(model, "dleaf", layer_start=1, layer_end=2, unwatched="sdpa", **STRONG):
        fast = model.generate(**batch, max_new_tokens=8, **GEN)
    assert torch.equal(exact.sequences, fast.sequences)
    for a, b in zip(exact.logits, fast.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_unwatched_auto_follows_the_model_attention(tiny):
    model, _, _, _, batch = tiny
    assert [engine.resolve_unwatched("auto", i) for i in ("eager", None, "sdpa", "flash_attention_2")] == \
        ["eager", "eager", "sdpa", "sdpa"]
    assert engine.resolve_unwatched("eager", "sdpa") == "eager" and engine.resolve_unwatched("sdpa", "eager") == "sdpa"
    knobs = dict(layer_start=1, layer_end=2, **STRONG)
    with engine.attached(model, "dleaf", **knobs) as iv:
        assert iv.unwatched == "eager"  # the tiny organism is loaded with eager attention
    with engine.attached(model, "dleaf", unwatched="sdpa", **knobs):
        explicit = model.generate(**batch, max_new_tokens=6, **GEN)
    impl = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "sdpa"})
    try:
        with engine.attached(model, "dleaf", **knobs) as iv:
            assert iv.unwatched == "sdpa"
            auto = model.generate(**batch, max_new_tokens=6, **GEN)
        assert model.config.text_config._attn_implementation == "sdpa"  # restored on detach
    finally:
        model.set_attn_implementation({"text_config": impl})
    assert torch.equal(auto.sequences, explicit.sequences) and _same_logits(auto.logits, explicit.logits)
    with pytest.raises(ValueError, match="unwatched must be 'auto'"):
        engine.attach(model, "dleaf", unwatched="flash")


@pytest.mark.slow
@torch.no_grad()
def test_compiled_step_gives_the_same_generation(tiny):
    """compile=True runs the per-token step through torch.compile (slow: it compiles): same tokens, same logits and
    the same flags as the plain step."""
    model, _, _, _, batch = tiny
    outs, rates = [], []
    for comp in (False, True):
        with engine.attached(model, "dleaf", compile=comp, trace=True, **STRONG) as iv:
            outs.append(model.generate(**batch, max_new_tokens=8, **GEN))
        rates.append(iv.flag_rate())
    assert torch.equal(outs[0].sequences, outs[1].sequences) and rates[0] == rates[1] > 0
    for a, b in zip(outs[0].logits, outs[1].logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_generation_kwargs_of_attention_methods_and_of_nothing_attached(tiny):
    """Methods acting inside the attention need nothing extra in generate; None (plain decoding) neither; a detached
    intervention is an error, not a silent no-op."""
    model, _, _, _, batch = tiny
    assert engine.generation_kwargs(None, batch) == {}
    for name in ("dleaf", "pai", "spin"):
        with engine.attached(model, name) as iv:
            assert engine.generation_kwargs(iv, batch) == {}
    with pytest.raises(ValueError, match="detached"):
        engine.generation_kwargs(iv, batch)
