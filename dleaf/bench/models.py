"""The benchmark's models and inputs: the organism and a LLaVA-1.5-shaped model, with caption prompts on organism scenes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .. import engine, models
from .config import MODELS, BenchConfig, LlavaShape

# ---------------------------------------------------------------------------------------------------- models
def build_llava_shaped(shape: LlavaShape = LlavaShape(), seed: int = 0, device="cpu", dtype=None):
    """A randomly initialised LLaVA-1.5-shaped ``LlavaForConditionalGeneration`` and its processor, offline. The
    weights are made on ``device`` in ``dtype`` (default float32) directly, so that a 7B shape never passes through
    host memory in float32."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, \
        LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    organism = models.build_processor("organism")  # its word-level tokenizer and chat template
    tok = organism.tokenizer
    tok.model_max_length = shape.max_positions
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": shape.image_size},
                                              crop_size={"height": shape.image_size, "width": shape.image_size}),
        tokenizer=tok, patch_size=shape.patch, vision_feature_select_strategy="default",
        chat_template=organism.chat_template, image_token="<image>", num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=4 * shape.vision_hidden,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image_size, patch_size=shape.patch, projection_dim=shape.vision_hidden)
    text = LlamaConfig(vocab_size=max(len(tok), shape.vocab_size), hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
                       num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                       num_key_value_heads=shape.text_heads, max_position_embeddings=shape.max_positions,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-1, image_seq_length=shape.image_tokens, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype or torch.float32).eval()
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    gen.do_sample = False
    return model, processor


def build_organism(cfg: BenchConfig):
    """The committed organism when present (and ``cfg.use_checkpoint``), else a random one; with its source."""
    if cfg.use_checkpoint and cfg.organism_shape is None and (Path(models.resolve("organism")[0]) /
                                                               "config.json").is_file():
        model, processor = models.load("organism", device="cpu")
        return model, processor, "checkpoint"
    model, processor = models.build("organism", cfg.organism_shape, seed=cfg.seed)
    return model, processor, "random"


def caption_batch(processor, images, prompt: str) -> dict:
    """Model inputs asking ``prompt`` about each image, through the processor's own chat template, left-padded."""
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text] * len(images), images=list(images), return_tensors="pt", padding=True))


def build_model_and_inputs(name: str, cfg: BenchConfig, batch_sizes: Sequence[int]):
    """``(model, inputs by batch size, description)`` for model ``name``; the inputs are caption prompts on
    held-out organism scenes (the ``organism_caption`` benchmark's adversarial split, one scene per sample), on
    ``cfg.device``."""
    from .. import eval as harness

    if name == "organism":
        model, processor, source = build_organism(cfg)
    elif name == "llava_shaped":
        model, processor = build_llava_shaped(cfg.llava_shape, seed=cfg.seed, device=cfg.device,
                                              dtype=cfg.torch_dtype)
        source = "random"
    else:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    model.to(device=cfg.device, dtype=cfg.torch_dtype)
    n = max(batch_sizes)
    items = harness.load_benchmark("organism_caption", limit=n, splits=["adversarial"]).items
    batch = caption_batch(processor, [it.image() for it in items], items[0].prompt)
    inputs = {b: {k: _to(v[:b], cfg) for k, v in batch.items()} for b in batch_sizes}
    tc = model.config.text_config
    image_id = engine.image_token_id(model)
    desc = {
        "name": name, "source": source,
        "layers": int(tc.num_hidden_layers), "heads": int(tc.num_attention_heads), "hidden": int(tc.hidden_size),
        "intermediate": int(tc.intermediate_size), "vocab": int(tc.vocab_size),
        "image_tokens": int((batch["input_ids"][0] == image_id).sum()),
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
    }
    return model, inputs, desc


def _to(tensor: torch.Tensor, cfg: BenchConfig) -> torch.Tensor:
    """An input tensor on the run's device; floating ones (the pixel values) in the run's dtype."""
    if tensor.is_floating_point():
        return tensor.to(device=cfg.device, dtype=cfg.torch_dtype)
    return tensor.to(cfg.device)


def set_text_attention(model, name: str) -> None:
    """Switch the text decoder (only) to attention implementation ``name``; the vision tower stays on sdpa."""
    model.set_attn_implementation({"text_config": name, "vision_config": "sdpa"})

