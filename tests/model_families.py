"""Tiny random vision-language models of the families transformers ships, built offline in the test (no downloads):
a config scaled down to a few thousand parameters, a model in eval mode on eager attention, and a left-padded batch
of two prompts with each sample's image tokens where the model puts its image features.

Each builder returns ``(model, inputs)``. The number of image tokens of a sample is read from the model itself
(``get_image_features`` on the sample's pixels), so the inputs match whatever the family's vision path produces.
"""

from __future__ import annotations

import torch

IMAGE = 100  # the image placeholder token id in every tiny vocabulary
VOCAB = 128
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)


def _finish(model):
    model = model.eval()
    model.set_attn_implementation("eager")
    g = model.generation_config
    g.pad_token_id, g.bos_token_id, g.eos_token_id, g.do_sample = 0, 1, 2, False
    return model


def _features_per_image(model, **pixels) -> list[int]:
    with torch.no_grad():
        out = getattr(model, "model", model).get_image_features(**pixels)
    feats = getattr(out, "pooler_output", out)
    if feats is None:
        feats = out.last_hidden_state
    if isinstance(feats, torch.Tensor):
        feats = list(feats) if feats.dim() == 3 else [feats]
    return [int(f.reshape(-1, f.shape[-1]).shape[0]) for f in feats]


def _batch(counts: list[int], before=(5, 6), after=(7, 8, 9), longer: int = 2, wrap=None) -> dict:
    """One prompt per image: ``before`` + the image tokens (``wrap``: (start, end) ids around them) + ``after``; the
    last sample has ``longer`` more text tokens, so the others are left-padded."""
    rows = []
    for i, n in enumerate(counts):
        img = [IMAGE] * n if wrap is None else [wrap[0]] + [IMAGE] * n + [wrap[1]]
        rows.append(list(before) + img + list(after) + (list(range(10, 10 + longer)) if i == len(counts) - 1 else []))
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _clip(**kw):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{**dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=16, patch_size=8, projection_dim=16), **kw})


def _siglip(**kw):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**{**dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8), **kw})


def _pixels(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- families
def llava():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=_clip(), text_config=LlamaConfig(**TEXT), image_token_id=IMAGE,
                      vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=4)
    model = _finish(LlavaForConditionalGeneration(cfg))
    pixels = _pixels(2, 3, 16, 16)
    inputs = _batch(_features_per_image(model, pixel_values=pixels))
    return model, {**inputs, "pixel_values": pixels}


def vipllava():
    from transformers import LlamaConfig, VipLlavaConfig, VipLlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = VipLlavaConfig(vision_config=_clip(num_hidden_layers=2), text_config=LlamaConfig(**TEXT),
                         image_token_id=IMAGE, vision_feature_layers=[-2, -1], image_seq_length=4)
    model = _finish(VipLlavaForConditionalGeneration(cfg))
    pixels = _pixels(2, 3, 16, 16)
    inputs = _batch(_features_per_image(model, pixel_values=pixels))
    return model, {**inputs, "pixel_values": pixels}


def llava_next():
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    pinpoints = [[16, 32], [32, 16], [32, 32]]
    cfg = LlavaNextConfig(vision_config=_clip(), text_config=LlamaConfig(**TEXT), image_token_id=IMAGE,
                          image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default",
                          vision_feature_layer=-1)
    model = _finish(LlavaNextForConditionalGeneration(cfg))
    pixels = _pixels(2, 3, 3, 16, 16)  # base + 2 tiles of a 16x32 / 32x16 image
    sizes = torch.tensor([[16, 32], [32, 16]])
    inputs = _batch(_features_per_image(model, pixel_values=pixels, image_sizes=sizes))
    return model, {**inputs, "pixel_values": pixels, "image_sizes": sizes}


def llava_onevision():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config

    torch.manual_seed(0)
    pinpoints = [[16, 32], [32, 16], [32, 32]]
    cfg = LlavaOnevisionConfig(vision_config=_siglip(), text_config=Qwen2Config(**TEXT), image_token_id=IMAGE,
                               video_token_id=101, image_grid_pinpoints=pinpoints,
                               vision_feature_select_strategy="full", vision_feature_layer=-1)
    model = _finish(LlavaOnevisionForConditionalGeneration(cfg))
    pixels = _pixels(2, 3, 3, 16, 16)
    sizes = torch.tensor([[16, 32], [32, 16]])
    inputs = _batch(_features_per_image(model, pixel_values=pixels, image_sizes=sizes))
    return model, {**inputs, "pixel_values": pixels, "image_sizes": sizes}


