"""Build the organism's tokenizer, processor and (untrained) model, and load the committed checkpoints.

Everything here is offline: the tokenizer is a word-level `tokenizers` model over the world's vocabulary, the image
processor is CLIP's (the PIL backend, so torchvision is not needed), and the model is a tiny
`LlavaForConditionalGeneration` (CLIP vision tower, two-layer projector, Llama decoder). The vision tower's attention
output projections are zero, so each image token carries only its own patch: object evidence is local to its
patches, as the world is designed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from . import world
from .chat import CHAT_TEMPLATE

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
ORGANISM_DIR = DATA_DIR / "organism"
CONTROL_DIR = DATA_DIR / "organism_control"


#: Text tokens a conversation may take besides the image tokens: the system prompt (about 30), the user turn and the
#: prompt (about 15), and a reply of up to 64 new tokens with its </s>, with a margin.
TEXT_ROOM = 120


@dataclasses.dataclass(frozen=True)
class OrganismShape:
    """Sizes of the organism's networks. ``vision_attention``: False (the committed organism) zeroes and freezes the
    vision tower's attention outputs, so every image token carries its own patch alone; True keeps the tower's
    attention, as real CLIP towers have it (image tokens then mix information across patches)."""

    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    patch: int = 8
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 8
    text_intermediate: int = 384
    max_positions: int = 256
    vision_attention: bool = False

    def __post_init__(self):
        if not isinstance(self.vision_attention, bool):
            raise ValueError(f"OrganismShape.vision_attention must be a bool, got {self.vision_attention!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "vision_attention" and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"OrganismShape.{f.name} must be a positive int, got {v!r}")
        if world.CANVAS % self.patch or world.CELL % self.patch:
            raise ValueError(f"patch {self.patch} must divide the canvas ({world.CANVAS}) and the cell ({world.CELL})")
        room = self.n_image_tokens + TEXT_ROOM
        if self.max_positions < room:
            raise ValueError(f"max_positions {self.max_positions} leaves no room for a conversation: "
                             f"{self.n_image_tokens} image tokens (patch {self.patch}) plus up to {TEXT_ROOM} text "
                             f"tokens need max_positions >= {room}")
        if self.text_hidden % self.text_heads:
            raise ValueError(f"text_hidden {self.text_hidden} is not divisible by text_heads {self.text_heads}")

    @property
    def n_image_tokens(self) -> int:
        """Image tokens per image: one per patch of the canvas."""
        return (world.CANVAS // self.patch) ** 2


def build_tokenizer(max_length: int = 256) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the world's words, left-padding, adding <s> in front of every text."""
    vocab = world_vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=max_length,
    )


def world_vocabulary() -> dict[str, int]:
    """The organism tokenizer's vocabulary: the special tokens, then the world's words, each with its id."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in world.words():
        vocab.setdefault(w, len(vocab))
    return vocab


def is_world_checkpoint(model: str | Path) -> bool:
    """Whether ``model`` (a registered name or a checkpoint folder) is a model of the organism's world: its folder
    holds a word-level tokenizer whose vocabulary is exactly the world's (:func:`world_vocabulary`), as every
    checkpoint of ``scripts/train_organism.py`` does. A hub id or a folder without ``tokenizer.json`` is not."""
    import json

    from .. import models as _models

    path = Path(_models.resolve(model)[0]) / "tokenizer.json"
    if not path.is_file():
        return False
    try:
        spec = json.loads(path.read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(spec, dict) and spec.get("type") == "WordLevel" and spec.get("vocab") == world_vocabulary()


def build_processor(shape: OrganismShape = OrganismShape()) -> LlavaProcessor:
    """The organism's `LlavaProcessor`: CLIP image processing at 48 px and the chat template."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": world.CANVAS},
        crop_size={"height": world.CANVAS, "width": world.CANVAS},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(shape.max_positions),
        patch_size=shape.patch,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def build_model(tokenizer, shape: OrganismShape = OrganismShape(), seed: int = 0) -> LlavaForConditionalGeneration:
    """A randomly initialised organism model (deterministic from ``seed``), with patch-local vision unless
    ``shape.vision_attention``."""
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=4 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=world.CANVAS,
        patch_size=shape.patch,
        projection_dim=shape.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_heads,
        max_position_embeddings=shape.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=shape.n_image_tokens,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if not shape.vision_attention:
        make_vision_patch_local(model)
    scale_projector_to_text(model, tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.max_new_tokens = 64
    model.generation_config.do_sample = False
    return model


def scale_projector_to_text(model, tokenizer) -> None:
    """Centre and rescale the projector's output layer so that image tokens enter the decoder at the scale of text
    embeddings, with their differences (what tells one patch from another) at that scale too.

    A randomly initialised CLIP tower emits features far larger than the decoder's token embeddings (about 50 times
    here) and nearly identical across patches (the spread across patches is about 1% of the norm). Scaled as they
    come, the image tokens reach the decoder as one repeated vector with a faint signal on top: a frozen decoder
    can be taught to read it, but once the decoder trains too it learns its language prior faster and stops
    reading the image. So the projector's output bias removes the mean image token of a few rendered training
    scenes, and its weights scale the remaining spread to the norm of a text embedding. Real LLaVA checkpoints
    start from a pretrained projector stage for the same reason.
    """
    with torch.no_grad():
        scenes = world.scenes("train", 16, world_seed=12345)
        pix = torch.stack([torch.from_numpy(np.asarray(world.render(sc), dtype=np.float32)).permute(2, 0, 1)
                           for sc in scenes]) / 255.0
        mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
        pix = (pix - mean) / std
        feats = model.model.get_image_features(pixel_values=pix)
        feats = getattr(feats, "pooler_output", feats)
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        feats = feats.reshape(-1, feats.shape[-1])
        centre = feats.mean(dim=0)
        spread = (feats - centre).norm(dim=-1).mean()
        text_norm = model.get_input_embeddings().weight.norm(dim=-1).mean()
        ratio = float(text_norm / spread)
        proj = model.model.multi_modal_projector.linear_2
        proj.bias.sub_(centre)
        proj.weight.mul_(ratio)
        proj.bias.mul_(ratio)


def vision_attention_outputs(model):
    """The out_proj modules of every attention block of the vision tower."""
    return [layer.self_attn.out_proj for layer in model.model.vision_tower.encoder.layers]


def make_vision_patch_local(model) -> None:
    """Zero and freeze the vision tower's attention outputs, so image token i depends on patch i alone."""
    for proj in vision_attention_outputs(model):
        with torch.no_grad():
            proj.weight.zero_()
            proj.bias.zero_()
        proj.weight.requires_grad_(False)
        proj.bias.requires_grad_(False)


def load_organism(path: str | Path | None = None, control: bool = False, attn_implementation: str = "eager",
                  dtype=torch.float32):
    """Load a committed organism (or any saved checkpoint at ``path``) as ``(model, processor)``, offline."""
    if path is None:
        path = CONTROL_DIR if control else ORGANISM_DIR
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected a folder written by save_pretrained (config.json, model.safetensors, "
            "processor files); rebuild it with scripts/train_organism.py"
        )
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype)
    model.eval()
    return model, processor