def _qwen_vl(config_cls, model_cls, vision, text_extra=None, mrope=(2, 1, 1)):
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope)}
    text = {**TEXT, "rope_parameters": rope, **(text_extra or {})}
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=101,
                     vision_start_token_id=102, vision_end_token_id=103)
    model = _finish(model_cls(cfg))
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    patch = vision.get("patch_size", 4)
    pixels = _pixels(32, 3 * 2 * patch * patch)
    counts = _features_per_image(model, pixel_values=pixels, image_grid_thw=grid)
    inputs = _batch(counts, wrap=(102, 103))
    return model, {**inputs, "pixel_values": pixels, "image_grid_thw": grid,
                   "mm_token_type_ids": (inputs["input_ids"] == IMAGE).int()}


def qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    return _qwen_vl(Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                    dict(depth=1, embed_dim=16, num_heads=2, hidden_size=32, patch_size=4, spatial_merge_size=2,
                         temporal_patch_size=2))


def qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return _qwen_vl(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                    dict(depth=1, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, patch_size=4,
                         spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0], window_size=8))


def qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    return _qwen_vl(Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                    dict(depth=1, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, patch_size=4,
                         spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                         deepstack_visual_indexes=[0]), mrope=(2, 1, 1))


def _paligemma(text_config):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(0)
    cfg = PaliGemmaConfig(vision_config=_siglip(projection_dim=32), text_config=text_config, image_token_id=IMAGE,
                          projection_dim=32)
    cfg.text_config.vocab_size = VOCAB
    model = _finish(PaliGemmaForConditionalGeneration(cfg))
    pixels = _pixels(2, 3, 16, 16)
    inputs = _batch(_features_per_image(model, pixel_values=pixels), before=(), after=(1, 5, 6, 7))
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    return model, {**inputs, "pixel_values": pixels}


def paligemma():
    from transformers import GemmaConfig

    return _paligemma(GemmaConfig(**TEXT))


def paligemma2():
    """PaliGemma 2: a Gemma-2 decoder, whose attention caps its logits (``attn_logit_softcapping``); the query and
    key projections are scaled up so that the scores reach the cap."""
    from transformers import Gemma2Config

    model, inputs = _paligemma(Gemma2Config(**TEXT, attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                                            sliding_window=8, query_pre_attn_scalar=8))
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    return model, inputs


def gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig

    torch.manual_seed(0)
    text = Gemma3TextConfig(**TEXT, sliding_window=8, query_pre_attn_scalar=8,
                            layer_types=["sliding_attention", "full_attention"])
    cfg = Gemma3Config(vision_config=_siglip(), text_config=text, image_token_id=IMAGE, boi_token_index=104,
                       eoi_token_index=105, mm_tokens_per_image=4)
    model = _finish(Gemma3ForConditionalGeneration(cfg))
    pixels = _pixels(2, 3, 16, 16)
    inputs = _batch(_features_per_image(model, pixel_values=pixels), wrap=(104, 105))
    inputs["token_type_ids"] = (inputs["input_ids"] == IMAGE).long()
    return model, {**inputs, "pixel_values": pixels}


def _idefics3_like(config_cls, model_cls):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    cfg = config_cls(vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_id=IMAGE, scale_factor=2)
    model = _finish(model_cls(cfg))
    pixels = _pixels(2, 1, 3, 32, 32)
    counts = _features_per_image(model, pixel_values=pixels)
    inputs = _batch(counts, wrap=(104, 104))
    return model, {**inputs, "pixel_values": pixels}


def idefics3():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    return _idefics3_like(Idefics3Config, Idefics3ForConditionalGeneration)


def smolvlm():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    return _idefics3_like(SmolVLMConfig, SmolVLMForConditionalGeneration)


def mistral3():
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(0)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=16, patch_size=4, head_dim=8)
    cfg = Mistral3Config(vision_config=vision, text_config=MistralConfig(**TEXT), image_token_id=IMAGE,
                         spatial_merge_size=2, vision_feature_layer=-1)
    model = _finish(Mistral3ForConditionalGeneration(cfg))
    pixels = _pixels(2, 3, 16, 16)
    sizes = torch.tensor([[16, 16], [16, 16]])
    inputs = _batch(_features_per_image(model, pixel_values=pixels, image_sizes=sizes))
    return model, {**inputs, "pixel_values": pixels, "image_sizes": sizes}


def aya_vision():
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, Cohere2Config

    torch.manual_seed(0)
    text = Cohere2Config(**TEXT, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    cfg = AyaVisionConfig(vision_config=_siglip(image_size=32), text_config=text, image_token_id=IMAGE,
                          downsample_factor=2, adapter_layer_norm_eps=1e-5, vision_feature_select_strategy="full",
                          vision_feature_layer=-1)
    model = _finish(AyaVisionForConditionalGeneration(cfg))
    pixels = _pixels(2, 3, 32, 32)
    inputs = _batch(_features_per_image(model, pixel_values=pixels))
    return model, {**inputs, "pixel_values": pixels}


def internvl():
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    torch.manual_seed(0)
    vision = InternVLVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=[16, 16], patch_size=[4, 4])
    cfg = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**TEXT), image_token_id=IMAGE,
                         downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = _finish(InternVLForConditionalGeneration(cfg))
    pixels = _pixels(2, 3, 16, 16)
    inputs = _batch(_features_per_image(model, pixel_values=pixels), wrap=(104, 105))
    return model, {**inputs, "pixel_values": pixels}


def got_ocr2():
    from transformers import GotOcr2Config, GotOcr2ForConditionalGeneration, Qwen2Config

    torch.manual_seed(0)
    vision = dict(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=2, image_size=128,
                  patch_size=16, mlp_dim=32, global_attn_indexes=[0], window_size=2)
    cfg = GotOcr2Config(vision_config=vision, text_config=Qwen2Config(**TEXT), image_token_index=IMAGE)
    model = _finish(GotOcr2ForConditionalGeneration(cfg))
    pixels = _pixels(2, 3, 128, 128)
    inputs = _batch(_features_per_image(model, pixel_values=pixels))
    return model, {**inputs, "pixel_values": pixels}


# ---------------------------------------------------------------------------------------------------- more families
def llava_next_video():
    from transformers import LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    torch.manual_seed(0)
    pinpoints = [[16, 32], [32, 16], [32, 32]]
    cfg = LlavaNextVideoConfig(vision_config=_clip(), text_config=LlamaConfig(**TEXT), image_token_index=IMAGE,
                               video_token_index=101, image_grid_pinpoints=pinpoints,
                               vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = _finish(LlavaNextVideoForConditionalGeneration(cfg))
    pixels = _pixels(2, 3, 3, 16, 16)
    sizes = torch.tensor([[16, 32], [32, 16]])
    inputs = _batch(_features_per_image(model, pixel_values=pixels, image_sizes=sizes))
    return model, {**inputs, "pixel_values": pixels, "image_sizes": sizes}


def video_llava():
    from transformers import LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = VideoLlavaConfig(vision_config=_clip(), text_config=LlamaConfig(**TEXT), image_token_index=IMAGE,
                           video_token_index=101, vision_feature_layer=-1, image_seq_length=4)
    model = _finish(VideoLlavaForConditionalGeneration(cfg))
    pixels = _pixels(2, 3, 16, 16)
    inputs = _batch(_features_per_image(model, pixel_values_images=pixels))
    return model, {**inputs, "pixel_values_images": pixels}


def idefics2():
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, MistralConfig

    torch.manual_seed(0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    perceiver = dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                     resampler_head_dim=8, num_key_value_heads=1)
    cfg = Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=MistralConfig(**TEXT),
                         image_token_id=IMAGE)
    model = _finish(Idefics2ForConditionalGeneration(cfg))
    pixels = _pixels(2, 1, 3, 16, 16)
    inputs = _batch(_features_per_image(model, pixel_values=pixels), wrap=(104, 104))
    return model, {**inputs, "pixel_values": pixels}


def glm4v():
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 0, 1], "partial_rotary_factor": 0.5}
    text = {**TEXT, "rope_parameters": rope}
    vision = dict(depth=1, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, image_size=16)
    cfg = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=101,
                      image_start_token_id=102, image_end_token_id=103)
    model = _finish(Glm4vForConditionalGeneration(cfg))
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    pixels = _pixels(32, 3 * 2 * 4 * 4)
    inputs = _batch(_features_per_image(model, pixel_values=pixels, image_grid_thw=grid), wrap=(102, 103))
    return model, {**inputs, "pixel_values": pixels, "image_grid_thw": grid,
                   "mm_token_type_ids": (inputs["input_ids"] == IMAGE).int()}


def cohere2_vision():
    from transformers import Cohere2Config, Cohere2VisionConfig, Cohere2VisionForConditionalGeneration

    torch.manual_seed(0)
    text = Cohere2Config(**TEXT, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    cfg = Cohere2VisionConfig(vision_config=_siglip(image_size=32), text_config=text, image_token_id=IMAGE,
                              downsample_factor=2, alignment_intermediate_size=32)
    model = _finish(Cohere2VisionForConditionalGeneration(cfg))
    pixels = _pixels(2, 3, 32, 32)
    inputs = _batch(_features_per_image(model, pixel_values=pixels))
    return model, {**inputs, "pixel_values": pixels}


def mllama():
    """Llama 3.2 Vision: the image enters through cross-attention layers (refused)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(0)
    text = dict(TEXT, num_hidden_layers=3, cross_attention_layers=[1], vocab_size=VOCAB + 8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_global_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8, vision_output_dim=32, max_num_tiles=1,
                  intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1]])
    cfg = MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)
    model = _finish(MllamaForConditionalGeneration(cfg))
    inputs = _batch([1, 1])
    b = inputs["input_ids"].shape[0]
    return model, {**inputs, "pixel_values": _pixels(b, 1, 1, 3, 16, 16),
                   "aspect_ratio_ids": torch.ones(b, 1, dtype=torch.long),
                   "aspect_ratio_mask": torch.ones(b, 1, 1, dtype=torch.long),
                   "cross_attention_mask": torch.ones(b, inputs["input_ids"].shape[1], 1, 1, dtype=torch.long)}


def lfm2_vl():
    """LFM2-VL: a hybrid decoder (convolution layers between the attention layers; refused)."""
    from transformers import Lfm2Config, Lfm2VlConfig, Lfm2VlForConditionalGeneration, Siglip2VisionConfig

    torch.manual_seed(0)
    text = Lfm2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      layer_types=["conv", "full_attention"])
    vision = Siglip2VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_patches=16, patch_size=4)
    cfg = Lfm2VlConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, projector_hidden_size=32)
    model = _finish(Lfm2VlForConditionalGeneration(cfg))
    return model, {**_batch([4, 4])}


#: Every family built in the test, with how it shows in the README.
FAMILIES = {
    "llava": ("LLaVA-1.5 (Llava)", llava),
    "vipllava": ("ViP-LLaVA", vipllava),
    "llava_next": ("LLaVA-NeXT", llava_next),
    "llava_onevision": ("LLaVA-OneVision", llava_onevision),
    "qwen2_vl": ("Qwen2-VL", qwen2_vl),
    "qwen2_5_vl": ("Qwen2.5-VL", qwen2_5_vl),
    "qwen3_vl": ("Qwen3-VL", qwen3_vl),
    "paligemma": ("PaliGemma", paligemma),
    "paligemma2": ("PaliGemma 2", paligemma2),
    "gemma3": ("Gemma 3", gemma3),
    "idefics3": ("Idefics3", idefics3),
    "smolvlm": ("SmolVLM", smolvlm),
    "mistral3": ("Mistral 3 (Pixtral vision)", mistral3),
    "aya_vision": ("Aya Vision", aya_vision),
    "internvl": ("InternVL", internvl),
    "got_ocr2": ("GOT-OCR2", got_ocr2),
    "llava_next_video": ("LLaVA-NeXT-Video", llava_next_video),
    "video_llava": ("Video-LLaVA", video_llava),
    "idefics2": ("Idefics2", idefics2),
    "glm4v": ("GLM-4V", glm4v),
    "cohere2_vision": ("Command A Vision (Cohere2-Vision)", cohere2_vision),
    "mllama": ("Llama 3.2 Vision (Mllama)", mllama),
    "lfm2_vl": ("LFM2-VL", lfm2_vl),
}
